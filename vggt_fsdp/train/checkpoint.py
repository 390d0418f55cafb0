"""Sharded training checkpoints: atomic save, keep-last-K, verified resume and export.

Layout of `<output_dir>/checkpoints/`:

    step-0000100/              a complete checkpoint (never half-written)
        COMPLETE               marker, JSON: step, world size, time, and every file's size and block
                               checksums (integrity.py); written last, before the rename
        .metadata, __*.distcp  torch.distributed.checkpoint (DCP) files: model and optimizer, sharded
        rank00000.pt ...       per-rank state: step, schedule length, scheduler, sampler position, RNG
                               (tensors and plain data only)
    .tmp-step-0000200/         a save in progress (or a crashed one; removed by the next save)

Every rank writes its shards into the temporary directory and checksums them; after a barrier rank 0
writes the marker and renames the directory to its final name. A rename is atomic on POSIX
filesystems, so a crash at any point leaves either the previous checkpoints only or the new one
complete. Directories without the marker are never resumed from. Weights holding NaN or Inf are never
saved (checked on every rank before anything is written).

Resuming verifies the files against the marker (spread over the ranks); a damaged checkpoint (flipped
bytes, a truncated or missing file, an unreadable marker) is named with what is wrong, on every rank,
and `train.resume=auto` falls back to the newest intact one; a damaged checkpoint named explicitly, or
no intact one left, stops the run. A marker that records no files, of an unknown format, or missing
(a `step-*` directory without one) is not trusted: the checkpoint is skipped and the skip is said.

Nothing in a checkpoint is run as code (safe_load.py): CRC-32 finds damage, not tampering, so every
file is read as data whoever wrote it. A save that fails (a full disk, a lost mount) says so in the
toolkit's words (checkpoint_errors.py), naming the path, and removes its partial directory; the
previous checkpoint is intact.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from vggt_fsdp.train import resume_check
from vggt_fsdp.train.checkpoint_errors import (CheckpointError, CheckpointSaveError, ExportWriteError, SaveFailure,
                                               cause_text, no_space)
from vggt_fsdp.train.faults import rank0_decides
from vggt_fsdp.train.integrity import check_finite, checksum_files, share_of, verify_files
from vggt_fsdp.train.safe_load import (SafePlanner, SafeReader, UnsafeCheckpointError, load_plain,
                                       numpy_array_classes)

MARKER = "COMPLETE"
# 3: per-rank files hold tensors and plain data only. 2: the numpy RNG state is a numpy array (read with
# numpy arrays admitted). 1 (no "files" manifest, before verification) and unknown formats: not trusted.
FORMAT = 3
READABLE_FORMATS = (2, 3)
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
    scheduler: Any = None  # has state_dict()/load_state_dict(); None: no schedule to restore
    sampler: Stateful | None = None
    max_steps: int | None = None  # the schedule's length, kept to notice a changed train.max_steps
    recipe: Any = None  # the recipe in effect (a dataclass), recorded in the marker and compared on resume
    recipe_changes: list = field(default_factory=list)  # resume_check.Change of the resume, for the history


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
    return [(step, path) for step, path in _step_dirs(root) if is_complete(path)]


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def say_unmarked(root: Path, say=None) -> list[Path]:
    """`step-*` directories under `root` without a COMPLETE marker (a save or a prune that did not
    finish, or a deleted marker), each said with why it is skipped; returns them."""
    unmarked = [path for _, path in _step_dirs(root) if not is_complete(path)]
    say = say or (lambda text: print(f"[vggt-fsdp] warning: {text}", file=sys.stderr, flush=True))
    for path in unmarked:
        say(f"{path} has no {MARKER} marker (a save that did not finish, or a deleted marker): its files cannot "
            "be verified, so it is skipped as a checkpoint")
    return unmarked


def resume_candidates(resume: str, root: Path) -> list[Path]:
    """Checkpoints `train.resume` may load, in order of preference: "auto" -> the complete ones under
    root, newest first (a `step-*` directory without a marker is said and skipped); "none" -> none;
    otherwise the given path, which must be a complete checkpoint."""
    if resume == "none":
        return []
    if resume == "auto":
        say_unmarked(root)
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
            raise CheckpointError(f"train.resume={resume}: checkpoint {path} {verdict(problems)}: "
                                  f"{'; '.join(problems)}. "
                                  "Name another checkpoint, or train.resume=auto for the newest intact one")
        older = candidates[len(damaged)] if len(damaged) < len(candidates) else None
        warn_every_rank(f"checkpoint {path} {verdict(problems)} and will not be resumed from: {'; '.join(problems)}"
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


def marker_trust_problems(marker: dict) -> list[str]:
    """Why a well-formed marker cannot vouch for its checkpoint (empty: it can): no file records to
    verify the files against, or a format this version does not know how to read."""
    fmt = marker.get("format", 1)
    if "files" not in marker:
        return [f"its {MARKER} marker records no files (format {fmt!r}; written before verification, or edited): "
                "its files cannot be verified, so the checkpoint is not trusted"]
    if fmt not in READABLE_FORMATS:
        return [f"its {MARKER} marker is of format {fmt!r}, which this vggt-fsdp does not read (it reads "
                f"{', '.join(map(str, READABLE_FORMATS))}): written by another version, or edited; not trusted"]
    return []


def verdict(problems: list[str]) -> str:
    """"is damaged", or "is not trusted" when its marker cannot vouch for it (`marker_trust_problems`)."""
    return "is not trusted" if problems and problems[0].startswith(f"its {MARKER} marker") else "is damaged"


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
    untrusted = marker_trust_problems(marker)
    if untrusted:
        return untrusted
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
    """This process's random streams as tensors and plain data (per-rank files are read weights-only)."""
    version, words, gauss = random.getstate()
    state = {"python": [version, list(words), gauss], "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gauss": float(cached)}
    except ImportError:
        pass
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        import numpy as np
        saved = state["numpy"]
        if isinstance(saved, dict):
            saved = (saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                     saved["cached_gauss"])
        np.random.set_state(saved)  # format 2 wrote numpy's own tuple


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
    weights hold NaN or Inf, and CheckpointSaveError on every rank when any rank's writing fails."""
    rank = _rank()
    final = root / step_dir_name(train.step)
    check_finite(model, f"model weights at step {train.step} (checkpoint {final} not written)")
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    per_rank = _per_rank_bytes(train, device)  # nothing below draws random numbers before it is written
    estimate = (_state_bytes((model_sd, optim_sd)) + len(per_rank)) * _world()

    def previous() -> Path | None:  # said to be intact when this save fails
        return next((p for _, p in reversed(complete_checkpoints(root)) if p != final), None)

    failed = SaveFailure(root, tmp, final, estimate, previous)

    def start() -> None:  # rank 0
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this very step
        tmp.mkdir()

    failed.run(lambda: rank0_decides(failed.wrap(start), (CheckpointSaveError,)))
    failed.run(lambda: dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp)))
    files = failed.run(lambda: _agree(failed.wrap(lambda: _write_rank_file(tmp, rank, train.step, per_rank))))
    finish = failed.wrap(lambda: _complete(root, tmp, final, train, files, info, keep_last))
    failed.run(lambda: rank0_decides(finish, (CheckpointSaveError,)))
    return final


