"""Activation checkpointing: which modules are recomputed in backward, and the wrapping itself.

Policies (per block group, `parallel.checkpoint`), by what backward re-runs (formulas in
memory/formulas.py: `block_saved` for the bytes kept, `block_recompute_flops` for the work re-done):
- none:      keep every activation; nothing re-runs.
- attention: wrap the attention sub-module of each block: it keeps only its input, and backward re-runs
             the whole attention forward (qkv projection, qk-norm, RoPE, the SDPA kernel, the output
             projection). The rest of the block is kept, the MLP's wide activations among them (about
             two thirds of a block's bytes). This recomputes the costliest part and keeps the cheap one.
- selective: wrap whole blocks, keeping the block input and the tensors named in `save`:
             sdpa: the fused SDPA op's outputs (attention output and logsumexp; whichever backend ran:
                   flash, efficient, cuDNN, the CPU flash kernel), so backward never re-runs attention;
                   under SDPA's math kernel (fused kernels off, as in deterministic CUDA runs), the
                   attention output only: backward re-runs the scores and softmax;
             qkv:  the outputs of the block's matmuls that run before its SDPA op (for `layers.Block`:
                   the qkv projection), so backward skips the qkv matmul; qk-norm and RoPE, elementwise,
                   are recomputed from it.
             Everything else (norms, the other projections, the MLP) is recomputed. Op-level, through
             torch.utils.checkpoint's selective checkpoint contexts (`CheckpointPolicy.MUST_SAVE`).
- block:     wrap whole blocks: a block keeps only its input; backward re-runs its whole forward.
- every_n:   wrap whole blocks, the 1st, (n+1)-th, ... of each group: a dial between none and block.
Heads with a `checkpoint_chunks` attribute (VGGT's DPT heads) recompute per chunk of frames when
`checkpoint.heads` is "chunks"; the head implements that itself, this module only sets the flag.

Wrappers are torch's non-reentrant `checkpoint_wrapper`, applied before `fully_shard` (as torchtitan
does), replacing the module in its parent; state-dict keys are unchanged because the wrapper strips its
own prefix. Under `parallel.compile` the compiled region contains the wrapper (parallel/compiling.py),
so the partitioner applies the same policy to the graph.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from vggt_fsdp.parallel.config import SAVE_ORDER, CheckpointConfig, policy_label

WRAPPED_PREFIX = "_checkpoint_wrapped_module."


@dataclass(frozen=True)
class BlockPolicy:
    policy: str  # none | attention | selective | block
    group: str | None
    save: tuple[str, ...] = ()  # selective: the saved tensors, in SAVE_ORDER

    @property
    def label(self) -> str:
        """`none`, `attention`, `block`, `selective(sdpa)`, `selective(sdpa+qkv)` (config.policy_label)."""
        return policy_label(self.policy, self.save)


def block_policies(groups: list[str | None], cfg: CheckpointConfig) -> list[BlockPolicy]:
    """What each block (given its group, in model order) gets: every_n resolved to block/none by the
    block's index inside its group, selective's save set from the group's override or the section."""
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
        save: tuple[str, ...] = ()
        if policy == "selective":
            names = override.save if override is not None and override.save is not None else cfg.save
            save = tuple(name for name in SAVE_ORDER if name in names)
        result.append(BlockPolicy(policy=policy, group=group, save=save))
    return result


# --------------------------------------------------------------------------------------- selective
def _aten_ops(names: tuple[str, ...]) -> frozenset:
    aten = torch.ops.aten
    return frozenset(getattr(aten, name).default for name in names if hasattr(aten, name))


# The fused SDPA kernels F.scaled_dot_product_attention dispatches to.
SDPA_OPS = _aten_ops((
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
))
# What an nn.Linear runs as (addmm with a bias, mm without; bmm for inputs it cannot flatten).
MATMUL_OPS = _aten_ops(("mm", "addmm", "bmm", "baddbmm"))
# SDPA's math kernel (what runs when the fused kernels are switched off, as deterministic runs on CUDA
# do) is composite: no op of its own, it dispatches as bmm (scores) -> softmax -> bmm (output). The
# policy recognises that sequence: the projections are 2-D matmuls, attention's are batched.
PROJECTION_OPS = _aten_ops(("mm", "addmm"))
BATCHED_MATMUL_OPS = _aten_ops(("bmm", "baddbmm"))
SOFTMAX_OPS = _aten_ops(("_safe_softmax", "_softmax"))

