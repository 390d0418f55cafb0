"""Every GPU stage of benchmarks/gpu_session.sh in its CPU smoke mode (`GPU_SESSION_SMOKE=1`: the tiny
model, tiny shapes, the stage's own code paths and report), so a stage is known to work before a GPU is
lent, each with the budget the session's own split gives it in smoke mode (`gpu_session.sh --budgets`).
The stages start together when the first test here asks for one: each keeps about one core busy, so
side by side they take less time on CI's two cores; each test then waits for its own. They run as in a
session (GPU_SESSION_RECORD=1, a scratch directory): each records its items in measurements.json.

- 10_trainer_cuda: the `vggt-fsdp train` run with checkpoint and export, SIGTERM and exact resume with
  the 80GB recipe's selective policies in deterministic mode, fused AdamW's skip of a non-finite step;
  run directories deleted.
- 20_throughput: the 40GB recipe with autocast on and off at the worst case, the planner's prediction,
  the fastest fitting configuration as overrides, the report as the summary.
- 30_sampler_mix: the block policy on the sampler's mix, every shape warmed up before the timed pass.
- 40_track: both track recipes and the upstream-style track head through bench_step (world size 2, one
  step), the track head's FLOPs counted and the planner's prediction attached.
- 50_single_gpu: both single-GPU recipes' settings (one process, CPU offload, the host optimizer) train 2
  measured steps, and the report carries every figure the GPU run will fill in.
- 60_long_share: one GPU's share of both long-scene recipes (the exchange stood in for) through
  bench_step, with the planner's peak for the share's scene attached. It takes only what the stages
  before it leave (none in the session's planned split), so here it gets LEFTOVER_BUDGET_S.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from processes import finish, start

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 1500  # generous: six stages share two cores
# The session runs its stages one after another; here five share two cores, so each gets the session's
# split at twice the smoke scale.
SIDE_BY_SIDE_SCALE = 6
LEFTOVER_BUDGET_S = 300  # the stages that take what is left (gpu_session.sh LEFTOVER_ONLY)


def session_budgets(scale: int | None = None) -> dict[str, int]:
    """The smoke session's split of its budget: the stages' budgets in `GPU_SESSION_SMOKE=1 bash
    benchmarks/gpu_session.sh` (at another budget scale if given)."""
    env = dict(os.environ, GPU_SESSION_SMOKE="1", **({"GPU_SESSION_SCALE": str(scale)} if scale else {}))
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh"), "--budgets"], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return {name: int(budget) for name, budget in (line.split() for line in out.splitlines())}


class Stages:
    """The stages' smoke runs, started at once; `finished(name)` waits for one."""

    def __init__(self, root: Path):
        budgets = session_budgets(SIDE_BY_SIDE_SCALE)
        budgets["60_long_share"] = LEFTOVER_BUDGET_S
        self.dirs = {name: root / name for name in budgets}
        self.scratch = {name: root / "scratch" / name for name in budgets}
        self.procs = {}
        for name, budget in budgets.items():
            self.dirs[name].mkdir()
            self.scratch[name].mkdir(parents=True)
            env = dict(os.environ, GPU_SESSION_SMOKE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
                       GPU_SESSION_RECORD="1", GPU_SESSION_SCRATCH=str(self.scratch[name]))
            command = ["bash", str(REPO / "benchmarks" / "gpu_stages" / f"{name}.sh"), str(self.dirs[name]),
                       str(budget)]
            self.procs[name] = start(command, env, merge_output=True)

    def finished(self, name: str) -> Path:
        result = finish(self.procs[name], TIMEOUT_S)
        assert result.returncode == 0, result.stdout[-6000:]
        return self.dirs[name]

    def measured(self, name: str) -> dict[str, str]:
        """The stage's ledger records: item -> status."""
        items = json.loads((self.dirs[name] / "measurements.json").read_text())["items"]
        return {item: entry["status"] for item, entry in items.items()}

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


def test_budgets_are_the_sessions_split_scaled_to_the_cpu():
    budgets = session_budgets()
    assert list(budgets) == ["10_trainer_cuda", "20_throughput", "30_sampler_mix", "40_track", "50_single_gpu",
                             "60_long_share"]
    # The GPU split (480 s in all, setup included) times 3; the trainer and the throughput grid come first.
    assert budgets.pop("60_long_share") < 10  # it takes only what the others leave
    assert 1200 < sum(budgets.values()) + 10 * len(budgets) <= 3 * 480
    assert budgets["10_trainer_cuda"] > budgets["30_sampler_mix"] and budgets["20_throughput"] > budgets["40_track"]


