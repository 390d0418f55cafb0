"""A checkpoint is data, never code; an untrusted marker is not trusted; a resume with a changed recipe
does what the documented rule says; a failed save says why in the toolkit's words.

Tables of cases, in this process with a small model (DCP and the checkpoint code work without a process
group), except one run of the real entry point (resume with optim.lr changed).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from test_integrity import Toy, _save, _train_state
from vggt_fsdp.train import checkpoint as ckpt
from vggt_fsdp.train import preflight, resume_check
from vggt_fsdp.train.integrity import checksum_files
from vggt_fsdp.train.safe_load import read_metadata_file

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


# --------------------------------------------------------------------------- crafted checkpoints
class Payload:
    """Pickles as a shell command: unpickling it without restriction creates the file `target`."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def _reseal(path: Path) -> None:
    """Recompute the marker's size and CRC-32 records, as anyone can."""
    marker = json.loads((path / ckpt.MARKER).read_text())
    marker["files"] = checksum_files([p for p in path.iterdir() if p.name != ckpt.MARKER])
    (path / ckpt.MARKER).write_text(json.dumps(marker))


def _forge_metadata(path: Path, target: Path) -> None:
    metadata = read_metadata_file(path / ".metadata")
    metadata.storage_meta.modules = [Payload(target)]
    (path / ".metadata").write_bytes(pickle.dumps(metadata))


def _forge_rank_file(path: Path, target: Path) -> None:
    state = torch.load(path / "rank00000.pt", weights_only=True)
    state["sampler"] = Payload(target)
    torch.save(state, path / "rank00000.pt")


def _forge_optimizer_item(path: Path, target: Path) -> None:
    """The optimizer's lr, a non-tensor item DCP pickles into a shard, replaced by the payload."""
    model = Toy()
    optimizer, _ = _train_state(model, 1)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    optim_sd["param_groups"][0]["lr"] = Payload(target)
    for old in [*path.glob("*.distcp"), path / ".metadata"]:
        old.unlink()
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


FORGERIES = {".metadata": _forge_metadata, "rank file": _forge_rank_file,
             "optimizer item in a shard": _forge_optimizer_item}


def _unprotected_read(path: Path, where: str) -> None:
    """How torch reads each file by default (what this toolkit did before)."""
    if where == ".metadata":
        pickle.loads((path / ".metadata").read_bytes())
    elif where == "rank file":
        torch.load(path / "rank00000.pt", weights_only=False)
    else:
        model = Toy()
        optimizer, _ = _train_state(model, 0)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def _resume(path: Path) -> None:
    ckpt.agreed_resume(str(path), path.parent)  # the checksums match: verification passes
    model = Toy()
    optimizer, state = _train_state(model, 0)
    ckpt.load_checkpoint(path, model, optimizer, state, CPU)


def _export(path: Path) -> None:
    from vggt_fsdp.commands import export

    out = path.parent.parent / "out.safetensors"
    code = export.run(argparse.Namespace(checkpoint=path, out=out, dtype="fp32"))
    assert code == 1 and not out.exists()


@pytest.fixture
def forged(tmp_path, request):
    where = request.param
    path, _ = _save(tmp_path / "checkpoints", 2)
    target = tmp_path / "payload-ran"
    FORGERIES[where](path, target)
    _reseal(path)
    assert ckpt.checkpoint_problems(path) == []  # CRC-32 cannot tell
    return path, target, where


@pytest.mark.parametrize("forged", list(FORGERIES), indirect=True)
def test_the_forged_payload_runs_under_torchs_default_reading(forged):
    """The control: each crafted file really carries code, which torch's default reading runs."""
    path, target, where = forged
    try:
        _unprotected_read(path, where)
    except Exception:
        pass  # the payload returns an int where an object was expected: it ran before that
    assert target.exists()