# What the policy needs to know of an op, decided once per op type (the policy runs on every op of every
# checkpointed block, forward and recompute: a dict lookup, not a walk through four sets, per call).
_OTHER, _SDPA, _PROJECTION, _BATCHED, _SOFTMAX = range(5)
_KINDS: dict = {}


def _op_kind(op) -> int:
    kind = _KINDS.get(op)
    if kind is None:
        kind = (_SDPA if op in SDPA_OPS else _PROJECTION if op in PROJECTION_OPS
                else _BATCHED if op in BATCHED_MATMUL_OPS else _SOFTMAX if op in SOFTMAX_OPS else _OTHER)
        _KINDS[op] = kind
    return kind


class _Pass:
    """Where one pass (the forward, or its recompute) has got to in the block."""

    __slots__ = ("calls", "attention", "math_stage")

    def __init__(self):
        self.calls = 0
        self.attention = 0  # attention calls completed (fused ops, or math kernels' output matmuls)
        self.math_stage = 0  # 0: outside a math attention; 1: after its scores; 2: after its softmax


class SelectivePolicy:
    """The SAC policy of one checkpointed block call: MUST_SAVE for the ops whose outputs `save` names,
    PREFER_RECOMPUTE for every other op.

    `sdpa` saves the fused SDPA op's outputs; where SDPA ran its math kernel (fused kernels off, e.g. for
    deterministic CUDA runs) it saves the attention output (the matmul after the softmax) and backward
    re-runs the scores and softmax. `qkv` is positional: the 2-D matmuls before the block's first
    attention. The forward and each recompute count separately (`ctx.is_recompute`), so both passes make
    the same decisions in the same order.
    """

    def __init__(self, save: tuple[str, ...]):
        self.save = frozenset(save)
        self._save_sdpa = CheckpointPolicy.MUST_SAVE if "sdpa" in self.save else CheckpointPolicy.PREFER_RECOMPUTE
        self._save_qkv = "qkv" in self.save
        self.passes = {False: _Pass(), True: _Pass()}
        self.math_attention = False

    @property
    def calls(self) -> dict[bool, int]:
        return {k: p.calls for k, p in self.passes.items()}

    @property
    def sdpa_calls(self) -> dict[bool, int]:
        """Attention calls per pass (fused SDPA ops and math-kernel attentions)."""
        return {k: p.attention for k, p in self.passes.items()}

    def __call__(self, ctx, op, *args, **kwargs) -> CheckpointPolicy:
        state = self.passes[bool(ctx.is_recompute)]
        state.calls += 1
        kind = _KINDS.get(op)
        if kind is None:
            kind = _op_kind(op)
        if kind == _OTHER:
            return CheckpointPolicy.PREFER_RECOMPUTE
        if kind == _SDPA:
            state.attention += 1
            return self._save_sdpa
        if kind == _PROJECTION:
            if self._save_qkv and state.attention == 0 and state.math_stage == 0:
                return CheckpointPolicy.MUST_SAVE
            return CheckpointPolicy.PREFER_RECOMPUTE
        if kind == _SOFTMAX:
            if state.math_stage == 1:
                state.math_stage = 2
            return CheckpointPolicy.PREFER_RECOMPUTE
        # A batched matmul: the math kernel's scores, or (after its softmax) its output.
        if state.math_stage == 2:
            state.math_stage = 0
            state.attention += 1
            self.math_attention = True
            return self._save_sdpa
        state.math_stage = 1
        return CheckpointPolicy.PREFER_RECOMPUTE

    def check(self, module: nn.Module) -> None:
        """After a forward: a selective block must have run an attention, a fused SDPA op or the math
        kernel's scores -> softmax -> output (nothing ran under the policy when gradients are off, and
        nothing needs saving then)."""
        forward = self.passes[False]
        if forward.calls and not forward.attention:
            raise RuntimeError(
                f"selective checkpointing (save {sorted(self.save)}) of a {type(module).__name__} ran no "
                f"attention: no fused SDPA op ({', '.join(sorted(str(op) for op in SDPA_OPS))}) and no math-"
                "kernel attention (batched matmul -> softmax -> batched matmul). The block has no "
                "F.scaled_dot_product_attention: choose policy block (or attention) for this group")


def recomputed_ops(ops: Sequence, save: tuple[str, ...]) -> list[bool]:
    """For the forward ops of a selective block (aten OpOverloads, in order): True for each op backward
    runs again, False for each it takes from the SAC cache. SelectivePolicy's own decisions, for models
    of recompute work (memory/steptime.py)."""
    policy, forward = SelectivePolicy(save), SimpleNamespace(is_recompute=False)
    return [policy(forward, op) != CheckpointPolicy.MUST_SAVE for op in ops]


