"""Context parallelism: the frames of one scene split over a group of ranks (`parallel.context_parallel`).

The one place for the context exchange. A group of N consecutive ranks shares each scene; rank r of the
group holds frames [r*S/N, (r+1)*S/N) through everything that works frame by frame (patch embedding,
frame blocks, MLPs, DPT heads). Three things cross frames, and this module supplies each as a hook the
model calls (`vggt_fsdp.model.layers.ContextHooks`; the model never imports this layer):

- global attention, Ulysses style: an all-to-all trades the frame split for a head split (each rank then
  attends over every token of the scene with H/N heads), and a second one trades back. Both are
  `all_to_all_single_autograd`, whose backward is the inverse all-to-all, so forward and backward are
  exact. Under checkpointing a recomputed block exchanges again in backward (same order on every rank).
- tensors every rank needs whole (the camera head's pose tokens, the predictions the loss reads):
  `gather_frames` all-gathers them; its backward keeps this rank's slice of the (identical on every rank)
  gradient, times N. The factor N: FSDP averages gradients over all W ranks, a group of N holds one
  scene, and the work before a gather is split over the group (each rank's part a 1/N-th share of the
  scene's gradient) while the work after it is repeated on every rank (each rank the whole gradient).
  Scaling the split part by N makes both sum to N times the scene's gradient over the group, and the
  average over W = N * groups then equals one process per scene.
- which rank holds the scene's first frame (VGGT gives frame 0 its own camera and register tokens):
  `holds_first_frame`.
- the data: each rank builds only its frames; `first_frame` and `sum` let the group normalise the
  scenes and `gather_frames` share their ground truth (data/split_scenes.py).

Frames per scene must be a multiple of N: the sampler draws only such counts (data/sampler.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

# torch 2.13 renamed all_gather_into_tensor (and warns on the old name); 2.11 has only the old one.
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim` in rank order (a finished, synchronous all-gather)."""
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((size * moved.shape[0], *moved.shape[1:]))
    _all_gather_into(out, moved, group=group)
    return out.movedim(0, dim).contiguous()


def check_context_parallel(size: int, world_size: int, num_heads: dict[str, int]) -> None:
    """Raise unless a context group of `size` divides the world and every attention's head count
    (`num_heads`: where -> heads) that runs over a whole scene."""
    if size < 1:
        raise ValueError(f"parallel.context_parallel={size} must be >= 1")
    if world_size % size:
        raise ValueError(f"parallel.context_parallel={size} does not divide the {world_size} processes: each "
                         f"group of {size} ranks shares a scene; launch a multiple of {size} processes")
    for where, heads in num_heads.items():
        if heads % size:
            raise ValueError(f"parallel.context_parallel={size} does not divide the {heads} heads of {where}: "
                             "the all-to-all gives each rank heads/N of them; choose a divisor of "
                             f"{heads}")


def check_context_recipe(size: int, processes: int, num_heads: dict[str, int], track_head: bool) -> None:
    """What a recipe with parallel.context_parallel=`size` must satisfy, checked before any launch.
    (parallel.compile is fine: the functional collectives trace into the compiled blocks, and a compiled
    global block, and the whole model compiled (a slow test), matched one process:
    tests/test_context_parallel.py.)"""
    if size == 1:
        return
    check_context_parallel(size, processes, num_heads)
    if track_head:
        raise ValueError(f"parallel.context_parallel={size} with model.heads.track: the track head correlates "
                         "the first frame's feature maps with every frame's, which context parallelism spreads "
                         "over ranks; it is not supported: set model.heads.track=false or "
                         "parallel.context_parallel=1")


