"""Nothing lost, nothing silently wrong: damaged checkpoints are named and skipped, non-finite weights
are never loaded, saved or exported, and a run ending in non-finite steps fails.

Most cases run in this process (DCP and the checkpoint code work without a process group); two use
the 2-rank toy trainer of test_train_core (a rank file missing on one rank, a final non-finite run).
The damage cases are a table: one line per way a checkpoint breaks.

Signals and exit codes: a stop signal during start-up ends a trainer with code 0 and no traceback;
`vggt-fsdp train` exits as README's exit-code table says in each signal case (the table is
faults.EXIT_CODES); a kill -9 of the launcher's process group leaves no trainer alive after 10 s. These
tests wait on conditions, never for a time; `python tests/stress.py` runs them repeatedly beside CPU
hogs, the check to run before changing them or the code they cover.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from processes import alive, finish, start, trainers, wait_for
from torch import nn

from vggt_fsdp.train import checkpoint as ckpt
from vggt_fsdp.train import faults
from vggt_fsdp.train.faults import EXIT_OK
from vggt_fsdp.train.integrity import NonFiniteWeightsError, checksum_files, nonfinite_names, verify_files
from vggt_fsdp.train.lock import LOCK_NAME
from vggt_fsdp.train.metrics import read_metrics, truncate_metrics

REPO = Path(__file__).resolve().parents[1]
# DCP without a process group says it assumes one process: the intent here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.aggregator = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16))
        self.depth_head = nn.Linear(16, 3)


def _train_state(model: nn.Module, step: int, max_steps: int = 10) -> tuple[torch.optim.Optimizer, ckpt.TrainState]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / max_steps)
    for _ in range(step):  # real optimizer state, and the scheduler at `step`
        model.depth_head(model.aggregator(torch.randn(4, 6))).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return optimizer, ckpt.TrainState(step=step, scheduler=scheduler, max_steps=max_steps)


def _save(root: Path, step: int, model: nn.Module | None = None, **kwargs) -> tuple[Path, dict]:
    torch.manual_seed(step)
    model = model or Toy()
    optimizer, state = _train_state(model, step, **kwargs)
    path = ckpt.save_checkpoint(root, model, optimizer, state, torch.device("cpu"), keep_last=0)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def two_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    first, weights1 = _save(root, 1)
    second, _ = _save(root, 2)
    return root, first, second, weights1


def _shard(path: Path) -> Path:
    return next(path.glob("__0_*.distcp"))


def _flip(path: Path, offset: int = 0, count: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_from_manifest(path: Path, name: str) -> None:
    marker = json.loads((path / ckpt.MARKER).read_text())
    del marker["files"][name]
    (path / ckpt.MARKER).write_text(json.dumps(marker))


# How a checkpoint breaks -> a phrase the report must contain (besides the checkpoint's path).
DAMAGE = {
    "flipped bytes in a shard": (lambda d: _flip(_shard(d), offset=100), "differ from their checksum"),
    "truncated shard": (lambda d: os.truncate(_shard(d), _shard(d).stat().st_size // 2), "(truncated)"),
    "empty shard": (lambda d: _shard(d).write_bytes(b""), "(truncated)"),
    "missing rank file": (lambda d: (d / "rank00000.pt").unlink(), "rank00000.pt is missing"),
    "flipped bytes in a rank file": (lambda d: _flip(d / "rank00000.pt", offset=50, count=8), "rank00000.pt: 1 block"),
    "missing .metadata": (lambda d: (d / ".metadata").unlink(), ".metadata is missing"),
    "corrupt COMPLETE marker": (lambda d: (d / ckpt.MARKER).write_text('{"step": 2, "world'), "unreadable"),
    "empty COMPLETE marker": (lambda d: (d / ckpt.MARKER).write_text(""), "unreadable"),
    "marker without its fields": (lambda d: (d / ckpt.MARKER).write_text("[1, 2]"), "lacks step, world_size"),
    "a file record without its size": (lambda d: (d / ckpt.MARKER).write_text(json.dumps(
        {"step": 2, "world_size": 1, "files": {".metadata": {"crc32": []}}})), "lacks step, world_size"),
    "rank file not in the manifest": (lambda d: _drop_from_manifest(d, "rank00000.pt"),
                                      "rank00000.pt is not in the COMPLETE manifest"),
}


def test_an_intact_checkpoint_records_every_file(two_checkpoints):
    root, first, second, _ = two_checkpoints
    marker = ckpt.read_marker(second)
    on_disk = {p.name for p in second.iterdir() if p.name != ckpt.MARKER}
    assert set(marker["files"]) == on_disk and {".metadata", "rank00000.pt"} <= on_disk
    for name, record in marker["files"].items():
        assert record["size"] == (second / name).stat().st_size and record["crc32"]
    assert ckpt.checkpoint_problems(second) == []
    assert ckpt.agreed_resume("auto", root) == second


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_is_named_and_auto_resume_falls_back(two_checkpoints, case, capsys):
    root, first, second, weights1 = two_checkpoints
    damage, phrase = DAMAGE[case]
    damage(second)
    problems = ckpt.checkpoint_problems(second)
    assert any(phrase in p for p in problems), problems
    assert ckpt.agreed_resume("auto", root) == first
    err = capsys.readouterr().err
    assert f"checkpoint {second} is damaged" in err and f"falling back to {first}" in err and phrase in err
    # Named explicitly, a damaged checkpoint stops the run (no silent substitute).
    with pytest.raises(ckpt.CheckpointError, match="is damaged") as info:
        ckpt.agreed_resume(str(second), root)
    assert str(second) in str(info.value) and phrase in str(info.value)


def test_the_fallback_resumes_the_intact_weights(two_checkpoints):
    root, first, second, weights1 = two_checkpoints
    _flip(_shard(second), offset=0, count=1 << 20)
    path = ckpt.agreed_resume("auto", root)
    model = Toy()
    optimizer, state = _train_state(model, 0)
    ckpt.load_checkpoint(path, model, optimizer, state, torch.device("cpu"))
    assert state.step == 1
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights1[name]), name


def test_no_intact_checkpoint_left_stops_with_each_named(two_checkpoints):
    root, first, second, _ = two_checkpoints
    DAMAGE["truncated shard"][0](first)
    DAMAGE["corrupt COMPLETE marker"][0](second)
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint") as info:
        ckpt.agreed_resume("auto", root)
    assert str(first) in str(info.value) and str(second) in str(info.value)
    assert "train.resume=none" in str(info.value)


def test_export_refuses_a_damaged_checkpoint_and_the_command_falls_back(two_checkpoints, tmp_path, capsys):
    from vggt_fsdp.commands.export import find_checkpoint

    root, first, second, weights1 = two_checkpoints
    _flip(_shard(second), offset=100)
    out = tmp_path / "model.safetensors"
    with pytest.raises(ckpt.CheckpointError, match="differ from their checksum"):
        ckpt.export_safetensors(second, out)
    assert not out.exists()
    assert find_checkpoint(root.parent) == first
    assert f"checkpoint {second} is damaged" in capsys.readouterr().err
    with pytest.raises(ckpt.CheckpointError):
        find_checkpoint(second)


def test_block_checksums_name_the_damaged_range(tmp_path, monkeypatch):
    from vggt_fsdp.train import integrity

    monkeypatch.setattr(integrity, "BLOCK_BYTES", 1024)
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(10_000))
    records = checksum_files([path], threads=3)
    assert len(records["data.bin"]["crc32"]) == 10  # ceil(10000 / 1024) blocks
    assert verify_files(tmp_path, records) == []
    _flip(path, offset=5000, count=1)
    assert verify_files(tmp_path, records) == [
        "data.bin: 1 block(s) of bytes 4,096-5,120 differ from their checksum (the bytes changed after they "
        "were written)"]


# ------------------------------------------------------------------------------------- finite weights
def _poison(model: nn.Module) -> None:
    with torch.no_grad():
        model.depth_head.weight[0, 0] = float("nan")
        model.aggregator[1].bias[2] = float("inf")


def test_nonfinite_names_lists_exactly_the_bad_tensors():
    model = Toy()
    assert nonfinite_names(model.named_parameters()) == []
    _poison(model)
    assert nonfinite_names(model.named_parameters()) == ["aggregator.1.bias", "depth_head.weight"]
    assert nonfinite_names([("empty", torch.empty(0)), ("ints", torch.zeros(3, dtype=torch.int64))]) == []


def test_save_refuses_nonfinite_weights_and_writes_nothing(tmp_path):
    model = Toy()
    optimizer, state = _train_state(model, 1)
    _poison(model)
    with pytest.raises(NonFiniteWeightsError, match="depth_head.weight") as info:
        ckpt.save_checkpoint(tmp_path / "checkpoints", model, optimizer, state, torch.device("cpu"), keep_last=0)
    assert "aggregator.1.bias" in str(info.value) and "not written" in str(info.value)
    assert not (tmp_path / "checkpoints").exists()


@pytest.fixture
def nan_checkpoint(tmp_path, monkeypatch):
    """A checkpoint holding NaN weights (its save bypasses the check): how a legacy or hand-edited
    checkpoint could look."""
    model = Toy()
    optimizer, state = _train_state(model, 1)
    _poison(model)
    monkeypatch.setattr(ckpt, "check_finite", lambda *a, **k: None)
    path = ckpt.save_checkpoint(tmp_path / "checkpoints", model, optimizer, state, torch.device("cpu"), keep_last=0)
    monkeypatch.undo()
    return path


def test_resume_refuses_nonfinite_weights_with_their_names(nan_checkpoint):
    model = Toy()
    optimizer, state = _train_state(model, 0)
    with pytest.raises(NonFiniteWeightsError, match="depth_head.weight") as info:
        ckpt.load_checkpoint(nan_checkpoint, model, optimizer, state, torch.device("cpu"))
    assert str(nan_checkpoint) in str(info.value)


def test_export_refuses_nonfinite_weights(nan_checkpoint, tmp_path):
    out = tmp_path / "model.safetensors"
    with pytest.raises(NonFiniteWeightsError, match="not exported"):
        ckpt.export_safetensors(nan_checkpoint, out)
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_initial_weights_with_nan_are_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    from vggt_fsdp.tasks.vggt import InitWeightsError, load_initial_weights

    source = Toy()
    _poison(source)
    path = tmp_path / "init.safetensors"
    save_file(source.state_dict(), str(path))
    with pytest.raises(InitWeightsError, match=r"2 tensor\(s\): aggregator.1.bias, depth_head.weight"):
        load_initial_weights(Toy(), str(path))


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_export_is_readable_as_the_umask_allows(two_checkpoints, tmp_path, umask, mode):
    root, first, second, _ = two_checkpoints
    old = os.umask(umask)
    try:
        ckpt.export_safetensors(second, tmp_path / "model.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == mode


# ------------------------------------------------------------------------------------- resume details
def test_a_changed_max_steps_is_said_with_the_lr_jump(tmp_path):
    path, _ = _save(tmp_path / "checkpoints", 4, max_steps=10)
    model = Toy()
    optimizer, state = _train_state(model, 0, max_steps=20)
    notices = ckpt.load_checkpoint(path, model, optimizer, state, torch.device("cpu"))
    assert len(notices) == 1 and "train.max_steps changed from 10 (the checkpoint's) to 20" in notices[0]
    assert "lr at step 5: 0.006 before, 0.008 now" in notices[0]  # 1e-2 * (1 - 4/10) vs (1 - 4/20)
    same = Toy()
    optimizer, state = _train_state(same, 0, max_steps=10)
    assert ckpt.load_checkpoint(path, same, optimizer, state, torch.device("cpu")) == []


def test_metrics_are_truncated_to_the_resumed_step(tmp_path):
    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}, {"step": 2, "val": {"loss": 1.1}},
             {"step": 3, "loss": 0.8}, {"step": 4, "loss": 0.7}]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 5, "lo'  # the crash cut the last line
    (tmp_path / "metrics.jsonl").write_text(text)
    assert truncate_metrics(tmp_path, 2) == 3
    assert read_metrics(tmp_path / "metrics.jsonl") == lines[:3]
    discarded = (tmp_path / "metrics-discarded.jsonl").read_text().splitlines()
    assert [json.loads(d)["step"] for d in discarded[:2]] == [3, 4] and discarded[2] == '{"step": 5, "lo'
    assert truncate_metrics(tmp_path, 2) == 0  # nothing left to move


# ------------------------------------------------------------------------------------- 2 ranks
def test_missing_rank_file_falls_back_on_every_rank_and_reruns_exactly(tmp_path, capfd):
    from test_train_core import run_toy

    run_toy(tmp_path, max_steps=4, checkpoint_every=2, keep_last=0)
    (tmp_path / "checkpoints" / "step-0000004" / "rank00001.pt").unlink()
    capfd.readouterr()
    result = run_toy(tmp_path, max_steps=4, checkpoint_every=2, keep_last=0)
    err = capfd.readouterr().err
    for rank in (0, 1):
        assert f"[vggt-fsdp rank {rank}] warning: checkpoint {tmp_path / 'checkpoints' / 'step-0000004'} is damaged" in err
    assert "rank00001.pt is missing" in err and "resumed from" in err and "step-0000002 at step 2" in err
    assert result["step"] == 4 and result["error"] is None
    # Steps 3-4 ran again from step 2: the same losses as the first time (kept aside by the truncation).
    again = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")}
    first = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "metrics-discarded.jsonl")}
    assert sorted(again) == [1, 2, 3, 4] and sorted(first) == [3, 4]
    assert all(again[s] == first[s] for s in (3, 4))


def test_a_run_ending_in_nonfinite_steps_fails_and_names_the_last_good_checkpoint(tmp_path):
    from test_train_core import run_toy

    # Step 4 is non-finite: its checkpoint is postponed to step 5. Step 6, the last, is non-finite too.
    result = run_toy(tmp_path, nan_steps=(4, 6), max_steps=6, checkpoint_every=2, keep_last=0,
                     max_nonfinite_in_row=3)
    assert result["error"] is not None
    assert "ended inside 1 non-finite step(s) in a row (steps 6-6" in result["error"]
    assert f"last good checkpoint is {tmp_path / 'checkpoints' / 'step-0000005'}" in result["error"]
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path / "checkpoints")] == [2, 5]
    assert all(torch.isfinite(v).all() for v in result["params"].values())


def test_nan_initial_weights_exit_nonzero_and_export_nothing(tmp_path):
    """The real entry point, one process: refused while loading, named, exit 1, nothing written."""
    from safetensors.torch import save_file

    from vggt_fsdp.model import build_model
    from vggt_fsdp.recipe import load_recipe, model_config

    recipe = REPO / "recipes" / "cpu_tiny.yaml"
    weights = build_model(model_config(load_recipe(recipe).model)).state_dict()
    weights["aggregator.camera_token"][0, 0, 0, :3] = float("nan")
    init = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(init))
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "vggt_fsdp.train", str(recipe), f"model.init_weights={init}", f"train.output_dir={out}",
         "train.max_steps=2", "data.image_width=56", "data.frames_range=[2,3]", "data.frames_per_gpu=3",
         "train.progress_bar=false"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "holds NaN or Inf in 1 tensor(s): aggregator.camera_token" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "model.safetensors").exists() and not (out / "checkpoints").exists()


# ------------------------------------------------------------------------------------- signals, exit codes
# The signal cases below are timing-sensitive: before changing faults.py, lock.py, commands/train.py or
# these tests, run `python tests/stress.py` (each case 20 times in a row beside a CPU hog; see there).
SMALL = ["data.image_width=56", "data.frames_range=[2,3]", "data.frames_per_gpu=3", "data.num_workers=0",
         "train.progress_bar=false"]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _sigterm_held(pid: int) -> bool:
    """SIGTERM blocked (the trainer imports) or caught (its start-up handler is in place): from here a
    SIGTERM lands in start-up. The blocked window alone can be shorter than a loaded test's polling."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    masks = [int(line.split()[1], 16) for line in status if line.startswith(("SigBlk:", "SigCgt:"))]
    return any(mask & (1 << (signal.SIGTERM - 1)) for mask in masks)


