"""The issue-10 GPU stage runs its comparison end to end in CPU smoke mode (tiny model): a worst-case
and a sampler-mix measurement with the planner's prediction, and a report as the stage's summary."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_throughput_stage_smoke(tmp_path):
    env = {**os.environ, "GPU_SESSION_SMOKE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["bash", "benchmarks/gpu_stages/10_throughput.sh", str(tmp_path), "600"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (doc_path,) = tmp_path.glob("*-cpu.json")
    results = json.loads(doc_path.read_text())["results"]
    assert [(r["config"]["role"], r["config"]["mix"], r["status"]) for r in results] == [
        ("block_40g", 0, "ok"), ("block_40g", 2, "ok")]
    worst, mix = results
    assert 0.2 < worst["predicted"]["recompute_fraction"] < 0.5 and worst["predicted"]["step_s"] is None
    assert mix["predicted"] == {} and len(mix["shape"]["mix"]) == 2
    summary = (tmp_path / "summary.md").read_text()
    assert "**CPU results.**" in summary and "block policy before against the recipes now" in summary
