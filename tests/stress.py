"""The stress check of the timing-sensitive tests: stop signals, locks, kill -9 and launchers.

Their outcome depends on when a signal lands and how fast processes start, so one green run proves
little. This runs each group's tests again and again, each time in a fresh pytest process, while busy
processes keep every core working, and counts the runs that passed. A failed run's output is kept.
Run it before changing vggt_fsdp/train/faults.py, lock.py, commands/train.py, tests/processes.py or the
signal and lock tests; all runs must pass. It is not part of `make test` (20 runs of the start-up group
take about 10 minutes on 2 busy cores).

    python tests/stress.py                          # start-up signal cases of test_integrity.py, 20 runs
    python tests/stress.py --group launcher --runs 5  # vggt-fsdp train signalled, kill -9 of its group
    python tests/stress.py --group all --hogs 0     # every group, on a machine that is busy already

Prints one line per run (group, run, passed or FAILED, seconds, the load average) and the counts.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing import Process
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# group -> pytest arguments
GROUPS: dict[str, list[str]] = {
    # test_integrity.py's stop signals during start-up, direct and in this process (issue 23's cases)
    "startup": ["test_integrity.py", "-k", "sigterm_during_startup or start_up_signal or hand_over or adopted or "
                "after_a_start_up or launcher_is_gone"],
    # `vggt-fsdp train` signalled, kill -9 of the launcher's group
    "launcher": ["test_integrity.py", "-k", "vggt_fsdp_train_exits or kill_9"],
    "lock": ["test_lock.py"],
}


def _hog() -> None:
    while True:
        pass


def run_group(name: str, runs: int, keep: Path) -> int:
    """Runs the group `runs` times in a row; returns how many passed."""
    passed = 0
    for index in range(1, runs + 1):
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                 *GROUPS[name]], cwd=TESTS, capture_output=True, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS.parent)))
        ok = result.returncode == 0
        passed += ok
        if not ok:
            (keep / f"{name}-{index}.txt").write_text(result.stdout + result.stderr)
        print(f"{name} run {index}/{runs}: {'passed' if ok else 'FAILED'} in {time.monotonic() - started:.0f} s "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", choices=[*GROUPS, "all"], default="startup")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2,
                        help="busy processes beside the tests (default: one per core; 0 on a busy machine)")
    args = parser.parse_args(argv)
    keep = Path(tempfile.mkdtemp(prefix="vggt-fsdp-stress-"))
    hogs = [Process(target=_hog, daemon=True) for _ in range(args.hogs)]
    for hog in hogs:
        hog.start()
    counts = {}
    try:
        for name in GROUPS if args.group == "all" else [args.group]:
            counts[name] = run_group(name, args.runs, keep)
    finally:
        for hog in hogs:
            hog.terminate()
            hog.join()
    for name, passed in counts.items():
        print(f"{name}: {passed}/{args.runs} runs passed beside {args.hogs} hog(s)")
    failed = sum(args.runs - passed for passed in counts.values())
    if failed:
        print(f"the failed runs' output: {keep}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
