"""The GPU validation script (benchmarks/plan_vs_measured.py) runs end to end on the CPU with the tiny
preset, so it can be trusted before GPU time is spent on it."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("plan_vs_measured", REPO / "benchmarks" / "plan_vs_measured.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_vs_measured_smoke_on_cpu(tmp_path):
    script = _load_script()
    argv = ["--recipe", str(REPO / "recipes" / "cpu_tiny.yaml"), "--preset", "vggt-tiny", "--world-size", "2",
            "--frames", "2,4:2", "--policies", "block/chunks", "--image", "28x42", "--device", "cpu",
            "--out", str(tmp_path)]
    assert script.main(argv) == 0
    result = json.loads((tmp_path / "plan_vs_measured.json").read_text())
    for key in ("command", "date", "device", "torch", "git_commit", "measured_with"):
        assert result[key]
    assert result["measured_with"].startswith("FSDPMemTracker")  # a CPU figure is labelled as such
    assert [(r["frames_per_gpu"], r["scenes"]) for r in result["rows"]] == [(2, 1), (4, 2)]
    for row in result["rows"]:
        assert row["measured_peak_bytes"] > 0 and row["saved_tensor_bytes"] > 0
        assert abs(row["activation_error_pct"]) <= 5
        assert abs(row["peak_error_pct"]) <= 20
    markdown = (tmp_path / "plan_vs_measured.md").read_text()
    assert "| block/chunks | 4 | 2 x 2 |" in markdown