@pytest.mark.parametrize("when", ["importing", "after the lock"])
def test_sigterm_during_startup_exits_zero_and_leaves_nothing(tmp_path, when):
    """A SIGTERM while Python imports torch (held until the handler is in place; or just after) or while
    the model is built (after the lock was taken) ends the trainer with code 0, its lock released, nothing trained,
    and no traceback: the handler raises nothing into whatever code runs at that moment."""
    out, status = tmp_path / "run", tmp_path / "status.json"
    proc = start([sys.executable, "-m", "vggt_fsdp.train", str(REPO / "recipes" / "cpu_tiny.yaml"), *SMALL,
                  f"train.output_dir={out}"], {**_env(), faults.STATUS_ENV: str(status)})
    try:
        ready = (lambda: _sigterm_held(proc.pid)) if when == "importing" else (out / LOCK_NAME).is_file
        wait_for(ready, 180, f"trainer {when}", proc, interval=0.002)
        proc.send_signal(signal.SIGTERM)
    finally:
        result = finish(proc, 180)
    assert result.returncode == EXIT_OK, result.stderr[-3000:]
    assert "stopped by signal 15 during start-up: nothing was trained" in result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert not (out / LOCK_NAME).exists() and not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert json.loads(status.read_text())["state"] == faults.STOPPED  # what `vggt-fsdp train` reads
    if when == "after the lock":  # the trainer held the directory: it says what happened there
        assert json.loads((out / "preempted.json").read_text()) == {"step": None, "checkpoint": None}


