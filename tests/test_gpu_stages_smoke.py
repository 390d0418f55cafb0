"""Every GPU stage of benchmarks/gpu_session.sh in its CPU smoke mode (`GPU_SESSION_SMOKE=1`: the tiny
model, tiny shapes, the stage's own code paths and report), so a stage is known to work before a GPU is
lent. The four stages start together when the first test here asks for one: each keeps about one core
busy, so side by side they take half the time on CI's two cores; each test then waits for its own.

- 10_throughput: the block policy's worst case and sampler mix with the planner's prediction, and the
  comparison report as the stage's summary.
- 20_trainer_cuda: the `vggt-fsdp train` run with checkpoint and export, SIGTERM and exact resume, fused
  AdamW's skip of a non-finite step.
- 30_track: both track recipes and the upstream-style track head through bench_step (world size 2, one
  step), the track head's FLOPs counted and the planner's prediction attached.
- 40_single_gpu: both single-GPU recipes' settings (one process, CPU offload, the host optimizer) train 2
  measured steps, and the report carries every figure the GPU run will fill in.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from processes import finish, start

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = {"10_throughput": 600, "20_trainer_cuda": 600, "30_track": 1200, "40_single_gpu": 300}
TIMEOUT_S = 1500  # generous: four stages share two cores


class Stages:
    """The stages' smoke runs, started at once; `finished(name)` waits for one."""

    def __init__(self, root: Path):
        env = dict(os.environ, GPU_SESSION_SMOKE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        self.dirs = {name: root / name for name in BUDGET_S}
        self.procs = {}
        for name, budget in BUDGET_S.items():
            self.dirs[name].mkdir()
            command = ["bash", str(REPO / "benchmarks" / "gpu_stages" / f"{name}.sh"), str(self.dirs[name]),
                       str(budget)]
            self.procs[name] = start(command, env, merge_output=True)

    def finished(self, name: str) -> Path:
        result = finish(self.procs[name], TIMEOUT_S)
        assert result.returncode == 0, result.stdout[-6000:]
        return self.dirs[name]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    started = Stages(tmp_path_factory.mktemp("stages"))
    yield started
    started.stop()


def test_throughput_stage(stages):
    out = stages.finished("10_throughput")
    (doc_path,) = out.glob("*-cpu.json")
    results = json.loads(doc_path.read_text())["results"]
    assert [(r["config"]["role"], r["config"]["mix"], r["status"]) for r in results] == [
        ("block_40g", 0, "ok"), ("block_40g", 2, "ok")]
    worst, mix = results
    assert 0.2 < worst["predicted"]["recompute_fraction"] < 0.5 and worst["predicted"]["step_s"] is None
    assert mix["predicted"] == {} and len(mix["shape"]["mix"]) == 2
    summary = (out / "summary.md").read_text()
    assert "**CPU results.**" in summary and "block policy before against the recipes now" in summary


def test_trainer_stage(stages):
    out = stages.finished("20_trainer_cuda")
    report = json.loads((out / "trainer_cuda.json").read_text())
    checks = report["checks"]
    assert report["smoke"] is True and set(checks) == {"fused_skip", "vggt1b", "resume_exact"}
    assert all(check["passed"] for check in checks.values()), checks
    assert checks["fused_skip"]["fused"] and checks["fused_skip"]["params_unchanged_after_nan_step"]
    assert "vggt_fsdp.cli train" in checks["vggt1b"]["command"] and checks["vggt1b"]["checkpoint_problems"] == []
    resume = checks["resume_exact"]
    assert resume["preempted"]["step"] < 6 and resume["weights_bitwise_equal"]
    summary = (out / "summary.md").read_text()
    assert "CPU smoke run (tiny model; no GPU figure)" in summary and "FAILED" not in summary


def test_track_stage(stages):
    out = stages.finished("30_track")
    doc = json.loads((out / "track_gpu.json").read_text())
    assert doc["smoke"] is True and doc["owed"] == []
    names = [r["config"]["name"] for r in doc["results"]]
    assert names == ["40GB track recipe", "40GB track recipe, upstream-style track head", "80GB track recipe"]
    recipe, plain, _ = doc["results"]
    for result in doc["results"]:
        assert result["status"] == "ok", result
        assert result["flops"]["track_points"] == 8 and result["throughput"]["frames_per_s"] > 0
    # The track head's recompute saves activations: fewer bytes saved for backward than the plain head.
    assert recipe["memory"]["saved_tensor_bytes"] < plain["memory"]["saved_tensor_bytes"]
    assert recipe["planned"]["track_terms_bytes"]["track head tracker"] > 0 and "planned" not in plain
    summary = (out / "summary.md").read_text()
    assert "CPU smoke run (tiny model; no GPU figure)" in summary and "upstream-style track head" in summary


def test_single_gpu_stage(stages):
    out = stages.finished("40_single_gpu")
    report = json.loads((out / "single_gpu.json").read_text())
    assert report["smoke"] is True and set(report["runs"]) == {"gpu24g_single", "a100_40g_single"}
    for name, run in report["runs"].items():
        assert "failed" not in run and "skipped" not in run, (name, run)
        assert run["frames_per_step"] == 4 and run["grad_accum_measured"] == 2
        assert len(run["step_s"]) == len(run["host_adamw_s"]) == 2  # one host AdamW step per optimizer step
        assert 0 < run["host_optimizer_share_at_recipe_accum"] < 1
        assert run["host_peak_rss_bytes"] > 0 and run["planned_peak_bytes"] > 0
        assert run["batch"]["frames_per_scene"] == 2  # the planner's worst split: scenes of 2 frames
    summary = (out / "summary.md").read_text()
    assert "CPU smoke run (tiny model; no GPU figure)" in summary and "FAILED" not in summary
