"""The SLURM script on a real SLURM: a cluster of two nodes on this host (tests/slurm_cluster.py: Debian's
slurm-wlm and munge, installed with apt when missing, daemons started and stopped by this module).

One job, submitted as a user would: `vggt-fsdp recipe copy cpu_tiny DIR --slurm`, then
`sbatch --nodes 2 DIR/train_multinode.sbatch DIR/cpu_tiny.yaml ...` of the unedited copy. It trains with
2 processes on each node (world size 4), is preempted with `scancel --signal=TERM` mid-run, saves, is
requeued by the script, and its second attempt resumes at the saved step and finishes. The waiting is
SLURM's (start-up, requeue); the training is a few tiny steps.

Needs root and apt (or SLURM installed); elsewhere it is skipped with the reason, and under CI (CI=true)
it fails instead.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import slurm_cluster
from slurm_cluster import NODES, Cluster, wait_for

from vggt_fsdp import cli

MAX_STEPS = 8
PREEMPT_AFTER_STEP = 2  # scancel --signal=TERM once metrics.jsonl holds this step


@pytest.fixture(scope="module")
def cluster():
    reason = slurm_cluster.unavailable()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the real-SLURM test must run in CI, but: {reason}")
        pytest.skip(reason)
    slurm_cluster.install()
    running = Cluster()
    try:
        running.start()
        yield running
    finally:
        running.stop()


@dataclass
class Job:
    id: str
    log: str
    steps: list[dict]
    state: dict[str, str]
    dir: Path


def _steps(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []


@pytest.fixture(scope="module")
def preempted_job(cluster, tmp_path_factory) -> Job:
    work = tmp_path_factory.mktemp("slurm-job")
    assert cli.main(["recipe", "copy", "cpu_tiny", str(work), "--slurm"]) == 0  # in this process: seconds saved
    run_dir = work / "run"
    job_id = cluster.run("sbatch", "--parsable", "--nodes", "2", str(work / "train_multinode.sbatch"),
                         str(work / "cpu_tiny.yaml"), f"train.max_steps={MAX_STEPS}", "train.log_every=1",
                         "train.checkpoint_every=1000", f"train.output_dir={run_dir}", cwd=work).stdout.strip()
    log = work / f"vggt-fsdp-{job_id}.out"
    try:
        wait_for(f"step {PREEMPT_AFTER_STEP} of job {job_id}",
                 lambda: any(r["step"] >= PREEMPT_AFTER_STEP for r in _steps(run_dir / "metrics.jsonl")), 300)
        cluster.run("scancel", "--signal=TERM", job_id)
        wait_for(f"job {job_id} to be requeued and to complete",
                 lambda: cluster.job(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
                 400)
    except AssertionError as err:
        raise AssertionError(f"{err}\n--- job log\n{log.read_text() if log.exists() else '(none)'}\n"
                             f"{cluster.logs()}") from None
    return Job(job_id, log.read_text(), _steps(run_dir / "metrics.jsonl"), cluster.job(job_id), work)


def _attempts(log: str) -> list[str]:
    """The log's text of each attempt, from its start mark to its end mark."""
    return re.findall(r"==== job \d+ attempt \d+ started.*?==== job \d+ attempt \d+ ended: [^\n]*", log, re.S)


def test_the_job_was_requeued_once_and_completed(preempted_job):
    assert preempted_job.state["JobState"] == "COMPLETED", preempted_job.log
    assert preempted_job.state["Restarts"] == "1"


def test_the_log_holds_both_attempts_each_marked(preempted_job):
    first, second = _attempts(preempted_job.log)
    assert f"==== job {preempted_job.id} attempt 1 started on vggtnode[1-2] ====" in first
    assert re.search(r"attempt 1 ended: stopped by TERM, checkpoint \S+step-\d+ saved; requeued", first), first
    assert f"==== job {preempted_job.id} attempt 2 started" in second
    assert second.endswith("attempt 2 ended: training finished ===="), second[-2000:]


@pytest.mark.parametrize("attempt", [0, 1])
def test_each_attempt_trains_two_processes_on_each_of_two_nodes(preempted_job, attempt):
    text = _attempts(preempted_job.log)[attempt]
    port = 15000 + int(preempted_job.id) % 15000  # the job's own rendezvous port, the same after a requeue
    for rank, node in enumerate(NODES):
        assert (f"node {rank} ({node}): 2 process(es), 1 thread(s) each, rendezvous {NODES[0]}:{port}") in text
    assert "over 4 cpu process(es)" in text
    assert {r["world_size"] for r in preempted_job.steps} == {4}


def test_the_second_attempt_resumes_at_the_saved_step_and_trains_the_rest(preempted_job):
    first, second = _attempts(preempted_job.log)
    saved = int(re.search(r"stopped by signal at step (\d+); checkpoint \S+step-0*\1\b", first).group(1))
    assert PREEMPT_AFTER_STEP <= saved < MAX_STEPS
    assert re.search(rf"resumed from \S+step-0*{saved} at step {saved}\b", second), second
    # every step once: those of the first attempt up to the save, then the second attempt's
    assert [r["step"] for r in preempted_job.steps] == list(range(1, MAX_STEPS + 1))
    assert f"step {saved + 1}/{MAX_STEPS}" in second and f"step {saved + 1}/{MAX_STEPS}" not in first
    assert (preempted_job.dir / "run" / "checkpoints" / f"step-{MAX_STEPS:07d}").is_dir()
