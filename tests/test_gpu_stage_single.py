"""GPU stage 40_single_gpu in its CPU smoke mode: both single-GPU recipes' settings (one process, CPU
offload, the host optimizer) train 2 measured steps on the tiny model, and the report carries every
figure the GPU run will fill in, so the stage is known to work before a GPU is lent."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / "benchmarks" / "gpu_stages" / "40_single_gpu.sh"


def test_single_gpu_stage_smoke(tmp_path):
    env = dict(os.environ, GPU_SESSION_SMOKE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(STAGE), str(tmp_path), "300"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "single_gpu.json").read_text())
    assert report["smoke"] is True and set(report["runs"]) == {"gpu24g_single", "a100_40g_single"}
    for name, run in report["runs"].items():
        assert "failed" not in run and "skipped" not in run, (name, run)
        assert run["frames_per_step"] == 4 and run["grad_accum_measured"] == 2
        assert len(run["step_s"]) == len(run["host_adamw_s"]) == 2  # one host AdamW step per optimizer step
        assert 0 < run["host_optimizer_share_at_recipe_accum"] < 1
        assert run["host_peak_rss_bytes"] > 0 and run["planned_peak_bytes"] > 0
        assert run["batch"]["frames_per_scene"] == 2  # the planner's worst split: scenes of 2 frames
    summary = (tmp_path / "summary.md").read_text()
    assert "CPU smoke run (tiny model; no GPU figure)" in summary and "FAILED" not in summary
