"""GPU stage 30_track in its CPU smoke mode: both track recipes and the upstream-style track head run
through bench_step on the tiny model (world size 2, one step), with the track head's FLOPs counted and
the planner's prediction attached, so the stage is known to work before a GPU is lent."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / "benchmarks" / "gpu_stages" / "30_track.sh"


def test_track_stage_smoke(tmp_path):
    env = dict(os.environ, GPU_SESSION_SMOKE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    # A generous budget: three short runs on the CPU, which other processes may slow down.
    proc = subprocess.run(["bash", str(STAGE), str(tmp_path), "1200"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "track_gpu.json").read_text())
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
    summary = (tmp_path / "summary.md").read_text()
    assert "CPU smoke run (tiny model; no GPU figure)" in summary and "upstream-style track head" in summary
