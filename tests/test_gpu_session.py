"""benchmarks/gpu_session.sh: the one call a lent GPU gets runs every stage, survives a failing or
hanging stage, shares its budget, and returns at most the files the device tool can bring back."""
from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SESSION = REPO / "benchmarks" / "gpu_session.sh"
# The device tool brings back at most 8 files from $OUT.
MAX_RETURNED_FILES = 8

STUBS = {
    "10_ok.sh": 'echo "budget=$2" > "$1/budget.txt"; printf "| ok | %s |\\n" "$2" > "$1/summary.md"; echo stage-ten-ran',
    "20_fails.sh": "echo about to fail; exit 3",
    "30_hangs.sh": "sleep 60",
    "40_after.sh": 'echo "smoke=${GPU_SESSION_SMOKE:-0}" > "$1/summary.md"',
}


def run_session(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    stages = tmp_path / "stages"
    stages.mkdir()
    for name, body in STUBS.items():
        (stages / name).write_text(f"#!/usr/bin/env bash\nset -eu\n{body}\n")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_STAGES_DIR": str(stages), "GPU_SESSION_GRACE": "1",
           "GPU_SESSION_SMOKE": "1"}
    proc = subprocess.run(["bash", str(SESSION), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    return proc, out


def test_every_stage_runs_and_failures_are_recorded_not_fatal(tmp_path):
    proc, out = run_session(tmp_path, "24")  # 6 s each: the hanging stage is cut at its budget
    assert proc.returncode == 0, proc.stderr
    summary = (out / "summary.md").read_text()
    assert "## 10_ok: ok in" in summary and "| ok | 5 |" in summary
    assert "## 20_fails: failed (exit 3)" in summary
    assert "## 30_hangs: timed out after 6 s" in summary
    assert "## 40_after: ok" in summary and "smoke=1" in summary  # a stage after a hang still ran
    log = (out / "session.log").read_text()
    assert "stage-ten-ran" in log and "about to fail" in log
    assert len([p for p in out.rglob("*") if p.is_file()]) <= MAX_RETURNED_FILES
    with tarfile.open(out / "stages.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"./10_ok/budget.txt", "./10_ok/stage.log", "./30_hangs/stage.log"} <= names


def test_named_stages_run_alone_with_the_whole_budget(tmp_path):
    proc, out = run_session(tmp_path, "12", "10_ok")
    assert proc.returncode == 0, proc.stderr
    summary = (out / "summary.md").read_text()
    assert "| ok | 11 |" in summary  # 12 s total, 1 s grace, no other stage sharing it
    assert "20_fails" not in summary and "30_hangs" not in summary


def test_the_real_stages_are_scripts_the_session_can_name():
    stages = sorted((REPO / "benchmarks" / "gpu_stages").glob("[0-9]*.sh"))
    for stage in stages:
        assert stage.stem[:2].isdigit() and stage.stem[2] == "_", stage
        text = stage.read_text()
        assert "GPU_SESSION_SMOKE" in text, f"{stage.name} has no CPU smoke mode"
