"""One trainer per output directory: the lock's states as a table, in this process, and two real
trainers started on one directory."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from processes import finish, start, wait_for

from vggt_fsdp.train.faults import PREEMPTED, STATUS_ENV
from vggt_fsdp.train.lock import LOCK_NAME, Holder, LockError, RunLock, check_free

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _live_other() -> tuple[int, float]:
    parent = psutil.Process(os.getppid())
    return parent.pid, parent.create_time()


# Who holds the lock already -> "taken" (with why the old lock was stale) or "refused" (with a phrase
# of the message). Each holder is a function of monkeypatch (for SLURM's environment).
def _holder(**fields) -> Holder:
    pid, started = _live_other()
    base = dict(host=socket.gethostname(), pid=pid, pid_started=started, since=time.time() - 60)
    return Holder(**{**base, **fields})


CASES = {
    "a live trainer on this host": (lambda mp: _holder(), "refused", "is in use by another trainer (PID"),
    "a dead trainer on this host": (lambda mp: _holder(pid=_dead_pid()), "taken", "runs on"),
    "a reused PID": (lambda mp: _holder(pid_started=1.0), "taken", "is now another process"),
    "a trainer on another host": (lambda mp: _holder(host="elsewhere"), "refused",
                                  "cannot be checked from"),
    "an earlier run of this SLURM job": (
        lambda mp: (mp.setenv("SLURM_JOB_ID", "77"), mp.setenv("SLURM_RESTART_COUNT", "1"),
                    _holder(host="elsewhere", slurm_job="77", slurm_restart="0"))[-1],
        "taken", "SLURM job 77 was requeued"),
    "another SLURM job on another host": (
        lambda mp: (mp.setenv("SLURM_JOB_ID", "78"), _holder(host="elsewhere", slurm_job="77", slurm_restart="0"))[-1],
        "refused", "SLURM job 77"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lock_held_before(case, tmp_path, monkeypatch):
    make, expected, phrase = CASES[case]
    holder = make(monkeypatch)
    (tmp_path / LOCK_NAME).write_text(json.dumps(holder.__dict__))
    lock = RunLock(tmp_path)
    if expected == "refused":
        with pytest.raises(LockError) as info:
            lock.acquire()
        message = str(info.value)
        assert phrase in message and str(tmp_path) in message and f"PID {holder.pid}" in message
        assert Holder(**json.loads((tmp_path / LOCK_NAME).read_text())) == holder  # untouched
        assert check_free(tmp_path) == message
    else:
        assert check_free(tmp_path) is None
        lock.acquire()
        assert phrase in lock.took_over
        assert Holder(**json.loads((tmp_path / LOCK_NAME).read_text())).pid == os.getpid()
        lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ([LOCK_NAME] if expected == "refused" else [])


def test_acquire_and_release(tmp_path):
    out = tmp_path / "new" / "run"
    with RunLock(out) as lock:
        held = Holder(**json.loads((out / LOCK_NAME).read_text()))
        assert (held.pid, held.host) == (os.getpid(), socket.gethostname()) and held.token == lock.holder.token
        with pytest.raises(LockError, match="already held by this process"):
            RunLock(out).acquire()
    assert not (out / LOCK_NAME).exists()


def test_a_closed_lock_is_released_and_never_taken_again(tmp_path):
    """What a trainer ending itself early does (faults.py), possibly from another thread while the main
    thread is about to take the lock: after close() the directory stays free."""
    lock = RunLock(tmp_path).acquire()
    lock.close()
    assert not (tmp_path / LOCK_NAME).exists()
    with pytest.raises(LockError, match="is stopping"):
        lock.acquire()
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("held", [True, False])
def test_last_words_run_only_for_a_held_lock_even_while_its_acquire_is_in_flight(tmp_path, monkeypatch, held):
    """A start-up stop on another thread can come the moment the lock file appears, before acquire() has
    recorded the holder: close() waits for that acquire, so the stop's marker is still written."""
    import threading

    lock, created, words = RunLock(tmp_path), threading.Event(), []
    if held:
        make = RunLock._create

        def slow_create(self, me):  # the file exists; the holder is recorded only after a pause
            made = make(self, me)
            created.set()
            time.sleep(0.3)
            return made

        monkeypatch.setattr(RunLock, "_create", slow_create)
        acquiring = threading.Thread(target=lock.acquire)
        acquiring.start()
        assert created.wait(10)
    lock.close(last_words=lambda: words.append(lock.holder is not None))
    if held:
        acquiring.join(10)
    assert words == ([True] if held else [])
    assert not (tmp_path / LOCK_NAME).exists()


def test_release_never_removes_another_trainers_lock(tmp_path):
    lock = RunLock(tmp_path).acquire()
    other = _holder()
    (tmp_path / LOCK_NAME).write_text(json.dumps(other.__dict__))  # someone replaced it meanwhile
    lock.release()
    assert Holder(**json.loads((tmp_path / LOCK_NAME).read_text())) == other


def test_unreadable_lock_says_how_to_remove_it(tmp_path):
    (tmp_path / LOCK_NAME).write_text("{garbage")
    with pytest.raises(LockError, match=f"unreadable .*rm {tmp_path / LOCK_NAME}"):
        RunLock(tmp_path).acquire()


def test_a_second_trainer_on_the_same_directory_exits_at_once(tmp_path):
    """Trainer A runs; B on A's output_dir stops with A's PID in its message and writes nothing; A goes
    on undisturbed and stops cleanly when told to."""
    out = tmp_path / "run"
    common = [sys.executable, "-m", "vggt_fsdp.train", str(REPO / "recipes" / "cpu_tiny.yaml"),
              "data.image_width=56", "data.frames_range=[2,3]", "data.frames_per_gpu=3", "data.num_workers=0",
              "train.log_every=1", "train.progress_bar=false", "train.checkpoint_every=0", f"train.output_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    status = tmp_path / "status.json"  # what rank 0 tells `vggt-fsdp train` (faults.write_status)
    a = start([*common, "train.max_steps=100000"], {**env, STATUS_ENV: str(status)})
    try:
        wait_for((out / "metrics.jsonl").is_file, 180, "trainer A trains", a)
        started = time.perf_counter()
        b = subprocess.run([*common, "train.max_steps=5"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
        b_seconds = time.perf_counter() - started
        assert a.poll() is None, "trainer A stopped"
        a.send_signal(signal.SIGTERM)
    finally:
        a_err = finish(a, 180).stderr
    assert b.returncode == 1 and "Traceback" not in b.stderr
    assert f"train.output_dir {out} is in use by another trainer (PID {a.pid} on host" in b.stderr
    # B stops at the lock, right after its process group: before building the model (whose size line
    # it would print). Its time is mostly Python importing torch (seconds; more on a loaded machine).
    assert "trainable parameters" not in b.stderr and "trainable parameters" in a_err
    print(f"second trainer exited after {b_seconds:.1f} s")
    assert a.returncode == 0, a_err[-3000:]
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert steps == list(range(1, len(steps) + 1))  # A's records only, none interleaved
    assert "max_steps: 100000" in (out / "recipe.yaml").read_text()
    assert not (out / LOCK_NAME).exists()  # A released it
    preempted = json.loads((out / "preempted.json").read_text())
    assert json.loads(status.read_text()) == {"state": PREEMPTED, **preempted} and preempted["step"] >= 1
