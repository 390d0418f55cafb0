"""recipes/slurm/train_multinode.sbatch, run by bash with stand-in `srun`, `scontrol`, `vggt-fsdp` and
`accelerate` on PATH: what each node runs, with which environment, and what the job does after a
preemption save."""
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
    codes = [subprocess.call(command, env=dict(env, SLURM_NODEID=str(node), SLURM_PROCID=str(node)))
             for node in range(int(env["SLURM_NNODES"]))]
    sys.exit(max(128 - code if code < 0 else code for code in codes))  # a task killed by signal N: 128 + N
if name == "scontrol":
    if argv[:2] == ["show", "hostnames"]:
        print("\n".join(f"gpu-{n:02d}" for n in range(int(env["SLURM_NNODES"]))))
        sys.exit(0)
    sys.exit(int(env.get("REQUEUE_STATUS", "0")))  # requeue JOB
if name == "vggt-fsdp":
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
    for name in ("srun", "scontrol", "vggt-fsdp", "accelerate"):
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
    topology = ["accelerate.num_machines=2", "accelerate.num_processes=8",  # 2 nodes x SLURM_GPUS_ON_NODE=4
                "accelerate.main_process_ip=gpu-00", "accelerate.main_process_port=29500"]
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
    assert leftovers == []  # per-node configs and the job's own temporary directory are removed
    assert not _of(calls, "scontrol")[1:]  # only `show hostnames`: a finished job is not requeued


@pytest.mark.parametrize("env, per_node", [
    ({"GPUS_PER_NODE": "2"}, 2),                                        # the user's choice first
    ({}, 4),                                                            # SLURM_GPUS_ON_NODE (fixture)
    ({"SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "a100:8"}, 8),   # typed --gpus-per-node
    ({"SLURM_GPUS_ON_NODE": ""}, 8),                                    # the recipe: 16 processes / 2 machines
])
def test_processes_per_node_come_from_the_gpus_the_job_got_else_the_recipe(job, env, per_node):
    result, calls, _ = job("a100_40g", **env)
    assert result.returncode == 0, result.stderr
    for launch in _of(calls, "accelerate"):
        assert f"accelerate.num_processes={2 * per_node}" in launch["argv"]
        assert launch["env"]["OMP_NUM_THREADS"] == str(64 // per_node)


def test_a_preemption_save_requeues_the_job(job):
    result, calls, leftovers = job("a100_40g", PREEMPT="1", LAUNCH_STATUS="1")  # the agent exits 1 when signalled
    assert result.returncode == 0, result.stderr
    assert _of(calls, "scontrol")[-1]["argv"] == ["requeue", JOB_ID]
    assert "requeueing job 4242" in result.stderr and '"step": 7' in result.stderr
    assert leftovers == []


def test_a_failure_keeps_its_status_and_a_stale_marker_is_not_a_preemption(job, tmp_path):
    marker = tmp_path / "run" / "preempted.json"
    marker.write_text("{}")
    os.utime(marker, (1, 1))  # left by an earlier run
    result, calls, _ = job("a100_40g", LAUNCH_STATUS="3")
    assert result.returncode == 3
    assert [c["argv"][0] for c in _of(calls, "scontrol")] == ["show"]


def test_a_refused_requeue_fails_the_job_and_says_how_to_resume(job):
    result, _, _ = job("a100_40g", PREEMPT="1", REQUEUE_STATUS="1")
    assert result.returncode == 1
    assert "submit the same sbatch command again to resume" in result.stderr


def test_the_node_wrapper_outlives_the_term_and_removes_its_config(job):
    result, calls, leftovers = job("a100_40g", TERM_WRAPPER="1", LAUNCH_STATUS="1")
    assert result.returncode == 1  # the launcher's status, not the wrapper's death by TERM (143)
    assert leftovers == []
    assert len(_of(calls, "accelerate")) == 2


def test_one_term_lead_time_in_the_script_and_the_readme():
    text = SCRIPT.read_text()
    (signal_lead,) = re.findall(r"^#SBATCH --signal=TERM@(\d+)$", text, re.M)
    (default_lead,) = re.findall(r"^TERM_LEAD_S=\$\{TERM_LEAD_S:-(\d+)\}", text, re.M)
    assert signal_lead == default_lead
    readme_leads = set(re.findall(r"TERM@(\d+)", (REPO / "README.md").read_text()))
    assert readme_leads == {signal_lead}


def test_recipe_show_get_prints_resolved_values_for_scripts(capsys):
    assert cli.main(["recipe", "show", "a100_40g", "train.output_dir=/runs/x", "--get", "train.output_dir",
                     "--get", "accelerate.num_processes", "--get", "data.frames_range"]) == 0
    assert capsys.readouterr().out.splitlines() == ["/runs/x", "8", "[2, 24]"]
    assert cli.main(["recipe", "show", "a100_40g", "--get", "train.outdir"]) == 2
    assert "train has no key 'outdir'; valid keys: [" in capsys.readouterr().err
