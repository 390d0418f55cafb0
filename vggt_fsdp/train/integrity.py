"""What makes a checkpoint or an export trustworthy: file checksums and finite weights.

Checksums: when a checkpoint completes, every file's size and the CRC-32 of each 16 MiB block are
recorded in its COMPLETE marker (each rank checksums the files it wrote, rank 0 gathers them), and
before a resume or an export they are checked again, the files spread over the ranks. CRC-32 detects
corruption (flipped bytes, truncation, a stale copy), not tampering; per-block values name the damaged
byte range and let several threads share one large file (zlib releases the GIL), so a rank's 2 GB of
VGGT-1B shards take about a second on 4 cores.

Finite weights: `nonfinite_names` finds the tensors holding NaN or Inf on any rank with one kernel per
tensor, one all-reduce of the flag vector and one host read: cheap enough before every checkpoint, not
meant for every step.
"""
from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist

BLOCK_BYTES = 16 * 2**20
_SHOW = 8  # names listed in a message


class NonFiniteWeightsError(RuntimeError):
    """Model weights hold NaN or Inf; the message names the tensors."""


# ------------------------------------------------------------------------------------- checksums
def _threads() -> int:
    """Threads per process: the node's cores shared by the node's ranks, at most 8."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 1) // max(local, 1)))


def _block_crcs(path: Path, size: int, pool: ThreadPoolExecutor):
    def crc(offset: int) -> int:
        with open(path, "rb", buffering=0) as f:
            return zlib.crc32(os.pread(f.fileno(), BLOCK_BYTES, offset))

    return pool.map(crc, range(0, size, BLOCK_BYTES))


def checksum_files(paths: Iterable[Path], threads: int | None = None) -> dict[str, dict]:
    """{file name: {"size": bytes, "crc32": [one per BLOCK_BYTES block]}} for files of one directory."""
    paths = list(paths)
    with ThreadPoolExecutor(threads or _threads()) as pool:
        sizes = {p: p.stat().st_size for p in paths}
        pending = {p: _block_crcs(p, sizes[p], pool) for p in paths}
        return {p.name: {"size": sizes[p], "crc32": list(pending[p])} for p in paths}


def verify_files(directory: Path, expected: dict[str, dict], threads: int | None = None) -> list[str]:
    """What differs between the files of `directory` and their records (empty: all intact)."""
    problems, present = [], []
    for name, record in sorted(expected.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != record["size"]:
            problems.append(f"{name} has {path.stat().st_size:,} bytes, {record['size']:,} were written"
                            + (" (truncated)" if path.stat().st_size < record["size"] else ""))
        else:
            present.append(path)
    actual = checksum_files(present, threads)
    for path in present:
        bad = [i for i, (a, b) in enumerate(zip(actual[path.name]["crc32"], expected[path.name]["crc32"]))
               if a != b]
        if bad:
            first, last = bad[0] * BLOCK_BYTES, min((bad[-1] + 1) * BLOCK_BYTES, expected[path.name]["size"])
            problems.append(f"{path.name}: {len(bad)} block(s) of bytes {first:,}-{last:,} differ from "
                            "their checksum (the bytes changed after they were written)")
    return problems


def share_of(names_sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """This rank's share of files to verify: largest first, each to the least loaded rank."""
    loads, owner = [0] * world, {}
    for name, size in sorted(names_sizes.items(), key=lambda item: (-item[1], item[0])):
        target = loads.index(min(loads))
        owner[name] = target
        loads[target] += size
    return [name for name, r in owner.items() if r == rank]


# ------------------------------------------------------------------------------------- finite weights
def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def collective_device(tensor_device: torch.device) -> torch.device:
    """NCCL reduces CUDA tensors only (parameters may live on the host with cpu_offload)."""
    if dist.is_initialized() and "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return tensor_device


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]], collective: bool = True) -> list[str]:
    """Names of the floating-point tensors that hold NaN or Inf in this rank's shard or any other's.

    `collective` (with a process group of several ranks): every rank must call it with the same names in
    the same order; one all-reduce of a flag per tensor, one host read. Otherwise this process's tensors
    only.
    """
    named = [(name, _local(t.detach())) for name, t in named if t.is_floating_point()]
    if not named:
        return []
    device = named[0][1].device
    flags = torch.stack([(~torch.isfinite(t)).any().to(device) if t.numel() else torch.zeros((), dtype=torch.bool,
                                                                                              device=device)
                         for _, t in named]).to(torch.int32)
    if collective and dist.is_initialized() and dist.get_world_size() > 1:
        flags = flags.to(collective_device(device))
        dist.all_reduce(flags)
    return [name for (name, _), bad in zip(named, flags.tolist()) if bad]


def model_nonfinite_names(model: torch.nn.Module) -> list[str]:
    """`nonfinite_names` over a model's parameters and buffers, under the plain model's names."""
    from vggt_fsdp.parallel.checkpointing import canonical_name

    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [canonical_name(name) for name in nonfinite_names(tensors)]


def describe_names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return f"{len(names)} tensor(s): {shown}" + (f", ... ({len(names) - _SHOW} more)" if len(names) > _SHOW else "")


def check_finite(model_or_state, what: str) -> None:
    """Raise NonFiniteWeightsError naming the tensors of a model (collective: every rank calls it) or of
    this process's state dict that hold NaN or Inf. `what` says whose they are ("initial weights X")."""
    if isinstance(model_or_state, torch.nn.Module):
        names = model_nonfinite_names(model_or_state)
    else:
        names = nonfinite_names(model_or_state.items(), collective=False)
    if names:
        raise NonFiniteWeightsError(f"{what} hold NaN or Inf in {describe_names(names)}")