def _per_rank_bytes(train: TrainState, device: torch.device) -> bytes:
    """This rank's state file: step, schedule length, scheduler, sampler position and RNG streams."""
    buffer = io.BytesIO()
    torch.save({
        "step": train.step,
        "max_steps": train.max_steps,
        "scheduler": train.scheduler.state_dict() if train.scheduler is not None else None,
        "sampler": train.sampler.state_dict() if train.sampler is not None else None,
        "rng": rng_state(device),
    }, buffer)
    return buffer.getvalue()


def _write_rank_file(tmp: Path, rank: int, step: int, data: bytes) -> dict:
    """This rank's state file; returns the checksums of every file this rank wrote."""
    rank_file = tmp / f"rank{rank:05d}.pt"
    _write_synced(rank_file, lambda f: f.write(data))
    # Each rank checksums what it wrote, in parallel; rank 0 adds what no rank claimed (.metadata).
    files = checksum_files([p for p in tmp.iterdir() if p.name.startswith(f"__{rank}_")] + [rank_file])
    if os.environ.get(_CRASH_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    return files


def _agree(write) -> dict:
    """Collective: every rank's `write()` result merged, or the first rank's CheckpointSaveError raised on
    every rank (none is left waiting for a rank that failed)."""
    try:
        mine: Any = (write(), None)
    except CheckpointSaveError as err:
        mine = (None, str(err))
    everyone = [mine]
    if _world() > 1:
        everyone = [None] * _world()
        dist.all_gather_object(everyone, mine)
    errors = [error for _, error in everyone if error]
    if errors:
        raise CheckpointSaveError(errors[0])
    return {name: record for files, _ in everyone for name, record in files.items()}


def _complete(root: Path, tmp: Path, final: Path, train: TrainState, files: dict, info: dict | None,
              keep_last: int) -> None:
    """Rank 0: the marker, the rename that completes the checkpoint, the pruning."""
    files.update(checksum_files([p for p in tmp.iterdir() if p.name not in files and p.is_file()]))
    recipe = {"recipe": resume_check.plain(train.recipe)} if train.recipe is not None else {}
    marker = json.dumps({"format": FORMAT, "step": train.step, "world_size": _world(), "time": time.time(),
                         **(info or {}), **recipe, "files": files}).encode()
    _write_synced(tmp / MARKER, lambda f: f.write(marker))
    _fsync_dir(tmp)
    _replace_dir(tmp, final)
    _fsync_dir(root)
    _prune(root, keep_last, train.step)


def _state_bytes(tree: Any) -> int:
    """Bytes of the tensors in a nested state dict (this rank's shards of DTensors)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, torch.Tensor):
        local = tree.to_local() if isinstance(tree, DTensor) else tree
        return local.numel() * local.element_size()
    if isinstance(tree, dict):
        return sum(_state_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_state_bytes(v) for v in tree)
    return 0


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
    """Collective. Restores model, optimizer state, scheduler step, sampler, RNG and `train.step` from
    `path` (verify it first: `agreed_resume`). Returns notices for rank 0's log.

    The recipe the checkpoint records is compared with `train.recipe` first (resume_check.py): a
    change a resume cannot honour raises CheckpointError before anything is read. The optimizer's
    hyperparameters (lr, betas, eps, weight decay) and a LambdaLR schedule's base lrs stay those the
    caller built from its recipe; only the optimizer's state (moments, step counts) and the schedule's
    position come from the checkpoint, and a changed lr is said with the jump it makes.

    Model and optimizer reshard to any world size (DCP). Per-rank state (sampler position, RNG) only
    means something for the world size that wrote it: with the same world size every rank's own file
    must be there; with another, step and scheduler come from rank 0's file and every rank says that
    the sampler position and RNG streams start fresh. Weights holding NaN or Inf are refused, named.
    Nothing in the checkpoint is unpickled beyond tensors and plain data (safe_load.py).
    """
    marker = read_marker(path)
    notices = _recipe_notices(path, marker, train)
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    base_lrs = list(getattr(train.scheduler, "base_lrs", []))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        reader = SafeReader(str(path))
        reader.read_metadata()  # refused here, in this module's words, rather than inside DCP
        dcp.load(state, storage_reader=reader, planner=SafePlanner())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    except (Exception, CheckpointException) as err:  # DCP's own messages do not name the checkpoint
        raise CheckpointError(f"reading checkpoint {path} failed: {cause_text(err)}") from None
    check_finite(model, f"the model weights of checkpoint {path}")
    notices += _keep_hyperparameters(optimizer, hyper)

    same_world = marker["world_size"] == _world()
    rank_file = path / (f"rank{_rank():05d}.pt" if same_world else "rank00000.pt")
    if not rank_file.is_file():
        raise CheckpointError(f"checkpoint {path} lacks {rank_file.name}, this rank's sampler position and RNG "
                              "state: its resume would not be exact. Resume from another checkpoint")
    try:
        per_rank = load_plain(rank_file, allow=numpy_array_classes() if marker.get("format") == 2 else ())
    except UnsafeCheckpointError as err:
        raise CheckpointError(str(err)) from None
    except Exception as err:
        raise CheckpointError(f"reading {rank_file} failed: {cause_text(err)}") from None
    train.step = per_rank["step"]
    if train.scheduler is not None and per_rank.get("scheduler") is not None:
        before = list(per_rank["scheduler"].get("_last_lr") or [])
        train.scheduler.load_state_dict(per_rank["scheduler"])
        notices += _continue_schedule(train, base_lrs, before, per_rank.get("max_steps"))
    if not same_world:
        warn_every_rank(f"checkpoint {path} was written by {marker['world_size']} processes, this run has "
                        f"{_world()}: model, optimizer, scheduler and step restored; this rank's sampler "
                        "position and RNG streams start fresh from the seed (the resume is not exact)")
        return notices
    if train.sampler is not None and per_rank["sampler"] is not None:
        train.sampler.load_state_dict(per_rank["sampler"])
    set_rng_state(per_rank["rng"], device)
    return notices


def _recipe_notices(path: Path, marker: dict, train: TrainState) -> list[str]:
    """Compare the checkpoint's recipe with `train.recipe` (resume_check's rule): CheckpointError for a
    refused change; the announcements otherwise (kept in `train.recipe_changes`)."""
    if train.recipe is None:
        return []
    saved, where = resume_check.saved_recipe(path, marker)
    if saved is None:
        return [where]
    changes = resume_check.compare(saved, train.recipe)
    refused = resume_check.refusal(path, changes)
    if refused:
        raise CheckpointError(refused)
    train.recipe_changes = changes
    return resume_check.announcements(path, changes)


def _keep_hyperparameters(optimizer: torch.optim.Optimizer, hyper: list[dict]) -> list[str]:
    """Put back the hyperparameters the optimizer was built with (set_state_dict restored the
    checkpoint's); the changed ones other than the lr (said by the schedule) are returned as notices."""
    groups = optimizer.param_groups
    if len(groups) != len(hyper):
        raise CheckpointError(f"the checkpoint's optimizer has {len(groups)} parameter group(s), this run's "
                              f"{len(hyper)}: it was written for another model or freeze list")
    changed = []
    for i, (group, built) in enumerate(zip(groups, hyper)):
        for key, value in built.items():
            if key not in ("lr", "initial_lr") and key in group and _differs(group[key], value):
                changed.append(f"{key} {group[key]} -> {value}")
        group.update(built)
    if not changed:
        return []
    return ["optimizer hyperparameters follow this recipe, not the checkpoint: " + ", ".join(sorted(set(changed)))]


def _continue_schedule(train: TrainState, base_lrs: list[float], before: list[float],
                       saved_max: int | None) -> list[str]:
    """A LambdaLR continues at the checkpoint's step with this run's base lrs and lambdas (the recipe's
    lr, schedule and train.max_steps); the lr of the next step is said when it differs from the lr the
    checkpoint's schedule would have given."""
    sched = train.scheduler
    if not (hasattr(sched, "lr_lambdas") and base_lrs):
        return []
    sched.base_lrs = list(base_lrs)
    lrs = [base * fn(sched.last_epoch) for base, fn in zip(base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = list(lrs)
    jump = (f"lr at step {train.step + 1}: {before[0]:.3g} before, {lrs[0]:.3g} now"
            if before and lrs and _differs(before[0], lrs[0]) else None)
    if saved_max is not None and train.max_steps is not None and saved_max != train.max_steps:
        return [f"train.max_steps changed from {saved_max} (the checkpoint's) to {train.max_steps}: the "
                f"learning-rate schedule now runs over {train.max_steps} steps" + (f" ({jump})" if jump else "")]
    return [f"the learning rate follows this recipe's optim.lr and schedule: {jump}"] if jump else []


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # betas: a tuple built, maybe a list read
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) > 1e-12 * max(abs(a), abs(b), 1e-30)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return not torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    return a != b


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
    reader = SafeReader(str(path))
    try:
        metadata = reader.read_metadata()
    except UnsafeCheckpointError as err:
        raise CheckpointError(f"reading checkpoint {path} failed: {err}") from None
    state: dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
            state[key[len("model."):]] = torch.empty(item.size, dtype=item.properties.dtype)
    if not state:
        raise ValueError(f"{path} holds no model tensors (keys: {sorted(metadata.state_dict_metadata)[:5]}...)")
    with warnings.catch_warnings():  # no_dist=True is the intent; DCP warns about it anyway
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        try:
            dcp.load({"model": state}, storage_reader=reader, planner=SafePlanner(), no_dist=True)
        except (Exception, CheckpointException) as err:
            raise CheckpointError(f"reading checkpoint {path} failed: {cause_text(err)}") from None
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def check_data_only(path: Path) -> None:
    """Read what an export does not need (rank files, DCP's non-tensor items) the safe way: a checkpoint
    holding anything but tensors and plain data is refused whole (CheckpointError), even by an export."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    allow = numpy_array_classes() if read_marker(path).get("format") == 2 else ()
    try:
        for rank_file in sorted(path.glob("rank*.pt")):
            load_plain(rank_file, allow)
        reader = SafeReader(str(path))
        items = {key: None for key, item in reader.read_metadata().state_dict_metadata.items()
                 if isinstance(item, BytesStorageMetadata)}
        if items:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load(items, storage_reader=reader, planner=SafePlanner(), no_dist=True)
    except (Exception, CheckpointException) as err:
        raise CheckpointError(f"reading checkpoint {path} failed: {cause_text(err)}") from None


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
            raise CheckpointError(f"checkpoint {path} {verdict(problems)}: {'; '.join(problems)}")
    check_data_only(path)
    state = consolidated_model_state(path, dtype)
    check_finite(state, f"the model weights of checkpoint {path} (not exported)")
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its file 0600
        with open(tmp, "rb") as f:  # data on disk before the rename makes it the export
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except Exception as err:  # OSError, or safetensors' own error types
        if tmp.is_file():
            tmp.unlink()
        need = sum(v.numel() * v.element_size() for v in state.values())
        cause = no_space(err, out.parent, need, "the file") or cause_text(err)
        raise ExportWriteError(f"writing {out} failed: {cause}; nothing was written there (checkpoint {path} "
                               "is untouched)") from None
    return len(state)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