def _launcher_started(proc):
    def started() -> bool:
        try:
            return any("accelerate.commands.launch" in p.cmdline() for p in psutil.Process(proc.pid).children())
        except psutil.Error:  # gone meanwhile: wait_for says so
            return False
    return started


# When `vggt-fsdp train` gets SIGTERM -> what it must wait for first, the exit code and what it says.
TRAIN_SIGNAL_CASES = {
    "while the launcher imports": (_launcher_started, EXIT_OK, "during start-up: nothing was trained"),
    "while the trainers start": (lambda proc: lambda: trainers(proc.pid), EXIT_OK, "during start-up: nothing was trained"),
}


@pytest.mark.parametrize("case", list(TRAIN_SIGNAL_CASES))
def test_sigterm_to_vggt_fsdp_train_exits_as_documented(tmp_path, case):
    ready, code, phrase = TRAIN_SIGNAL_CASES[case]
    out = tmp_path / "run"
    proc = start([sys.executable, "-m", "vggt_fsdp.cli", "train", str(REPO / "recipes" / "cpu_tiny.yaml"), *SMALL,
                  f"train.output_dir={out}"], _env())
    try:
        wait_for(ready(proc), 180, case, proc, interval=0.002)
        proc.send_signal(signal.SIGTERM)  # to the command only: it passes the signal on
    finally:
        result = finish(proc, 180)
    assert result.returncode == code, result.stderr[-3000:]
    assert phrase in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (out / LOCK_NAME).exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize("target", ["the process group", "vggt-fsdp train alone"])
