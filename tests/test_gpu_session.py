"""benchmarks/gpu_session.sh: the one call a lent GPU gets runs every stage, survives a failing or
hanging stage, shares its budget, keeps $OUT small, and ends with what it measured and what it owes; a
later session at the same code runs only what is owed."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SESSION = REPO / "benchmarks" / "gpu_session.sh"
MAX_OUT_BYTES = 5 * 1024 * 1024

# Stub stages. `item NAME` records an item the way the real stages do (benchmarks/session_ledger.py),
# unless an earlier session's ledger lists it.
ITEM = ('item() { python3 -c "import sys; from benchmarks import session_ledger as l; '
        'sys.exit(0 if l.skip_if_measured(sys.argv[1], sys.argv[2]) else 1)" "$1" "$2" && return 0; '
        'echo "ran $2"; python3 -c "import sys; from benchmarks import session_ledger as l; '
        'l.record(sys.argv[1], sys.argv[2], l.MEASURED)" "$1" "$2"; }')
STUBS = {
    "10_ok.sh": f'{ITEM}; item "$1" first; item "$1" second; echo "budget=$2" > "$1/budget.txt"; '
                'printf "| ok | %s |\\n" "$2" > "$1/summary.md"; echo stage-ten-ran',
    "20_fails.sh": "echo about to fail; exit 3",
    "30_hangs.sh": f'{ITEM}; item "$1" before-the-hang; sleep 60',
    "40_big.sh": 'head -c 2000000 /dev/zero > "$1/weights.bin"; head -c 400000 /dev/zero | tr "\\0" x > "$1/run.log"; '
                 'head -c 1000 /dev/zero > "$GPU_SESSION_SCRATCH/checkpoint"; '
                 'echo "smoke=${GPU_SESSION_SMOKE:-0}" > "$1/summary.md"',
}


def run_session(tmp_path: Path, *args: str, ledger: Path | None = None, out_name: str = "out"):
    stages = tmp_path / "stages"
    if not stages.exists():
        stages.mkdir()
        for name, body in STUBS.items():
            (stages / name).write_text(f"#!/usr/bin/env bash\nset -eu\n{body}\n")
    out = tmp_path / out_name
    env = {**os.environ, "OUT": str(out), "GPU_STAGES_DIR": str(stages), "GPU_SESSION_GRACE": "1",
           "GPU_SESSION_RESERVE": "1", "GPU_SESSION_MIN_STAGE_S": "1", "GPU_SESSION_SMOKE": "1", "PYTHONPATH": str(REPO),
           "GPU_SESSION_LEDGER": str(ledger or tmp_path / "no-ledger.json")}
    proc = subprocess.run(["bash", str(SESSION), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    return proc, out


def test_every_stage_runs_failures_are_recorded_and_nothing_large_comes_back(tmp_path):
    proc, out = run_session(tmp_path, "45")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.md").read_text()
    assert "## 10_ok: ok in" in summary and "## 20_fails: failed (exit 3)" in summary
    assert "## 30_hangs: timed out after" in summary
    assert "## 40_big: ok" in summary and "smoke=1" in summary  # a stage after a hang still ran
    log = (out / "session.log").read_text()
    assert "stage-ten-ran" in log and "about to fail" in log
    # Stage directories come back as they are (a kill keeps them), small: logs cut, big files dropped.
    assert (out / "stages" / "10_ok" / "budget.txt").is_file() and (out / "stages" / "30_hangs" / "stage.log").is_file()
    assert not (out / "stages" / "40_big" / "weights.bin").exists()
    assert (out / "stages" / "40_big" / "run.log").stat().st_size == 256 * 1024
    assert not list(out.glob("*.tar.gz"))
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) < MAX_OUT_BYTES
    # The ledger: what was measured (the hanging stage's item before it hung too), what is owed.
    ledger = json.loads((out / "ledger.json").read_text())
    assert sorted(ledger["measured"]) == ["10_ok/first", "10_ok/second", "30_hangs/before-the-hang"]
    assert set(ledger["owed"]) == {"20_fails/*", "30_hangs/*"}
    assert "== still owed (2):" in proc.stdout and "30_hangs/*: stage timed out" in proc.stdout


def test_a_later_session_at_the_same_code_runs_only_what_is_owed(tmp_path):
    first, out = run_session(tmp_path, "30", "10_ok")
    assert first.returncode == 0 and first.stdout.count("ran ") == 2
    second, _ = run_session(tmp_path, "30", "10_ok", ledger=out / "ledger.json", out_name="again")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "ran " not in second.stdout and second.stdout.count("measured in an earlier session") == 2
    assert "2 items already measured at this code" in second.stdout
    ledger = json.loads((tmp_path / "again" / "ledger.json").read_text())
    assert sorted(ledger["measured"]) == ["10_ok/first", "10_ok/second"] and ledger["owed"] == {}


def test_budgets_shift_to_later_stages_when_a_stage_ends_early(tmp_path):
    proc, out = run_session(tmp_path, "40", "10_ok", "40_big")
    assert proc.returncode == 0, proc.stderr
    first = int((out / "stages" / "10_ok" / "budget.txt").read_text().split("=")[1])
    assert first <= (40 - 1) * 60 // 120 - 1  # its nominal share of what is left after the header, less grace
    second = int(proc.stdout.split("== stage 40_big (budget ")[1].split()[0])
    assert second > first  # what 10_ok did not use


def test_the_real_stages_are_scripts_the_session_can_name():
    stages = sorted((REPO / "benchmarks" / "gpu_stages").glob("[0-9]*.sh"))
    assert [s.stem for s in stages] == ["10_trainer_cuda", "20_throughput", "30_sampler_mix", "40_track",
                                        "50_single_gpu", "60_long_share"]
    for stage in stages:
        assert "GPU_SESSION_SMOKE" in stage.read_text(), f"{stage.name} has no CPU smoke mode"


def test_a_leftover_stage_takes_only_what_the_stages_before_it_leave():
    """60_long_share counts in no earlier stage's share: adding it left the first five budgets as they were."""
    def budgets(*stages: str) -> dict[str, int]:
        out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh"), "--budgets", "480", *stages],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
        return {name: int(budget) for name, budget in (line.split() for line in out.splitlines())}

    every = budgets()
    first_five = budgets("10_trainer_cuda", "20_throughput", "30_sampler_mix", "40_track", "50_single_gpu")
    assert list(every) == [*first_five, "60_long_share"]
    assert {name: every[name] for name in first_five} == first_five
    assert every["60_long_share"] < 10  # a session whose stages take their full shares leaves it nothing
