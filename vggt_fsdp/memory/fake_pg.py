"""One GPU's share of an N-GPU run, measured on one device.

FSDP2 over a *fake* process group of world size N (rank 0): every collective returns at once without
moving data, but every buffer FSDP allocates (sharded parameters, all-gather outputs, reduce-scatter
inputs, sharded gradients, optimizer state) has the size it has on rank 0 of a real N-GPU job. Memory
measured inside the context is therefore what one GPU of the real job holds; the numbers the model
computes are garbage (all-gathers leave uninitialised memory), which is fine for memory, never for loss.

This is the approach of torchtitan's memory estimator: the `fake` backend that PyTorch registers in
`torch.testing._internal.distributed.fake_pg` (present in torch 2.11 to 2.13), with its `FakeStore`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist


def _register_fake_backend() -> type:
    """Import the module whose import registers the `fake` backend; return its store class."""
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as exc:  # a stripped torch build without torch.testing
        raise RuntimeError(
            f"torch {torch.__version__} has no torch.testing._internal.distributed.fake_pg; the fake process "
            "group needs a full torch install (2.11 or newer)"
        ) from exc
    return FakeStore


@contextlib.contextmanager
def fake_process_group(world_size: int, device: str | torch.device = "cpu") -> Iterator[dist.ProcessGroup]:
    """Initialise the default process group as rank 0 of a fake group of `world_size` ranks.

    `device` is where the measured run will live ("cpu" or "cuda[:i]"); on CUDA it becomes the current
    device, as a launcher would make it. The group is destroyed on exit, also after an exception.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if dist.is_initialized():
        raise RuntimeError(
            "a process group is already initialised (backend "
            f"{dist.get_backend()!r}, world size {dist.get_world_size()}); the fake group must own the default group"
        )
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store_cls = _register_fake_backend()
    dist.init_process_group(backend="fake", rank=0, world_size=world_size, store=store_cls())
    try:
        yield dist.group.WORLD
    finally:
        # No barrier: a fake group has no peers to wait for.
        dist.destroy_process_group()