def test_kill_9_of_the_launcher_ends_every_trainer_within_10_s(tmp_path, target):
    """torch elastic starts each training process in a session of its own: a kill of the launcher's
    process group does not reach them. They watch their launcher and end, the lock released. Killed
    alone, `vggt-fsdp train` takes the launcher with it (PR_SET_PDEATHSIG), and so its trainers."""
    out = tmp_path / "run"
    proc = start([sys.executable, "-m", "vggt_fsdp.cli", "train", str(REPO / "recipes" / "cpu_tiny.yaml"), *SMALL,
                  "train.max_steps=100000", "train.checkpoint_every=0", f"train.output_dir={out}"], _env())
    try:
        wait_for((out / LOCK_NAME).is_file, 180, "the trainers took the lock", proc)
        workers = wait_for(lambda: len(trainers(proc.pid)) == 2 and trainers(proc.pid), 60, "two trainers")
        if target == "the process group":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        killed = time.monotonic()
        proc.communicate(timeout=60)  # the pipes close when the last trainer ends
        wait_for(lambda: not alive(workers), 10, "every trainer ended")
        print(f"trainers ended {time.monotonic() - killed:.1f} s after the kill")
    finally:
        for worker in alive(trainers(proc.pid) if proc.poll() is None else []):
            worker.kill()
    assert not (out / LOCK_NAME).exists()