@pytest.mark.parametrize("entry", ["resume", "export"])
@pytest.mark.parametrize("forged", list(FORGERIES), indirect=True)
def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(forged, entry, capsys):
    path, target, where = forged
    if entry == "resume":
        with pytest.raises(ckpt.CheckpointError) as info:
            _resume(path)
        message = str(info.value)
    else:
        _export(path)
        message = capsys.readouterr().err
    assert not target.exists()
    assert str(path) in message and "refused" in message and "data, never code" in message, message
    assert f"{os.system.__module__}.system" in message, message  # the refused object is named


def test_per_rank_state_is_tensors_and_plain_data(tmp_path):
    path, _ = _save(tmp_path / "checkpoints", 2)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path / "rank00000.pt") == []
    assert json.loads((path / ckpt.MARKER).read_text())["format"] == ckpt.FORMAT


def test_a_format_2_rank_file_with_numpy_rng_state_still_resumes_exactly(tmp_path):
    np = pytest.importorskip("numpy")
    path, _ = _save(tmp_path / "checkpoints", 2)
    state = torch.load(path / "rank00000.pt", weights_only=True)
    np.random.seed(7)
    state["rng"]["numpy"] = np.random.get_state()  # as format 2 wrote it
    expected = np.random.rand(3)
    torch.save(state, path / "rank00000.pt")
    marker = json.loads((path / ckpt.MARKER).read_text())
    (path / ckpt.MARKER).write_text(json.dumps({**marker, "format": 2}))
    _reseal(path)
    np.random.seed(0)
    _resume(path)
    assert (np.random.rand(3) == expected).all()


@pytest.mark.parametrize("reader", ["load_weights", "preflight"])
def test_a_weights_file_with_a_payload_is_refused_unrun(tmp_path, reader):
    from vggt_fsdp.model.weights import UnsafeWeightsError, load_weights

    target, weights = tmp_path / "payload-ran", tmp_path / "model.pt"
    torch.save({"model": Toy().state_dict(), "extra": Payload(target)}, weights)
    if reader == "load_weights":
        with pytest.raises(UnsafeWeightsError, match="refused unread"):
            load_weights(Toy(), weights)
    else:
        problems = preflight.init_weights_problems(Toy(), str(weights))
        assert len(problems) == 1 and "refused unread" in problems[0].message
    assert not target.exists()


# --------------------------------------------------------------------------- markers not trusted
def _edit_marker(path: Path, **changes) -> None:
    marker = json.loads((path / ckpt.MARKER).read_text())
    marker.update(changes)
    (path / ckpt.MARKER).write_text(json.dumps({k: v for k, v in marker.items() if v is not None}))


# case -> (how the newest checkpoint's marker is changed, what is said)
MARKERS = {
    "deleted": (lambda d: (d / ckpt.MARKER).unlink(), "has no COMPLETE marker"),
    "without file records": (lambda d: _edit_marker(d, files=None), "records no files (format 3"),
    "format 1 (before checksums)": (lambda d: _edit_marker(d, files=None, format=1), "records no files (format 1"),
    "without a format": (lambda d: _edit_marker(d, format=None), "format 1"),
    "of an unknown format": (lambda d: _edit_marker(d, format=99), "format 99, which this vggt-fsdp does not read"),
}


@pytest.mark.parametrize("case", list(MARKERS))
def test_an_untrusted_marker_is_skipped_and_said(tmp_path, case, capsys):
    from vggt_fsdp.commands.export import find_checkpoint

    root = tmp_path / "checkpoints"
    first, _ = _save(root, 1)
    second, _ = _save(root, 2)
    change, phrase = MARKERS[case]
    change(second)
    assert ckpt.agreed_resume("auto", root) == first  # never the untrusted one
    err = capsys.readouterr().err
    assert str(second) in err and phrase in err and ("skipped" in err or "will not be resumed" in err), err
    assert find_checkpoint(tmp_path) == first  # export: the same choice, said the same way
    err = capsys.readouterr().err
    assert str(second) in err and phrase in err, err
    # Named explicitly: refused, before launch (preflight) and by the trainer.
    problems = preflight.resume_problems(str(second))
    assert len(problems) == 1 and problems[0].key == "train.resume", problems
    with pytest.raises((ckpt.CheckpointError, FileNotFoundError)):
        ckpt.agreed_resume(str(second), root)


