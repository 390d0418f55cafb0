"""Activation checkpointing: which modules are recomputed in backward, and the wrapping itself.

Policies (per block group, `parallel.checkpoint`):
- none:      keep every activation.
- attention: wrap only the attention sub-module of each block: its saved tensors (qkv, q and k after
             qk-norm and RoPE, the SDPA output: about a third of a block's, by memory/formulas.py) are
             recomputed, one attention forward per block; the rest, the MLP's wide ones among them, is kept.
- block:     wrap whole blocks: a block keeps only its input.
- every_n:   wrap whole blocks, the 1st, (n+1)-th, ... of each group: a dial between none and block.
Heads with a `checkpoint_chunks` attribute (VGGT's DPT heads) recompute per chunk of frames when
`checkpoint.heads` is "chunks"; the head implements that itself, this module only sets the flag.

Wrappers are torch's non-reentrant `checkpoint_wrapper`, applied before `fully_shard` (as torchtitan
does), replacing the module in its parent; state-dict keys are unchanged because the wrapper strips its
own prefix.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)

from vggt_fsdp.parallel.config import CheckpointConfig

WRAPPED_PREFIX = "_checkpoint_wrapped_module."


@dataclass(frozen=True)
class BlockPolicy:
    policy: str  # none | attention | block
    group: str | None


def block_policies(groups: list[str | None], cfg: CheckpointConfig) -> list[BlockPolicy]:
    """What each block (given its group, in model order) gets: every_n resolved to block/none by the
    block's index inside its group."""
    seen: dict[str | None, int] = {}
    result = []
    for group in groups:
        index = seen.get(group, 0)
        seen[group] = index + 1
        override = cfg.groups.get(group) if group is not None else None
        policy = override.policy if override is not None else cfg.policy
        n = (override.n if override is not None and override.n is not None else cfg.n)
        if policy == "every_n":
            policy = "block" if index % n == 0 else "none"
        result.append(BlockPolicy(policy=policy, group=group))
    return result


def wrap_modules(model: nn.Module, paths: list[str]) -> None:
    """Replace each module at `paths` by a non-reentrant checkpoint wrapper around it."""
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        child = getattr(parent, name)
        if isinstance(child, CheckpointWrapper):
            raise ValueError(f"{path} is already checkpoint-wrapped; apply the parallel plan once")
        parent.register_module(name, checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT))


def set_chunk_checkpointing(model: nn.Module, paths: list[str]) -> None:
    for path in paths:
        model.get_submodule(path).checkpoint_chunks = True


def apply_checkpointing(model: nn.Module, wrap: list[str], chunked: list[str]) -> None:
    """Wrap the modules at `wrap` and switch on per-chunk recompute in the modules at `chunked`."""
    wrap_modules(model, wrap)
    set_chunk_checkpointing(model, chunked)


def wrapped_paths(model: nn.Module) -> list[str]:
    """Paths (without wrapper prefixes) of the modules inside a checkpoint wrapper: for tests and show."""
    return [canonical_name(path) for path, module in model.named_modules() if isinstance(module, CheckpointWrapper)]


def canonical_name(name: str) -> str:
    """A parameter or module name as the unwrapped model spells it (as in its state dict)."""
    return name.replace(WRAPPED_PREFIX, "")