def _status(tmp_path, state: str | None) -> Path:
    path = tmp_path / "status.json"
    if state is not None:
        path.write_text(json.dumps({"state": state, "step": 7, "checkpoint": "/x/step-0000007"}))
    return path


# (launcher's returncode, signal this command passed on, rank 0's last state) -> exit code, phrase
EXIT_CASES = [
    (0, None, faults.FINISHED, EXIT_OK, ""),
    (1, None, faults.TRAINING, faults.EXIT_FAILED, ""),  # no signal: a failure stands
    (-9, None, faults.TRAINING, 137, ""),  # the launcher killed: 128+N
    (-15, signal.SIGTERM, None, EXIT_OK, "during start-up: nothing was trained"),  # before any trainer ran
    (1, signal.SIGTERM, faults.STARTING, EXIT_OK, "during start-up: nothing was trained"),
    (1, signal.SIGTERM, faults.STOPPED, EXIT_OK, "during start-up: nothing was trained"),
    (1, signal.SIGTERM, faults.PREEMPTED, EXIT_OK, "preempted at step 7; checkpoint /x/step-0000007 saved"),
    (143, signal.SIGTERM, faults.FINISHED, EXIT_OK, "finished (step 7"),  # signalled during the export
    (1, signal.SIGTERM, faults.TRAINING, faults.EXIT_FAILED, ""),  # signalled, but no clean stop recorded
    (-9, signal.SIGTERM, faults.TRAINING, 137, ""),
]