def test_trainer_stage(stages):
    out = stages.finished("10_trainer_cuda")
    report = json.loads((out / "trainer_cuda.json").read_text())
    checks = report["checks"]
    assert report["smoke"] is True and set(checks) == {"fused_skip", "vggt1b", "resume_exact"}
    assert all(check["passed"] for check in checks.values()), checks
    assert checks["fused_skip"]["fused"] and checks["fused_skip"]["params_unchanged_after_nan_step"]
    assert "vggt_fsdp.cli train" in checks["vggt1b"]["command"] and checks["vggt1b"]["checkpoint_problems"] == []
    resume = checks["resume_exact"]
    assert resume["preempted"]["step"] < 6 and resume["weights_bitwise_equal"] and resume["loss_max_abs_diff"] == 0
    # The 80GB recipe's selective policies, in deterministic mode (SDPA's math kernel).
    assert any('"selective"' in o and '"qkv"' in o for o in resume["checkpoint_policies"])
    assert stages.measured("10_trainer_cuda") == dict.fromkeys(checks, "measured")
    assert not any(stages.scratch["10_trainer_cuda"].iterdir())  # every run directory deleted
    assert not list(out.rglob("*.safetensors")) and not list(out.rglob("checkpoints"))
    summary = (out / "summary.md").read_text()
    assert "CPU smoke run (tiny model; no GPU figure)" in summary and "FAILED" not in summary


def test_throughput_stage(stages):
    out = stages.finished("20_throughput")
    (doc_path,) = out.glob("*-cpu.json")
    results = json.loads(doc_path.read_text())["results"]
    assert [(r["config"]["name"], r["status"]) for r in results] == [
        ("40GB recipe", "ok"), ("40GB recipe, no autocast", "ok")]
    assert "parallel.precision.autocast=false" in results[1]["command"]
    assert 0 < results[0]["predicted"]["recompute_fraction"] < 0.5 and results[0]["predicted"]["step_s"] is None
    fastest = json.loads((out / "fastest.json").read_text())
    assert set(fastest) == {"40GB recipe"}  # the block policy is no recipe; the 80GB recipe is not run here
    best = fastest["40GB recipe"]
    step = {r["config"]["name"]: r["timing"]["median"] for r in results}
    assert best["step_s"] == min(step["40GB recipe"], step["40GB recipe, no autocast"])
    assert best["overrides"] == ([] if best["name"] == "40GB recipe" else
                                 ["parallel.precision.autocast=false", "accelerate.mixed_precision=no"])
    assert stages.measured("20_throughput") == dict.fromkeys(step, "measured")
    summary = (out / "summary.md").read_text()
    assert "**CPU results.**" in summary


def test_sampler_mix_stage(stages):
    out = stages.finished("30_sampler_mix")
    (doc_path,) = out.glob("*-cpu.json")
    (mix,) = json.loads(doc_path.read_text())["results"]
    assert (mix["config"]["role"], mix["config"]["mix"], mix["status"]) == ("block_40g", 2, "ok")
    assert mix["predicted"] == {} and len(mix["shape"]["mix"]) == 2
    assert "block policy before against the recipes now" in (out / "summary.md").read_text()


def test_track_stage(stages):
    out = stages.finished("40_track")
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
    out = stages.finished("50_single_gpu")
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


def test_long_share_stage(stages):
    out = stages.finished("60_long_share")
    doc = json.loads((out / "long_share.json").read_text())
    assert doc["smoke"] is True and doc["owed"] == []
    names = [r["config"]["name"] for r in doc["results"]]
    assert names == ["40GB long recipe, one GPU's share", "80GB long recipe, one GPU's share"]
    for result in doc["results"]:
        assert result["status"] == "ok", result
        assert result["parallel"]["context_parallel"] == 4 and result["throughput"]["frames_per_s"] > 0
        # the share's scene is the recipe's group of 4 times its frames, planned as such
        plan = result["planned"]
        assert plan["context_parallel"] == 4 and plan["scene_frames"] == 4 * result["config"]["frames"]
        assert plan["peak_bytes"] > 0 and "step_s" not in plan  # no card's rates on the CPU
    assert stages.measured("60_long_share") == dict.fromkeys(names, "measured")
    summary = (out / "summary.md").read_text()
    assert "CPU smoke run (tiny model; no GPU figure)" in summary and "stood in for" in summary
