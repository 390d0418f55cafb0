"""GPU stage 20_trainer_cuda in its CPU smoke mode: the stage's code paths (the `vggt-fsdp train` run
with checkpoint and export, SIGTERM and exact resume, fused AdamW's skip of a non-finite step) run on
the tiny model, so the stage is known to work before a GPU is lent."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / "benchmarks" / "gpu_stages" / "20_trainer_cuda.sh"


def test_trainer_stage_smoke(tmp_path):
    env = dict(os.environ, GPU_SESSION_SMOKE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(STAGE), str(tmp_path), "600"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "trainer_cuda.json").read_text())
    checks = report["checks"]
    assert report["smoke"] is True and set(checks) == {"fused_skip", "vggt1b", "resume_exact"}
    assert all(check["passed"] for check in checks.values()), checks
    assert checks["fused_skip"]["fused"] and checks["fused_skip"]["params_unchanged_after_nan_step"]
    assert "vggt_fsdp.cli train" in checks["vggt1b"]["command"] and checks["vggt1b"]["checkpoint_problems"] == []
    resume = checks["resume_exact"]
    assert resume["preempted"]["step"] < 6 and resume["weights_bitwise_equal"]
    summary = (tmp_path / "summary.md").read_text()
    assert "CPU smoke run (tiny model; no GPU figure)" in summary and "FAILED" not in summary
