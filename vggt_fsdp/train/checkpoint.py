"""Sharded training checkpoints: atomic save, keep-last-K, resume and export.

Layout of `<output_dir>/checkpoints/`:

    step-0000100/              a complete checkpoint (never half-written)
        COMPLETE               marker, JSON: step, world size, time (written last, before the rename)
        .metadata, __*.distcp  torch.distributed.checkpoint (DCP) files: model and optimizer, sharded
        rank00000.pt ...       per-rank state: step, scheduler, sampler position, RNG states
    .tmp-step-0000200/         a save in progress (or a crashed one; removed by the next save)

Every rank writes its shards into the temporary directory; after a barrier rank 0 writes the marker
and renames the directory to its final name. A rename is atomic on POSIX filesystems, so a crash at
any point leaves either the previous checkpoints only or the new one complete. Directories without
the marker are never resumed from.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")
_TMP_PREFIX = ".tmp-"
# Test hook: `VGGT_FSDP_CRASH_IN_SAVE=<step>` kills this process with SIGKILL after its shards of that
# step are written but before the checkpoint is complete (how the atomicity test simulates a crash).
_CRASH_ENV = "VGGT_FSDP_CRASH_IN_SAVE"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainState:
    """Everything besides model and optimizer that a resume needs to continue exactly."""

    step: int
    scheduler: Any
    sampler: Stateful | None = None


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_resume(resume: str, root: Path) -> Path | None:
    """The checkpoint to resume from: "auto" -> latest complete under root (or None), "none" -> None,
    otherwise the given path, which must be a complete checkpoint."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1][1] if found else None
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(f"train.resume={resume!r} is not a complete checkpoint (no {MARKER} "
                                f"marker in {path}); valid: 'auto', 'none' or a complete step-* directory")
    return path


def agreed_resume(resume: str, root: Path) -> Path | None:
    """Collective `resolve_resume`: rank 0 decides and tells the others, so every rank loads the same
    checkpoint even where a shared filesystem's listing differs between nodes; an error is raised on
    every rank (none is left waiting in a collective)."""
    if not dist.is_initialized() or _world() == 1:
        return resolve_resume(resume, root)
    box: list[Any] = [None, None]  # (path, error message)
    if _rank() == 0:
        try:
            box[0] = resolve_resume(resume, root)
        except FileNotFoundError as err:
            box[1] = str(err)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise FileNotFoundError(box[1])
    return box[0]


# ---------------------------------------------------------------------------------------- RNG state


def rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])


# ------------------------------------------------------------------------------------ save and load


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, write) -> None:
    """`write(file)` then fsync: the rename that completes a checkpoint must not outlive its data."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(root: Path, model: nn.Module, optimizer: torch.optim.Optimizer, train: TrainState,
                    device: torch.device, keep_last: int) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint directory."""
    rank, world = _rank(), _world()
    final = root / step_dir_name(train.step)
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this very step
        tmp.mkdir()
    _barrier()

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    per_rank = {
        "step": train.step,
        "scheduler": train.scheduler.state_dict(),
        "sampler": train.sampler.state_dict() if train.sampler is not None else None,
        "rng": rng_state(device),
    }
    _write_synced(tmp / f"rank{rank:05d}.pt", lambda f: torch.save(per_rank, f))
    if os.environ.get(_CRASH_ENV) == str(train.step):
        os.kill(os.getpid(), signal.SIGKILL)
    _barrier()

    if rank == 0:
        marker = json.dumps({"step": train.step, "world_size": world, "time": time.time()}).encode()
        _write_synced(tmp / MARKER, lambda f: f.write(marker))
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
        _fsync_dir(root)
        _prune(root, keep_last, train.step)
    _barrier()
    return final


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src to dst; an existing dst (a re-run of the same step) is moved aside first, so dst is
    complete at every instant it exists."""
    if dst.exists():
        old = dst.with_name(f"{_TMP_PREFIX}old-{dst.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)


def _prune(root: Path, keep_last: int, saved_step: int) -> None:
    """Drop leftovers of crashed saves and complete checkpoints beyond the newest `keep_last` up to
    `saved_step`. Later steps (left by a run this one rolled back from with train.resume=PATH) are
    not counted: they would otherwise push out the checkpoint just written."""
    for child in root.iterdir():
        if child.name.startswith(_TMP_PREFIX) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
    if keep_last > 0:
        ours = [(step, path) for step, path in complete_checkpoints(root) if step <= saved_step]
        for _, path in ours[:-keep_last]:
            # Remove the marker first: a crash mid-delete then leaves an incomplete, ignored dir.
            (path / MARKER).unlink()
            shutil.rmtree(path, ignore_errors=True)


def read_marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, train: TrainState,
                    device: torch.device) -> str | None:
    """Collective. Restores model, optimizer, scheduler, sampler, RNG and `train.step` from `path`.

    Model and optimizer reshard to any world size (DCP). Per-rank state (sampler position, RNG) only
    means something for the world size that wrote it; with another world size it is not restored and
    the returned notice says so (None when everything was restored).
    """
    marker = read_marker(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    rank_file = path / f"rank{_rank():05d}.pt"
    same_world = marker["world_size"] == _world() and rank_file.is_file()
    # weights_only=False: the file holds Python RNG state tuples, written by this trainer.
    per_rank = torch.load(path / ("rank00000.pt" if not same_world else rank_file.name),
                          map_location="cpu", weights_only=False)
    train.step = per_rank["step"]
    train.scheduler.load_state_dict(per_rank["scheduler"])
    if not same_world:
        return (f"checkpoint {path} was written by {marker['world_size']} processes, this run has "
                f"{_world()}: model, optimizer, scheduler and step restored; sampler position and RNG "
                "streams start fresh from the seed")
    if train.sampler is not None and per_rank["sampler"] is not None:
        train.sampler.load_state_dict(per_rank["sampler"])
    set_rng_state(per_rank["rng"], device)
    return None


# ------------------------------------------------------------------------------------------- export


def consolidated_model_state(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The full model state dict of a DCP checkpoint, read in this process without a process group.

    Only the model's tensors are allocated and read (not the optimizer's), so peak memory is one copy
    of the model. Keys are the model's own parameter names (FSDP and checkpoint-wrapper prefixes never
    reach the DCP keys), i.e. upstream names for the VGGT model.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    reader = dcp.FileSystemReader(str(path))
    metadata = reader.read_metadata()
    state: dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
            state[key[len("model."):]] = torch.empty(item.size, dtype=item.properties.dtype)
    if not state:
        raise ValueError(f"{path} holds no model tensors (keys: {sorted(metadata.state_dict_metadata)[:5]}...)")
    with warnings.catch_warnings():  # no_dist=True is the intent; DCP warns about it anyway
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load({"model": state}, storage_reader=reader, no_dist=True)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def export_safetensors(path: Path, out: Path, dtype: torch.dtype | None = None) -> int:
    """Consolidate checkpoint `path` into one .safetensors file; returns the number of tensors."""
    from safetensors.torch import save_file

    state = consolidated_model_state(path, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as f:  # data on disk before the rename makes it the export
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return len(state)