# --------------------------------------------------------------------------- a changed recipe
def _cpu_tiny(*overrides: str):
    from vggt_fsdp.recipe import load_recipe

    return load_recipe(REPO / "recipes" / "cpu_tiny.yaml", list(overrides))


def _set(recipe, key: str, value) -> None:
    *path, name = key.split(".")
    owner = recipe
    for part in path:
        owner = getattr(owner, part)
    if isinstance(owner, dict):
        owner[name] = value
    else:
        setattr(owner, name, value)


# key, new value -> verdict (None: not reported)
CHANGES = [
    ("model.preset", "vggt-mid", "refused"),
    ("model.heads.track", True, "refused"),
    ("model.heads.point", False, "refused"),
    ("model.overrides.depth", 2, "refused"),
    ("model.freeze", ["aggregator.*"], "refused"),
    ("optim.no_decay_1d", False, "refused"),
    ("optim.lr", 5e-4, "applied"),
    ("optim.weight_decay", 0.1, "applied"),
    ("schedule.warmup_steps", 7, "applied"),
    ("train.max_steps", 77, "applied"),
    ("data.frames_range", [2, 3], "applied"),
    ("loss.depth.weight", 2.5, "applied"),
    ("train.checkpoint_every", 3, "applied"),
    ("model.init_weights", "upstream.pt", "not used"),
    ("train.seed", 9, "not used"),
    ("train.output_dir", "elsewhere", None),
    ("train.resume", "none", None),
]


@pytest.mark.parametrize("key,value,verdict", CHANGES)
def test_each_recipe_change_gets_the_documented_verdict(key, value, verdict):
    saved = resume_check.plain(_cpu_tiny())
    recipe = _cpu_tiny()
    _set(recipe, key, value)
    changes = resume_check.compare(saved, recipe)
    if verdict is None:
        assert changes == []
        return
    assert [(c.key, c.verdict) for c in changes] == [(key, verdict)]
    before = resume_check._lookup(saved, key)[1] if key != "model.overrides.depth" else "(unset)"
    assert changes[0].before == before and changes[0].now == resume_check.plain(value)


def test_a_field_the_checkpoint_did_not_record_is_not_compared():
    saved = resume_check.plain(_cpu_tiny())
    del saved["model"]["heads"]["track"]  # an earlier version without the field
    recipe = _cpu_tiny()
    recipe.model.heads.track = True
    assert resume_check.compare(saved, recipe) == []


@pytest.fixture
def run_with_checkpoint(tmp_path):
    """An output directory whose newest checkpoint recorded cpu_tiny (only the marker matters here)."""
    step = tmp_path / "checkpoints" / "step-0000002"
    step.mkdir(parents=True)
    marker = {"format": ckpt.FORMAT, "step": 2, "world_size": 1, "files": {},
              "recipe": resume_check.plain(_cpu_tiny())}
    (step / ckpt.MARKER).write_text(json.dumps(marker))
    return tmp_path, step


def test_preflight_refuses_a_model_change_before_launch_naming_key_and_values(run_with_checkpoint):
    out, step = run_with_checkpoint
    recipe = _cpu_tiny(f"train.output_dir={out}", "model.preset=vggt-mid")
    recipe.model.heads.track = True
    problems = {p.key: p.message for p in preflight.resume_recipe_problems(recipe)}
    assert set(problems) == {"model.preset", "model.heads.track"}
    preset, track = problems["model.preset"], problems["model.heads.track"]
    assert "'vggt-tiny' in checkpoint" in preset and "'vggt-mid' in this recipe" in preset
    assert "false in checkpoint" in track and "true in this recipe" in track
    assert str(step) in preset and "train.resume=none" in preset
    assert preflight.resume_recipe_problems(_cpu_tiny(f"train.output_dir={out}", "optim.lr=5e-4")) == []
    assert preflight.resume_recipe_problems(_cpu_tiny(f"train.output_dir={out}", "model.preset=vggt-mid",
                                                      "train.resume=none")) == []


