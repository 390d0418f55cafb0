"""What a failed checkpoint save, load or export says: torch's errors in the toolkit's words.

torch reports a full disk during a save as `RuntimeError: [enforce fail at inline_container.cc] .
unexpected pos ...` (no errno, no path), and DCP gathers every rank's error into a `CheckpointException`,
which derives from BaseException, so `except Exception` never sees it. Here they become one line that
names the checkpoint, the cause (a full disk said as such, with the bytes needed and free), what was
cleaned up and what is intact.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Callable

from torch.distributed.checkpoint.api import CheckpointException

from vggt_fsdp.train.safe_load import UnsafeCheckpointError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names its path and what is wrong."""


class CheckpointSaveError(CheckpointError):
    """A save that failed; the message names the path, the cause (a full disk said as such) and that
    the previous checkpoint is intact. The partial directory has been removed."""


class ExportWriteError(CheckpointError):
    """The export file could not be written (a full disk, a path that is not writable)."""


def causes(err: BaseException) -> list[BaseException]:
    """`err`, its causes and contexts, and the per-rank failures a CheckpointException gathered."""
    found, todo = [], [err]
    while todo:
        item = todo.pop()
        if item is None or any(item is f for f in found):
            continue
        found.append(item)
        todo += [item.__cause__, item.__context__]
        if isinstance(item, CheckpointException):
            todo += [pair[0] if isinstance(pair, tuple) else pair for pair in item.failures.values()]
    return found


def cause_text(err: BaseException) -> str:
    """The innermost meaningful error: an UnsafeCheckpointError where one was raised (possibly inside
    DCP's CheckpointException), otherwise the first non-DCP error of the chain, on one line."""
    found = causes(err)
    unsafe = [c for c in found if isinstance(c, UnsafeCheckpointError)]
    if unsafe:
        return str(unsafe[0])
    first = next((c for c in found if not isinstance(c, CheckpointException)), err)
    text = str(first).strip()
    return f"{type(first).__name__}: {text.splitlines()[0][:300] if text else '(no message)'}"


def no_space(err: BaseException, where: Path, need: int, what: str) -> str | None:
    """"no space left on the device holding WHERE: WHAT needs about N, M is free" when `err` came from a
    full disk (an errno saying so, or less free space than `need`), else None."""
    free = free_bytes(where)
    full = (any(isinstance(c, OSError) and c.errno in NO_SPACE for c in causes(err))
            or (free is not None and free < need))
    if not full:
        return None
    return (f"no space left on the device holding {where}: {what} needs about {size_text(need)}, "
            f"{size_text(free) if free is not None else 'an unknown amount'} is free")


def free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def size_text(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count} bytes"


class SaveFailure:
    """Turns whatever a save step raised (DCP's CheckpointException, torch's "unexpected pos" of a short
    write, an OSError) into a CheckpointSaveError, and removes the partial directory once every rank
    knows. `estimate`: the bytes the whole checkpoint needs; `previous()`: the newest other complete
    checkpoint, said to be intact."""

    def __init__(self, root: Path, tmp: Path, final: Path, estimate: int, previous: Callable[[], Path | None]):
        self.root, self.tmp, self.final, self.estimate, self.previous = root, tmp, final, estimate, previous

    def wrap(self, step):
        """`step` raising CheckpointSaveError only (so a collective decision can pass it on)."""
        def wrapped():
            try:
                return step()
            except CheckpointSaveError:
                raise
            except (Exception, CheckpointException) as err:
                raise self.error(err) from None
        return wrapped

    def run(self, step):
        """`wrap(step)()` for a step whose failure every rank learns of; then the partial directory goes."""
        try:
            return self.wrap(step)()
        except CheckpointSaveError:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def error(self, err: BaseException) -> CheckpointSaveError:
        # The partial directory stays until every rank has heard of the failure (`run`): another rank may
        # still be writing into it, and would fail on the missing directory instead of saying the cause.
        full = no_space(err, self.root, self.estimate, "the checkpoint (an estimate: this rank's model and "
                                                      "optimizer state times the world size)")
        fix = ("Free space, or set train.output_dir on a larger filesystem (or lower train.keep_last), then run "
               "again to resume" if full else "Fix the cause, then run again to resume")
        previous = self.previous()
        kept = (f"the previous checkpoint {previous} is intact" if previous
                else f"no earlier checkpoint exists in {self.root}")
        return CheckpointSaveError(f"saving checkpoint {self.final} failed: {full or cause_text(err)}. The partial "
                                   f"directory {self.tmp} was removed; {kept}. {fix}")
