"""`make test`: the test suite as pytest processes side by side, so that both of CI's two cores work.

Most in-process tests are bound by Python and keep one core busy, and so does a training process with
one thread; run one after another, the suite leaves a core idle for much of its time. The modules
are split in groups that run at once:

- LAUNCHING: the modules that start trainings through launchers (`vggt-fsdp train`, `accelerate
  launch`, torchrun, the GPU stages' smoke runs). They stay in one group, run one at a time, because
  single-node launchers rendezvous on Accelerate's and torch's default port 29500.
- CLUSTER: the modules that start a real service and mostly wait on it (test_slurm_cluster: a SLURM
  whose requeued job waits before it starts again). A process of their own, so that the waiting
  overlaps the other groups' work; what they run is small (a few tiny steps).
- every other module: in-process tests, and ranks started with mp.spawn on a free port of their own.

Each process runs with one intra-op thread (OMP_NUM_THREADS=1). Arguments are passed to every pytest
process (`-m "not slow"`, `-x`, `-k ...`); a group none of whose tests is selected is not an error. The
exit status is the worst of them. `python -m pytest` still runs the whole suite in one process.

    python tests/run_suite.py [PYTEST_ARGS ...]
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
LAUNCHING = {
    "test_cli", "test_context_train", "test_data_mixture", "test_gpu_session", "test_gpu_stages_smoke",
    "test_integrity", "test_launch", "test_lock", "test_multinode", "test_offload", "test_own_model",
    "test_packaging", "test_slurm", "test_tasks", "test_train_e2e",
}
CLUSTER = {"test_slurm_cluster"}
NO_TESTS_COLLECTED = 5  # pytest's exit status when a selection leaves a group empty


def groups() -> dict[str, list[Path]]:
    modules = sorted(TESTS.glob("test_*.py"))
    return {"launching": [m for m in modules if m.stem in LAUNCHING],
            "cluster": [m for m in modules if m.stem in CLUSTER],
            "in-process": [m for m in modules if m.stem not in LAUNCHING | CLUSTER]}


def main(argv: list[str]) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    started = time.monotonic()
    runs = {}
    for name, modules in groups().items():
        log = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, "-m", "pytest", *argv, *map(str, modules)]
        runs[name] = (subprocess.Popen(command, cwd=TESTS.parent, env=env, stdout=log, stderr=subprocess.STDOUT),
                      log)
    codes = {}
    for name, (proc, log) in runs.items():
        codes[name] = proc.wait()
        log.seek(0)
        print(f"{'=' * 30} {name} modules (exit {codes[name]}) {'=' * 30}\n{log.read()}", flush=True)
    codes = {name: 0 if code == NO_TESTS_COLLECTED else code for name, code in codes.items()}
    print(f"[run_suite] all groups done in {time.monotonic() - started:.0f} s: "
          + ", ".join(f"{name} exit {code}" for name, code in codes.items()))
    return max(codes.values())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