def test_vggt_fsdp_train_refuses_it_before_launching(run_with_checkpoint, capsys, monkeypatch):
    from vggt_fsdp.commands import train

    out, step = run_with_checkpoint
    monkeypatch.setattr(train._Launcher, "run", lambda *a: pytest.fail("launched"))
    args = argparse.Namespace(recipe=str(REPO / "recipes" / "cpu_tiny.yaml"), dry_run=False, config_file=None,
                              overrides=[f"train.output_dir={out}", "model.preset=vggt-mid"])
    assert train.run(args) == 2
    assert "error: model.preset: 'vggt-tiny' in checkpoint" in capsys.readouterr().err


def test_a_checkpoint_of_an_earlier_version_is_compared_with_the_run_directorys_recipe_yaml(run_with_checkpoint):
    from vggt_fsdp.recipe import dump_recipe

    out, step = run_with_checkpoint
    _edit_marker(step, recipe=None)
    (out / "recipe.yaml").write_text(dump_recipe(_cpu_tiny()))
    recipe = _cpu_tiny(f"train.output_dir={out}", "model.preset=vggt-mid")
    assert [p.key for p in preflight.resume_recipe_problems(recipe)] == ["model.preset"]


@dataclass
class _ToyModelSpec:
    preset: str = "toy"


@dataclass
class _ToyOptim:
    lr: float = 1e-2
    weight_decay: float = 0.01


@dataclass
class _ToyRecipe:
    model: _ToyModelSpec = field(default_factory=_ToyModelSpec)
    optim: _ToyOptim = field(default_factory=_ToyOptim)


def _toy_optimizer(model, recipe: _ToyRecipe, max_steps: int = 10):
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / max_steps)
    return optimizer, ckpt.TrainState(step=0, scheduler=scheduler, max_steps=max_steps, recipe=recipe)


def _toy_checkpoint(root: Path, recipe: _ToyRecipe, step: int = 4) -> Path:
    torch.manual_seed(0)
    model = Toy()
    optimizer, state = _toy_optimizer(model, recipe)
    for _ in range(step):
        model.depth_head(model.aggregator(torch.randn(4, 6))).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        state.scheduler.step()
    state.step = step
    return ckpt.save_checkpoint(root, model, optimizer, state, CPU, keep_last=0)


def test_a_changed_lr_and_weight_decay_are_applied_and_said(tmp_path):
    path = _toy_checkpoint(tmp_path, _ToyRecipe())
    recipe = _ToyRecipe(optim=_ToyOptim(lr=5e-3, weight_decay=0.1))
    model = Toy()
    optimizer, state = _toy_optimizer(model, recipe)
    notices = ckpt.load_checkpoint(path, model, optimizer, state, CPU)
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(5e-3 * (1 - 4 / 10)) and group["weight_decay"] == 0.1
    assert state.scheduler.get_last_lr()[0] == pytest.approx(3e-3) and state.scheduler.base_lrs == [5e-3]
    text = "\n".join(notices)
    assert "optim.lr 0.01 -> 0.005 (applied" in text and "optim.weight_decay 0.01 -> 0.1 (applied" in text
    assert "lr at step 5: 0.006 before, 0.003 now" in text
    assert "weight_decay 0.01 -> 0.1" in text
    assert [c.key for c in state.recipe_changes] == ["optim.lr", "optim.weight_decay"]
    state.scheduler.step()  # the schedule goes on with the new base lr
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-3 * (1 - 5 / 10))