@pytest.mark.parametrize("returncode,signalled,state,expected,phrase", EXIT_CASES)
def test_train_command_exit_code(tmp_path, capsys, returncode, signalled, state, expected, phrase):
    from vggt_fsdp.commands.train import _exit_code

    assert _exit_code(returncode, signalled, _status(tmp_path, state)) == expected
    err = capsys.readouterr().err
    assert (phrase in err) if phrase else err == ""


def test_readme_exit_code_table_is_the_codes():
    """README.md's one table of exit codes is faults.EXIT_CODES, row for row."""
    text = (REPO / "README.md").read_text()
    assert text.count("| exit code | meaning |") == 1
    table = text[text.index("| exit code | meaning |"):].split("\n\n")[0].strip()
    assert table == faults.exit_code_table()
    assert {faults.EXIT_OK, faults.EXIT_FAILED, faults.EXIT_REFUSED} == {int(c) for c in faults.EXIT_CODES if c.isdigit()}


@pytest.fixture
def early_exit(monkeypatch):
    """faults' early exit, recorded instead of ending this process: [(code, message)], and the clean-ups
    it ran, [why]."""
    exits, cleanups = [], []
    monkeypatch.setattr(faults, "_exit", lambda code: exits.append(code))
    monkeypatch.setattr(faults, "_cleanups", [cleanups.append])
    previous = signal.getsignal(signal.SIGTERM)
    yield exits, cleanups
    if faults._startup is not None:
        faults._startup.over = True  # the watchdog thread ends
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, previous)


def test_a_start_up_signal_is_only_recorded_and_the_watchdog_stops(early_exit, capfd):
    """The handler raises nothing in the code it interrupts; a thread cleans up and exits with 0."""
    exits, cleanups = early_exit
    faults.stop_during_startup()
    signal.raise_signal(signal.SIGTERM)  # no exception here, whatever this code is
    wait_for(lambda: exits, 10, "the watchdog's exit")
    assert exits == [EXIT_OK] and cleanups == [faults.STOPPED]
    assert "stopped by signal 15 during start-up: nothing was trained, nothing saved" in capfd.readouterr().err


def test_a_signal_recorded_before_the_hand_over_still_stops(early_exit, monkeypatch):
    exits, cleanups = early_exit
    monkeypatch.setattr(faults, "WATCH_INTERVAL_S", 3600)  # the watchdog sleeps: the hand-over must act
    faults.stop_during_startup()
    signal.raise_signal(signal.SIGTERM)
    stop = faults.StopSignal()  # takes over; finds the recorded signal
    assert exits == [EXIT_OK] and cleanups == [faults.STOPPED] and stop.received is None
    faults.stop_during_startup()  # a new start-up forgets it
    faults.end_startup()
    assert exits == [EXIT_OK]


def test_an_error_after_a_start_up_signal_is_the_stop(early_exit, monkeypatch):
    exits, cleanups = early_exit
    monkeypatch.setattr(faults, "WATCH_INTERVAL_S", 3600)
    faults.stop_during_startup()
    faults.stop_if_signalled()
    assert exits == []  # no signal: the error is an error
    signal.raise_signal(signal.SIGTERM)
    faults.stop_if_signalled()  # a peer stopped first and left a collective: the stop, not the error
    assert exits == [EXIT_OK] and cleanups == [faults.STOPPED]


def test_a_trainer_whose_launcher_is_gone_cleans_up_and_exits(early_exit, capfd):
    exits, cleanups = early_exit
    gone = _dead_pid()  # stands for the launcher's PID taken at start
    faults.exit_with_launcher(gone, poll_s=0.01).join(timeout=10)
    assert exits == [faults.EXIT_FAILED] and cleanups == [faults.ORPHANED]
    assert f"the launcher (PID {gone}) is gone" in capfd.readouterr().err


def test_a_trainer_adopted_by_init_exits(early_exit, monkeypatch):
    """Its launcher died before it could note the launcher's PID (the agent can exit before its workers
    start, a SIGTERM during their start): its parent is init, which is no launcher."""
    exits, cleanups = early_exit
    monkeypatch.setattr(psutil.Process, "name", lambda self: "init")
    faults.exit_with_launcher(1, poll_s=0.01).join(timeout=10)
    assert exits == [faults.EXIT_FAILED] and cleanups == [faults.ORPHANED]
    assert not faults._adopted_by_init(os.getppid())


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid
