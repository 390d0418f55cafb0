"""recipes/slurm/train_multinode.sbatch, run by bash with stand-in `srun`, `scontrol`, `squeue`,
`scancel`, `vggt-fsdp` and `accelerate` on PATH: what each node runs, with which environment, and what
the job does after each kind of stop (SLURM's own behaviour, measured, is what the stand-ins play; the
script on a real SLURM: test_slurm_cluster.py). And the resources `recipe copy --slurm` writes."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vggt_fsdp import cli

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "recipes" / "slurm" / "train_multinode.sbatch"
JOB_ID = "4242"

# One program plays every command, by the name it is called with; each call appends a JSON line to
# $STANDIN_LOG. srun runs its command once per node (SLURM_NODEID 0..SLURM_NNODES-1), in order.
STANDIN = r'''#!PYTHON
import json, os, signal, subprocess, sys, time
import psutil
from pathlib import Path

name, argv, env = Path(sys.argv[0]).name, sys.argv[1:], os.environ
record = {"cmd": name, "argv": argv, "node": env.get("SLURM_NODEID"),
          "env": {k: env.get(k) for k in ("OMP_NUM_THREADS", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")}}
if name == "accelerate":
    config = Path(argv[argv.index("--config_file") + 1])
    record["config"] = config.read_text() if config.is_file() else None
with open(env["STANDIN_LOG"], "a") as log:
    log.write(json.dumps(record) + "\n")

if name == "srun":
    command = argv[next(i for i, a in enumerate(argv) if not a.startswith("-")):]
    codes = [subprocess.call(command, env=dict(env, SLURM_NODEID=str(node), SLURM_PROCID=str(node),
                                               SLURMD_NODENAME=f"gpu-{node:02d}"))
             for node in range(int(env["SLURM_NNODES"]))]
    sys.exit(max(128 - code if code < 0 else code for code in codes))  # a task killed by signal N: 128 + N
if name == "scontrol":
    if argv[:2] == ["show", "hostnames"]:
        print("\n".join(f"gpu-{n:02d}" for n in range(int(env["SLURM_NNODES"]))))
    elif argv[:2] == ["show", "config"]:
        print("KillWait                = 30 sec")
    elif argv[:3] == ["-o", "show", "job"]:  # what SLURM shows while it ends the job (env JOB: its fields)
        print(f"JobId={argv[3]} JobName=vggt-fsdp {env.get('JOB', 'JobState=RUNNING Reason=None Restarts=0')}")
    else:  # requeue JOB
        sys.exit(int(env.get("REQUEUE_STATUS", "0")))
    sys.exit(0)
if name == "squeue":
    print(env.get("TIME_LEFT", "UNLIMITED"))
    sys.exit(0)
if name == "scancel":
    sys.exit(0)
if name == "vggt-fsdp":
    if argv[:2] == ["recipe", "show"] and env.get("USR1_AT_START"):  # an early signal before the step starts
        script = [p for p in psutil.Process().parents() if any("sbatch" in a for a in p.cmdline())][-1]  # not $()
        script.send_signal(signal.SIGUSR1)
        time.sleep(0.3)
    if argv[:2] == ["recipe", "show"]:
        values = {"train.output_dir": env["RUN_DIR"], "accelerate.num_processes": "16",
                  "accelerate.num_machines": "2"}
        print("\n".join(values[argv[i + 1]] for i, a in enumerate(argv) if a == "--get"))
    else:  # accelerate-config RECIPE ... --output FILE: the file holds the arguments it was given
        Path(argv[argv.index("--output") + 1]).write_text(json.dumps(argv))
    sys.exit(0)
# accelerate launch ...
if env.get("TERM_WRAPPER") and env["SLURM_NODEID"] == "0":
    os.kill(os.getppid(), signal.SIGTERM)  # SLURM signals every process of the step, the wrapper too
    time.sleep(0.3)
if env.get("SIGNAL_BATCH") and env["SLURM_NODEID"] == "0":  # what SLURM sends the batch script
    batch = psutil.Process().parents()[2]  # wrapper <- srun <- the batch script
    batch.send_signal(getattr(signal, env["SIGNAL_BATCH"]))
    time.sleep(0.5)
if env.get("PREEMPT") and env["SLURM_NODEID"] == "0":
    Path(env["RUN_DIR"], "preempted.json").write_text('{"step": 7, "checkpoint": "ckpt/step-0000007"}')
sys.exit(int(env.get("LAUNCH_STATUS", "0")))
'''


@pytest.fixture
def job(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "standin"
    program.write_text(STANDIN.replace("PYTHON", sys.executable, 1))
    program.chmod(program.stat().st_mode | stat.S_IEXEC)
    for name in ("srun", "scontrol", "squeue", "scancel", "vggt-fsdp", "accelerate"):
        (bin_dir / name).symlink_to(program)
    (tmp_path / "tmp").mkdir()
    (tmp_path / "run").mkdir()

    def run(*args: str, **env: str):
        log = tmp_path / "calls.jsonl"
        log.unlink(missing_ok=True)
        base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STANDIN_LOG": str(log), "RUN_DIR": str(tmp_path / "run"),
                "TMPDIR": str(tmp_path / "tmp"), "SLURM_JOB_ID": JOB_ID, "SLURM_NNODES": "2",
                "SLURM_JOB_NODELIST": "gpu-[00-01]", "SLURM_CPUS_PER_TASK": "64", "SLURM_GPUS_ON_NODE": "4"}
        result = subprocess.run(["bash", str(SCRIPT), *args], env={**base, **env}, cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return result, calls, sorted(p.name for p in (tmp_path / "tmp").iterdir())

    return run


def _of(calls, cmd):
    return [c for c in calls if c["cmd"] == cmd]


def test_each_node_launches_its_rank_of_the_job(job):
    result, calls, leftovers = job("a100_40g", "data.root=/data/co3d")
    assert result.returncode == 0, result.stderr
    (srun,) = _of(calls, "srun")
    assert "--cpus-per-task=64" in srun["argv"] and "--kill-on-bad-exit=1" in srun["argv"]
    port = 15000 + int(JOB_ID) % 15000  # derived from the job: two jobs on one first node do not collide
    topology = ["accelerate.num_machines=2", "accelerate.num_processes=8",  # 2 nodes x SLURM_GPUS_ON_NODE=4
                "accelerate.main_process_ip=gpu-00", f"accelerate.main_process_port={port}"]
    launches = _of(calls, "accelerate")
    assert [c["node"] for c in launches] == ["0", "1"]
    for node, launch in enumerate(launches):
        config_file = launch["argv"][2]
        assert launch["argv"] == ["launch", "--config_file", config_file, "-m", "vggt_fsdp.train", "a100_40g",
                                  *topology, "data.root=/data/co3d"]
        # the node's config: the recipe with the job's topology and this node's machine_rank
        assert json.loads(launch["config"]) == ["accelerate-config", "a100_40g", *topology, "data.root=/data/co3d",
                                                f"accelerate.machine_rank={node}", "--output", config_file]
        assert launch["env"] == {"OMP_NUM_THREADS": "16", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "270"}
        assert (f"node {node} (gpu-{node:02d}): 4 process(es), 16 thread(s) each, rendezvous gpu-00:{port}"
                in result.stderr)
    assert leftovers == []  # the per-node configs are removed
    assert [c["argv"][:2] for c in _of(calls, "scontrol")] == [["show", "hostnames"]]  # a finished job: no requeue
    assert re.search(rf"==== job {JOB_ID} attempt 1 started on gpu-\[00-01\] ====\n", result.stderr)
    assert result.stderr.endswith(f"==== job {JOB_ID} attempt 1 ended: training finished ====\n")


def test_a_set_master_port_wins_and_a_requeued_attempt_is_numbered(job):
    result, calls, _ = job("a100_40g", MASTER_PORT="23456", SLURM_RESTART_COUNT="2")
    assert "accelerate.main_process_port=23456" in _of(calls, "accelerate")[0]["argv"]
    assert f"==== job {JOB_ID} attempt 3 started" in result.stderr


@pytest.mark.parametrize("env, per_node", [
    ({"GPUS_PER_NODE": "2"}, 2),                                        # the user's choice first
    ({}, 4),                                                            # the step's SLURM_GPUS_ON_NODE (fixture)
    ({"SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "a100:8"}, 8),   # typed --gpus-per-node
    ({"SLURM_GPUS_ON_NODE": ""}, 8),                                    # no GPUs: the recipe's 16 / 2 machines
    ({"SLURM_GPUS_ON_NODE": "0"}, 8),                                   # a CPU node says 0
])
def test_processes_per_node_come_from_the_gpus_the_step_got_else_the_recipe(job, env, per_node):
    result, calls, _ = job("a100_40g", **env)
    assert result.returncode == 0, result.stderr
    for launch in _of(calls, "accelerate"):
        assert f"accelerate.num_processes={2 * per_node}" in launch["argv"]
        assert launch["env"]["OMP_NUM_THREADS"] == str(64 // per_node)


def test_processes_per_node_that_are_not_a_number_stop_the_job_naming_the_fix(job):
    result, calls, _ = job("a100_40g", GPUS_PER_NODE="four")
    assert result.returncode != 0 and not _of(calls, "accelerate")
    assert "processes per node 'four' is not a positive number; ask sbatch for --gpus-per-node" in result.stderr


def test_a_preemption_save_requeues_the_job(job):
    result, calls, leftovers = job("a100_40g", PREEMPT="1", LAUNCH_STATUS="1")  # the agent exits 1 when signalled
    assert result.returncode == 0, result.stderr
    assert _of(calls, "scontrol")[-1]["argv"] == ["requeue", JOB_ID]
    assert result.stderr.endswith("ended: stopped by TERM, checkpoint ckpt/step-0000007 saved; requeued: the next "
                                  "attempt resumes from it ====\n")
    assert leftovers == []


def test_the_early_time_limit_signal_asks_the_ranks_to_save_then_requeues(job):
    result, calls, _ = job("a100_40g", SIGNAL_BATCH="SIGUSR1", PREEMPT="1", LAUNCH_STATUS="1")
    assert result.returncode == 0, result.stderr
    assert [c["argv"] for c in _of(calls, "scancel")] == [["--signal=TERM", JOB_ID]]  # every step, not the script
    assert "the time limit is about 300 s away: asking every rank to save a checkpoint" in result.stderr
    assert "stopped by TERM before the time limit, checkpoint ckpt/step-0000007 saved; requeued" in result.stderr
    assert _of(calls, "scontrol")[-1]["argv"] == ["requeue", JOB_ID]


# SLURM ending the job itself: every process, this script too, gets TERM, then KillWait. What the job
# shows meanwhile (measured on Slurm 22.05) says what comes next.
@pytest.mark.parametrize("shown, preempt, requeues, outcome", [
    ("JobState=COMPLETING Reason=TimeLimit Restarts=0", "1", True,
     "stopped by SLURM (COMPLETING, reason TimeLimit), checkpoint ckpt/step-0000007 saved; requeued"),
    ("JobState=COMPLETING Reason=TimeLimit Restarts=0", "", False,
     "reason TimeLimit), no checkpoint saved by this attempt; the job will not come back: submit the same sbatch"),
    ("JobState=COMPLETING Reason=None Restarts=0", "1", False,  # scancel
     "checkpoint ckpt/step-0000007 saved; the job will not come back: submit the same sbatch command again"),
    ("JobState=COMPLETING Reason=None Restarts=1", "1", False,  # scontrol requeue, a preemption
     "saved; SLURM requeued the job (scontrol requeue or a preemption): it starts again and resumes"),
])
def test_when_slurm_ends_the_job_the_script_says_whether_it_comes_back(job, shown, preempt, requeues, outcome):
    result, calls, _ = job("a100_40g", SIGNAL_BATCH="SIGTERM", JOB=shown, PREEMPT=preempt, LAUNCH_STATUS="1")
    assert "TERM from SLURM (time limit, scancel, requeue or preemption): the ranks save if their step and the save " \
           "fit in KillWait (30 sec)" in result.stderr
    assert outcome in result.stderr.splitlines()[-1], result.stderr
    assert (["requeue", JOB_ID] in [c["argv"] for c in _of(calls, "scontrol")]) == requeues


def test_a_time_limit_within_the_save_lead_is_reported_and_its_early_signal_ignored(job):
    # SLURM sends the early signal at once then (measured), while the processes start
    result, calls, _ = job("a100_40g", TIME_LEFT="4:50", SIGNAL_BATCH="SIGUSR1")
    assert "warning: 4:50 left of the time limit, not more than the 300 s save lead: the early signal is " \
           "ignored" in result.stderr
    assert "early time-limit signal ignored" in result.stderr
    assert not _of(calls, "scancel") and result.returncode == 0
    assert "warning" not in job("a100_40g", TIME_LEFT="1-00:00:00")[0].stderr


def test_an_early_signal_before_the_step_starts_does_not_end_the_script(job):
    result, calls, _ = job("a100_40g", USR1_AT_START="1")
    assert result.returncode == 0, result.stderr
    assert "early time-limit signal before training started: ignored" in result.stderr
    assert len(_of(calls, "accelerate")) == 2 and not _of(calls, "scancel")


def test_a_failure_keeps_its_status_and_a_stale_marker_is_not_a_preemption(job, tmp_path):
    marker = tmp_path / "run" / "preempted.json"
    marker.write_text('{"step": 3, "checkpoint": "ckpt/step-0000003"}')
    os.utime(marker, (1, 1))  # left by an earlier attempt
    result, calls, _ = job("a100_40g", LAUNCH_STATUS="3")
    assert result.returncode == 3
    assert [c["argv"][0] for c in _of(calls, "scontrol")] == ["show"]
    assert result.stderr.endswith("ended: training failed (exit 3); see the errors above ====\n")


def test_a_refused_requeue_fails_the_job_and_says_how_to_resume(job):
    result, _, _ = job("a100_40g", PREEMPT="1", REQUEUE_STATUS="1")
    assert result.returncode == 1
    assert "scontrol requeue failed, the job will not come back: submit the same sbatch command again" in result.stderr


def test_the_node_wrapper_outlives_the_term_and_removes_its_config(job):
    result, calls, leftovers = job("a100_40g", TERM_WRAPPER="1", LAUNCH_STATUS="1")
    assert result.returncode == 1  # the launcher's status, not the wrapper's death by TERM (143)
    assert leftovers == []
    assert len(_of(calls, "accelerate")) == 2


def test_one_save_lead_in_the_script_and_the_readme():
    text = SCRIPT.read_text()
    (signal_lead,) = re.findall(r"^#SBATCH --signal=B:USR1@(\d+)$", text, re.M)
    (default_lead,) = re.findall(r"^SAVE_LEAD_S=\$\{SAVE_LEAD_S:-(\d+)\}", text, re.M)
    assert signal_lead == default_lead
    readme_leads = set(re.findall(r"USR1@(\d+)", (REPO / "README.md").read_text()))
    assert readme_leads == {signal_lead}


def test_the_script_asks_for_no_resources_a_recipe_does_not_need():
    sbatch_lines = re.findall(r"^#SBATCH (.*)$", SCRIPT.read_text(), re.M)
    assert not [line for line in sbatch_lines if re.match(r"--(gpus|gres|cpus|exclusive|mem)", line)]
    assert {"--requeue", "--open-mode=append", "--output=%x-%j.out"} <= set(sbatch_lines)


def test_recipe_copy_slurm_of_a_broken_recipe_writes_nothing(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text((REPO / "recipes" / "cpu_tiny.yaml").read_text().replace("num_workers: 0", "num_workers: -1"))
    assert cli.main(["recipe", "copy", str(broken), str(tmp_path / "out"), "--slurm"]) == 2
    assert "data.num_workers=-1 must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe, resources", [
    ("cpu_tiny", ["--cpus-per-task=2"]),                         # 2 CPU processes, no loader workers; no GPU
    ("a100_40g", ["--gpus-per-node=8", "--cpus-per-task=72"]),   # 8 GPUs, each process with 8 workers
])
def test_recipe_copy_slurm_writes_the_resources_of_the_recipe(tmp_path, recipe, resources):
    assert cli.main(["recipe", "copy", recipe, str(tmp_path), "--slurm"]) == 0
    copied = (tmp_path / "train_multinode.sbatch").read_text()
    assert re.findall(r"^#SBATCH (--(?:gpus|cpus)\S*)$", copied, re.M) == resources
    # the rest is the bundled script
    strip = lambda text: re.sub(r"# >>> resources.*?# <<< resources\n", "", text, flags=re.S)  # noqa: E731
    assert strip(copied) == strip(SCRIPT.read_text())


def test_recipe_show_get_prints_resolved_values_for_scripts(capsys):
    assert cli.main(["recipe", "show", "a100_40g", "train.output_dir=/runs/x", "--get", "train.output_dir",
                     "--get", "accelerate.num_processes", "--get", "data.frames_range"]) == 0
    assert capsys.readouterr().out.splitlines() == ["/runs/x", "8", "[2, 24]"]
    assert cli.main(["recipe", "show", "a100_40g", "--get", "train.outdir"]) == 2
    assert "train has no key 'outdir'; valid keys: [" in capsys.readouterr().err