def _traced_contexts(save: tuple[str, ...]):
    """context_fn for a compiled block: dynamo needs a constant function (a partial of this one per save
    set); AOT autograd calls it once per trace, and each trace gets a fresh policy."""
    return create_selective_checkpoint_contexts(SelectivePolicy(save))


_observers: list[Callable[[list[torch.Tensor]], None]] = []


@contextlib.contextmanager
def observe_selective_cache(observer: Callable[[list[torch.Tensor]], None]) -> Iterator[None]:
    """Call `observer(tensors)` with what each eager selective block's SAC cache holds after its forward.

    These tensors stay alive until the block's backward but never pass through saved-tensor hooks (the
    SAC cache keeps them beside autograd), so memory accounting (memory/accounting.py) needs this."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


def _cached_tensors(caching_mode) -> list[torch.Tensor]:
    """The tensors a SAC forward context cached (its private `storage`: {op: list or dict of entries},
    each entry a tree of _VersionWrapper(tensor) or a marker)."""
    storage = getattr(caching_mode, "storage", None)
    if storage is None:
        raise RuntimeError("this torch's selective checkpoint context has no `storage`; the SAC cache "
                           "cannot be measured (vggt_fsdp.parallel.checkpointing._cached_tensors)")
    tensors = []
    for per_op in storage.values():
        entries = per_op.values() if isinstance(per_op, dict) else per_op
        for entry in entries:
            for leaf in torch.utils._pytree.tree_leaves(entry):
                value = getattr(leaf, "val", None)
                if isinstance(value, torch.Tensor):
                    tensors.append(value)
    return tensors


def selective_checkpoint(module: nn.Module, *args, save: tuple[str, ...], traced_context_fn: Callable,
                         **kwargs):
    """`checkpoint_fn` of a selective block's CheckpointWrapper: non-reentrant checkpoint with a SAC
    policy saving `save`. Eager: checks the forward and reports the cache to observers; compiled: the
    constant `traced_context_fn`, applied to the graph by AOT autograd's partitioner."""
    if torch.compiler.is_compiling():
        return checkpoint(module, *args, use_reentrant=False, context_fn=traced_context_fn, **kwargs)
    policy = SelectivePolicy(save)
    contexts = create_selective_checkpoint_contexts(policy)
    out = checkpoint(module, *args, use_reentrant=False, context_fn=lambda: contexts, **kwargs)
    policy.check(module)
    if _observers and policy.passes[False].calls:
        cached = _cached_tensors(contexts[0])
        for observer in _observers:
            observer(cached)
    return out


def _selective_wrapper(module: nn.Module, save: tuple[str, ...]) -> CheckpointWrapper:
    traced = functools.partial(_traced_contexts, save)
    return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                              checkpoint_fn=functools.partial(selective_checkpoint, save=save,
                                                              traced_context_fn=traced))


# --------------------------------------------------------------------------------------- wrapping
def wrap_modules(model: nn.Module, paths: list[str], saves: Mapping[str, tuple[str, ...]] | None = None) -> None:
    """Replace each module at `paths` by a non-reentrant checkpoint wrapper around it; a path in `saves`
    gets the selective policy keeping those tensors."""
    saves = saves or {}
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        child = getattr(parent, name)
        if isinstance(child, CheckpointWrapper):
            raise ValueError(f"{path} is already checkpoint-wrapped; apply the parallel plan once")
        wrapper = (_selective_wrapper(child, saves[path]) if path in saves
                   else checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
        parent.register_module(name, wrapper)


def set_chunk_checkpointing(model: nn.Module, paths: list[str]) -> None:
    for path in paths:
        model.get_submodule(path).checkpoint_chunks = True


def apply_checkpointing(model: nn.Module, wrap: list[str], chunked: list[str],
                        saves: Mapping[str, tuple[str, ...]] | None = None) -> None:
    """Wrap the modules at `wrap` (selectively those in `saves`) and switch on per-chunk recompute in
    the modules at `chunked`."""
    wrap_modules(model, wrap, saves)
    set_chunk_checkpointing(model, chunked)


def wrapped_paths(model: nn.Module) -> list[str]:
    """Paths (without wrapper prefixes) of the modules inside a checkpoint wrapper: for tests and show."""
    return [canonical_name(path) for path, module in model.named_modules() if isinstance(module, CheckpointWrapper)]


def canonical_name(name: str) -> str:
    """A parameter or module name as the unwrapped model spells it (as in its state dict)."""
    return name.replace(WRAPPED_PREFIX, "")
