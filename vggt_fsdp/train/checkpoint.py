"""Sharded training checkpoints: atomic save, keep-last-K, verified resume and export.

Layout of `<output_dir>/checkpoints/`:

    step-0000100/              a complete checkpoint (never half-written)
        COMPLETE               marker, JSON: step, world size, time, and every file's size and block
                               checksums (integrity.py); written last, before the rename
        .metadata, __*.distcp  torch.distributed.checkpoint (DCP) files: model and optimizer, sharded
        rank00000.pt ...       per-rank state: step, schedule length, scheduler, sampler position, RNG
    .tmp-step-0000200/         a save in progress (or a crashed one; removed by the next save)

Every rank writes its shards into the temporary directory and checksums them; after a barrier rank 0
writes the marker and renames the directory to its final name. A rename is atomic on POSIX
filesystems, so a crash at any point leaves either the previous checkpoints only or the new one
complete. Directories without the marker are never resumed from. Weights holding NaN or Inf are never
saved (checked on every rank before anything is written).

Resuming verifies the files against the marker (spread over the ranks); a damaged checkpoint (flipped
bytes, a truncated or missing file, an unreadable marker) is named with what is wrong, on every rank,
and `train.resume=auto` falls back to the newest intact one; a damaged checkpoint named explicitly, or
no intact one left, stops the run.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys
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

from vggt_fsdp.train.faults import rank0_decides
from vggt_fsdp.train.integrity import check_finite, checksum_files, share_of, verify_files

MARKER = "COMPLETE"
FORMAT = 2  # markers of format 1 (no "files" manifest) predate verification: resumed with a warning
_STEP_DIR = re.compile(r"^step-(\d{7,})$")
_TMP_PREFIX = ".tmp-"
# Test hook: `VGGT_FSDP_CRASH_IN_SAVE=<step>` kills this process with SIGKILL after its shards of that
# step are written but before the checkpoint is complete (how the atomicity test simulates a crash).
_CRASH_ENV = "VGGT_FSDP_CRASH_IN_SAVE"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names its path and what is wrong."""


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainState:
    """Everything besides model and optimizer that a resume needs to continue exactly."""

    step: int
    scheduler: Any = None  # has state_dict()/load_state_dict(); None: no schedule to restore
    sampler: Stateful | None = None
    max_steps: int | None = None  # the schedule's length, kept to notice a changed train.max_steps


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


def resume_candidates(resume: str, root: Path) -> list[Path]:
    """Checkpoints `train.resume` may load, in order of preference: "auto" -> the complete ones under
    root, newest first; "none" -> none; otherwise the given path, which must be a complete checkpoint."""
    if resume == "none":
        return []
    if resume == "auto":
        return [path for _, path in reversed(complete_checkpoints(root))]
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(f"train.resume={resume!r} is not a complete checkpoint (no {MARKER} "
                                f"marker in {path}); valid: 'auto', 'none' or a complete step-* directory")
    return [path]


def resolve_resume(resume: str, root: Path) -> Path | None:
    """The first of `resume_candidates` (unverified), or None."""
    found = resume_candidates(resume, root)
    return found[0] if found else None


def agreed_resume(resume: str, root: Path) -> Path | None:
    """Collective: the newest intact checkpoint `train.resume` allows, the same on every rank.

    Rank 0 lists the candidates (a shared filesystem's listing may differ between nodes) and tells the
    others; each candidate's files are verified by all ranks together. A damaged one is reported on
    every rank; with "auto" the next older one is tried, an explicit path or no intact checkpoint
    left raises CheckpointError on every rank (none is left waiting in a collective).
    """
    try:
        candidates = rank0_decides(lambda: resume_candidates(resume, root), (FileNotFoundError,))
    except FileNotFoundError as err:
        raise CheckpointError(str(err)) from None
    damaged = []
    for path in candidates:
        problems = checkpoint_problems(path)
        if not problems:
            return path
        damaged.append(f"{path}: " + "; ".join(problems))
        if resume != "auto":
            raise CheckpointError(f"train.resume={resume}: checkpoint {path} is damaged: {'; '.join(problems)}. "
                                  "Name another checkpoint, or train.resume=auto for the newest intact one")
        older = candidates[len(damaged)] if len(damaged) < len(candidates) else None
        warn_every_rank(f"checkpoint {path} is damaged and will not be resumed from: {'; '.join(problems)}"
                        + (f"; falling back to {older}" if older else ""))
    if damaged:
        raise CheckpointError(f"no intact checkpoint under {root}: " + " | ".join(damaged)
                              + ". train.resume=none starts fresh (the damaged checkpoints stay)")
    return None