def test_a_refused_change_stops_before_anything_is_read(tmp_path):
    path = _toy_checkpoint(tmp_path, _ToyRecipe())
    model = Toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer, state = _toy_optimizer(model, _ToyRecipe(model=_ToyModelSpec(preset="bigger")))
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(path, model, optimizer, state, CPU)
    assert "model.preset: 'toy' in the checkpoint, 'bigger' now" in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert state.step == 0


def test_resuming_with_optim_lr_changed_trains_with_it_says_so_and_records_it(tmp_path):
    """The real entry point, one process: 2 steps at lr 1e-3, then resumed to step 3 with optim.lr=5e-4."""
    import yaml

    from vggt_fsdp.train.optim import lr_at

    out = tmp_path / "run"
    common = ["-m", "vggt_fsdp.train", str(REPO / "recipes" / "cpu_tiny.yaml"), f"train.output_dir={out}",
              "data.image_width=56", "data.frames_range=[2,2]", "data.frames_per_gpu=2", "train.progress_bar=false",
              "train.log_every=1", "train.export_final=false", "train.checkpoint_every=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for steps, lr in ((2, "1e-3"), (3, "5e-4")):
        result = subprocess.run([sys.executable, *common, f"train.max_steps={steps}", f"optim.lr={lr}"], cwd=REPO,
                                capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "optim.lr 0.001 -> 0.0005 (applied" in result.stderr
    assert "lr at step 3:" in result.stderr
    records = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    recipe = _cpu_tiny("optim.lr=5e-4")
    assert records[3]["lr"] == pytest.approx(lr_at(2, 5e-4, recipe.schedule, 3))
    assert yaml.safe_load((out / "recipe.yaml").read_text())["optim"]["lr"] == 5e-4
    history = [json.loads(line) for line in (out / resume_check.HISTORY).read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 2]
    assert history[1]["changes"]["optim.lr"] == {"before": 1e-3, "now": 5e-4, "verdict": "applied"}


# --------------------------------------------------------------------------- failed saves and loads
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _fail_writes_of(names):
    real = ckpt._write_synced

    def write(path, fn):
        if path.name in names or any(path.name.startswith(n) for n in names):
            _no_space()
        return real(path, fn)
    return write


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs just too small for a second checkpoint (needs root and mount permission)."""
    where = tmp_path / "disk"
    where.mkdir()
    probe = tmp_path / "probe"
    _save(probe, 1)
    used = sum(-(-p.stat().st_size // 4096) * 4096 for p in probe.rglob("*") if p.is_file())
    size = used + used // 2
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root with mount permission)")
    yield where
    subprocess.run(["umount", str(where)], check=True)


# case -> how the second save runs out of space
DISK_FULL = {
    "DCP shards (writer raises ENOSPC)": lambda mp, root: mp.setattr(
        "torch.distributed.checkpoint.filesystem._write_item", _no_space),
    "a rank file": lambda mp, root: mp.setattr(ckpt, "_write_synced", _fail_writes_of(["rank"])),
    "the marker": lambda mp, root: mp.setattr(ckpt, "_write_synced", _fail_writes_of([ckpt.MARKER])),
    "a real full filesystem (tmpfs)": None,
}


@pytest.mark.parametrize("case", list(DISK_FULL))
def test_disk_full_during_a_save_is_said_with_the_path_and_the_previous_checkpoint_kept(case, tmp_path, monkeypatch,
                                                                                        request):
    root = (request.getfixturevalue("small_disk") if DISK_FULL[case] is None else tmp_path) / "checkpoints"
    first, _ = _save(root, 1)
    if DISK_FULL[case] is not None:
        DISK_FULL[case](monkeypatch, root)
    with pytest.raises(ckpt.CheckpointSaveError) as info:
        _save(root, 2)
    message = str(info.value)
    assert f"saving checkpoint {root / 'step-0000002'} failed: no space left on the device holding {root}" in message
    assert "needs about" in message and "is free" in message
    assert f"the previous checkpoint {first} is intact" in message
    assert not (root / ".tmp-step-0000002").exists() and not (root / "step-0000002").exists()
    monkeypatch.undo()
    assert ckpt.complete_checkpoints(root) == [(1, first)] and ckpt.checkpoint_problems(first) == []


def test_another_save_failure_is_reworded_and_cleaned_up(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"

    def broken(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("torch.distributed.checkpoint.filesystem._write_item", broken)
    with pytest.raises(ckpt.CheckpointSaveError) as info:
        _save(root, 1)
    assert "PermissionError" in str(info.value) and f"no earlier checkpoint exists in {root}" in str(info.value)
    assert not (root / ".tmp-step-0000001").exists()


def test_a_shard_lost_after_verification_is_a_checkpoint_error_not_a_dcp_traceback(tmp_path):
    path, _ = _save(tmp_path / "checkpoints", 2)
    for shard in path.glob("*.distcp"):
        shard.unlink()
    model = Toy()
    optimizer, state = _train_state(model, 0)
    with pytest.raises(ckpt.CheckpointError, match=f"reading checkpoint {path} failed: FileNotFoundError"):
        ckpt.load_checkpoint(path, model, optimizer, state, CPU)


@pytest.mark.parametrize("out,phrase,code", [
    ("a directory", "is a directory", 2),
    ("/proc/vggt-fsdp-test/model.safetensors", "failed", 1),
])
def test_export_to_an_unwritable_path_is_said(tmp_path, out, phrase, code, capsys):
    from vggt_fsdp.commands import export

    path, _ = _save(tmp_path / "checkpoints", 1)
    target = tmp_path / "dir.safetensors" if out == "a directory" else Path(out)
    if out == "a directory":
        target.mkdir()
    assert export.run(argparse.Namespace(checkpoint=path, out=target, dtype="fp32")) == code
    err = capsys.readouterr().err
    assert phrase in err and str(target) in err and "Traceback" not in err


def _two_rank_save(rank: int, port: int, root: str, fail_rank: int, fail_file: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = Toy()
    optimizer, state = _train_state(model, 1)
    ckpt.save_checkpoint(Path(root), model, optimizer, state, CPU, keep_last=0)
    if rank == fail_rank:  # this process only: the other rank's writes succeed
        ckpt._write_synced = _fail_writes_of([fail_file])
    state.step = 2
    try:
        ckpt.save_checkpoint(Path(root), model, optimizer, state, CPU, keep_last=0)
        outcome = "saved"
    except ckpt.CheckpointSaveError as err:
        outcome = str(err)
    (Path(root).parent / f"rank{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


@pytest.mark.parametrize("fail_rank,fail_file", [(1, "rank"), (0, ckpt.MARKER)],
                         ids=["rank 1's file", "rank 0's marker"])
def test_a_save_failing_on_one_rank_fails_on_every_rank_and_none_waits(tmp_path, fail_rank, fail_file):
    import torch.multiprocessing as mp

    from test_train_core import _free_port

    root = tmp_path / "checkpoints"
    context = mp.start_processes(_two_rank_save, args=(_free_port(), str(root), fail_rank, fail_file), nprocs=2,
                                 start_method="fork", join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):  # a rank left waiting in a collective would hang here
        assert time.monotonic() < deadline, "a rank did not return from the failed save"
    for rank in (0, 1):
        said = (tmp_path / f"rank{rank}.txt").read_text()
        assert "no space left on the device" in said and str(root / "step-0000002") in said, said
        assert f"the previous checkpoint {root / 'step-0000001'} is intact" in said
    assert [step for step, _ in ckpt.complete_checkpoints(root)] == [1]
    assert not (root / ".tmp-step-0000002").exists() and ckpt.checkpoint_problems(root / "step-0000001") == []