@dataclass(frozen=True)
class ContextLayout:
    """Where a rank sits: its context group (ranks sharing a scene) and its data-parallel index."""

    size: int  # N, ranks per scene
    rank: int  # this rank's index in its group
    group_index: int  # which group: the data-parallel rank the sampler sees
    num_groups: int  # data-parallel world size

    @staticmethod
    def of(global_rank: int, world_size: int, size: int) -> ContextLayout:
        return ContextLayout(size, global_rank % size, global_rank // size, world_size // size)

    def frames(self, num_frames: int) -> slice:
        """This rank's contiguous share of a scene's `num_frames` frames."""
        if num_frames % self.size:
            raise ValueError(f"a scene of {num_frames} frames cannot be split over a context group of "
                             f"{self.size}: frames per scene must be a multiple of parallel.context_parallel")
        share = num_frames // self.size
        return slice(self.rank * share, (self.rank + 1) * share)


class _GatherFrames(torch.autograd.Function):
    """All-gather along `dim`; backward: this rank's slice of the gradient times the group size."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group, rank: int, size: int) -> torch.Tensor:
        ctx.dim, ctx.rank, ctx.size, ctx.share = dim, rank, size, x.shape[dim]
        return _gather(x.detach(), dim, group, size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        local = grad.narrow(ctx.dim, ctx.rank * ctx.share, ctx.share) * ctx.size
        return local, None, None, None, None


class ContextGroup:
    """The hooks the model calls (model.layers.ContextHooks) for one context group of ranks."""

    def __init__(self, layout: ContextLayout, group: dist.ProcessGroup):
        self.layout, self.group = layout, group
        self.size, self.rank = layout.size, layout.rank
        self._ranks = dist.get_process_group_ranks(group)

    @property
    def holds_first_frame(self) -> bool:
        return self.rank == 0

    def _all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        return all_to_all_single_autograd(x.contiguous(), None, None, self.group)

    def heads_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, n, d): this rank's n tokens, all heads -> (B, H/N, N*n, d): every rank's tokens (rank
        order), this rank's H/N heads."""
        B, H, n, d = x.shape
        N = self.size
        # Chunk j of dim 0 goes to rank j: rank j receives its heads of every rank's tokens.
        send = x.reshape(B, N, H // N, n, d).permute(1, 0, 2, 3, 4)
        received = self._all_to_all(send)  # (N source ranks, B, H/N, n, d)
        return received.permute(1, 2, 0, 3, 4).reshape(B, H // N, N * n, d)

    def sequence_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `heads_to_sequence`: (B, H/N, N*n, d) -> (B, H, n, d)."""
        B, h, tokens, d = x.shape
        N = self.size
        send = x.reshape(B, h, N, tokens // N, d).permute(2, 0, 1, 3, 4)
        received = self._all_to_all(send)  # (N source ranks = head chunks, B, H/N, n, d)
        return received.permute(1, 0, 2, 3, 4).reshape(B, N * h, tokens // N, d)

    def first_frame(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as the group's first rank (the holder of every scene's frame 0) has it (no gradient)."""
        x = x.detach().contiguous().clone()
        dist.broadcast(x, src=self._ranks[0], group=self.group)
        return x

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """`x` summed over the group (no gradient)."""
        x = x.detach().contiguous().clone()
        dist.all_reduce(x, group=self.group)
        return x

    def gather_frames(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's frames of `x` along `dim` (rank order); see the module doc for its backward."""
        if not x.requires_grad:  # data, and predictions under no_grad
            return _gather(x, dim, self.group, self.size)
        return _GatherFrames.apply(x, dim, self.group, self.rank, self.size)


class StandInGroup:
    """One process standing in for a rank of a context group of `size`: a rank's work without the group.

    The exchange becomes a local reshuffle of this rank's own tokens, with the shapes the all-to-all gives
    (H/N heads over N times the tokens), and a gather repeats this rank's frames N times. Compute and
    memory are a rank's (up to the exchange's own buffers); the values are not a scene's, and nothing is
    communicated. The step-time model counts a rank's global blocks with it on the meta device
    (memory/steptime.py), and one GPU measures a rank's share of a long scene with it
    (benchmarks/long_share_gpu.py)."""

    holds_first_frame = True  # the share with frame 0's own camera and register tokens

    def __init__(self, size: int):
        self.size = size

    def heads_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        B, H, n, d = x.shape
        N = self.size
        return x.reshape(B, N, H // N, n, d).permute(0, 2, 1, 3, 4).reshape(B, H // N, N * n, d)

    def sequence_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, h, tokens, d = x.shape
        N = self.size
        return x.reshape(B, h, N, tokens // N, d).permute(0, 2, 1, 3, 4).reshape(B, N * h, tokens // N, d)

    def gather_frames(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return torch.cat([x] * self.size, dim)


def new_context_group(size: int) -> ContextGroup | None:
    """This rank's context group over the default process group (every rank calls this, in the same
    order: new_group is collective); None for size 1."""
    if size == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    check_context_parallel(size, world, {})
    layout = ContextLayout.of(rank, world, size)
    mine = None
    for index in range(layout.num_groups):
        group = dist.new_group(list(range(index * size, (index + 1) * size)))
        if index == layout.group_index:
            mine = group
    return ContextGroup(layout, mine)