def warn_every_rank(text: str) -> None:
    """A warning on stderr from every rank: each node's log must show what its ranks skipped."""
    print(f"[vggt-fsdp rank {_rank()}] warning: {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- integrity


def read_marker(path: Path) -> dict:
    """The COMPLETE marker of `path`, checked for the fields a resume needs; CheckpointError otherwise."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / MARKER} is unreadable ({type(err).__name__}: {err})") from None
    if not (isinstance(marker, dict) and isinstance(marker.get("step"), int)
            and isinstance(marker.get("world_size"), int) and isinstance(marker.get("files", {}), dict)
            and all(isinstance(r, dict) and isinstance(r.get("size"), int) and isinstance(r.get("crc32"), list)
                    for r in marker.get("files", {}).values())):
        raise CheckpointError(f"{path / MARKER} lacks step, world_size or files: {str(marker)[:200]}")
    return marker


def _manifest_problems(marker: dict) -> list[str]:
    """Files a complete checkpoint must hold that its manifest does not list."""
    files = marker["files"]
    needed = [".metadata"] + [f"rank{r:05d}.pt" for r in range(marker["world_size"])]
    return [f"{name} is not in the {MARKER} manifest" for name in needed if name not in files]


def checkpoint_problems(path: Path) -> list[str]:
    """Collective when a process group is initialised: what is wrong with checkpoint `path` (empty
    when intact). Rank 0 reads the marker; every rank verifies its share of the files; all ranks
    return the same list."""
    try:
        marker = rank0_decides(lambda: read_marker(path), (CheckpointError,))
    except CheckpointError as err:
        return [str(err)]
    if "files" not in marker:
        warn_every_rank(f"checkpoint {path} was written without a file manifest (before format {FORMAT}): "
                        "its files cannot be verified")
        return []
    problems = _manifest_problems(marker)
    files = marker["files"]
    mine = share_of({name: record["size"] for name, record in files.items()}, _rank(), _world())
    found = verify_files(path, {name: files[name] for name in mine})
    if _world() > 1:
        everyone: list[Any] = [None] * _world()
        dist.all_gather_object(everyone, found)
        found = [item for part in everyone for item in part]
    return problems + sorted(found)


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
                    device: torch.device, keep_last: int, info: dict | None = None) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint directory. `info`: extra
    fields for the marker (JSON). Raises NonFiniteWeightsError, writing nothing, when the model's
    weights hold NaN or Inf."""
    rank, world = _rank(), _world()
    final = root / step_dir_name(train.step)
    check_finite(model, f"model weights at step {train.step} (checkpoint {final} not written)")
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
        "max_steps": train.max_steps,
        "scheduler": train.scheduler.state_dict() if train.scheduler is not None else None,
        "sampler": train.sampler.state_dict() if train.sampler is not None else None,
        "rng": rng_state(device),
    }
    rank_file = tmp / f"rank{rank:05d}.pt"
    _write_synced(rank_file, lambda f: torch.save(per_rank, f))
    # Each rank checksums what it wrote, in parallel; rank 0 adds what no rank claimed (.metadata).
    files = checksum_files([p for p in tmp.iterdir() if p.name.startswith(f"__{rank}_")] + [rank_file])
    if os.environ.get(_CRASH_ENV) == str(train.step):
        os.kill(os.getpid(), signal.SIGKILL)
    if world > 1:
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, files)
        files = {name: record for part in everyone for name, record in part.items()}

    if rank == 0:
        files.update(checksum_files([p for p in tmp.iterdir() if p.name not in files and p.is_file()]))
        marker = json.dumps({"format": FORMAT, "step": train.step, "world_size": world, "time": time.time(),
                             **(info or {}), "files": files}).encode()
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


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, train: TrainState,
                    device: torch.device) -> list[str]:
    """Collective. Restores model, optimizer, scheduler, sampler, RNG and `train.step` from `path`
    (verify it first: `agreed_resume`). Returns notices for rank 0's log.

    Model and optimizer reshard to any world size (DCP). Per-rank state (sampler position, RNG) only
    means something for the world size that wrote it: with the same world size every rank's own file
    must be there; with another, step and scheduler come from rank 0's file and every rank says that
    the sampler position and RNG streams start fresh. Weights holding NaN or Inf are refused, named.
    """
    marker = read_marker(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as err:  # DCP's own messages do not name the checkpoint
        raise CheckpointError(f"reading checkpoint {path} failed: {type(err).__name__}: {err}") from err
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    check_finite(model, f"the model weights of checkpoint {path}")

    same_world = marker["world_size"] == _world()
    rank_file = path / (f"rank{_rank():05d}.pt" if same_world else "rank00000.pt")
    if not rank_file.is_file():
        raise CheckpointError(f"checkpoint {path} lacks {rank_file.name}, this rank's sampler position and RNG "
                              "state: its resume would not be exact. Resume from another checkpoint")
    try:
        # weights_only=False: the file holds Python RNG state tuples, written by this trainer.
        per_rank = torch.load(rank_file, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"reading {rank_file} failed: {type(err).__name__}: {err}") from err
    train.step = per_rank["step"]
    if train.scheduler is not None and per_rank.get("scheduler") is not None:
        train.scheduler.load_state_dict(per_rank["scheduler"])
    notices = [n for n in (_schedule_notice(per_rank.get("max_steps"), train),) if n]
    if not same_world:
        warn_every_rank(f"checkpoint {path} was written by {marker['world_size']} processes, this run has "
                        f"{_world()}: model, optimizer, scheduler and step restored; this rank's sampler "
                        "position and RNG streams start fresh from the seed (the resume is not exact)")
        return notices
    if train.sampler is not None and per_rank["sampler"] is not None:
        train.sampler.load_state_dict(per_rank["sampler"])
    set_rng_state(per_rank["rng"], device)
    return notices


def _schedule_notice(saved: int | None, train: TrainState) -> str | None:
    """The learning-rate schedule follows the current train.max_steps (the run's own length); a change
    from the checkpoint's is said with the jump it makes."""
    if saved is None or train.max_steps is None or saved == train.max_steps:
        return None
    text = (f"train.max_steps changed from {saved} (the checkpoint's) to {train.max_steps}: the learning-rate "
            f"schedule now runs over {train.max_steps} steps")
    sched = train.scheduler
    if sched is not None and hasattr(sched, "lr_lambdas") and sched.get_last_lr():
        new = sched.base_lrs[0] * sched.lr_lambdas[0](sched.last_epoch)
        text += f" (lr at step {train.step + 1}: {sched.get_last_lr()[0]:.3g} before, {new:.3g} now)"
    return text


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


def export_safetensors(path: Path, out: Path, dtype: torch.dtype | None = None, verify: bool = True) -> int:
    """Consolidate checkpoint `path` into one .safetensors file; returns the number of tensors.

    `verify`: check the files against the marker first (the trainer skips it for the checkpoint it
    has just written and checksummed). Weights holding NaN or Inf are refused, named, and nothing is
    written. The file is readable as any new file (mode 0666 less the umask), replaced atomically.
    """
    from safetensors.torch import save_file

    if verify:
        problems = checkpoint_problems(path)
        if problems:
            raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)}")
    state = consolidated_model_state(path, dtype)
    check_finite(state, f"the model weights of checkpoint {path} (not exported)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its file 0600
    with open(tmp, "rb") as f:  # data on disk before the rename makes it the export
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return len(state)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
