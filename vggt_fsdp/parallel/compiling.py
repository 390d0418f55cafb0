"""torch.compile of the transformer blocks (`parallel.compile: true`).

What is compiled: the `forward` of each block unit's outermost module, i.e. the checkpoint wrapper of a
block under the block or selective policy, the block itself under none or attention (an attention
wrapper is then inside it). Parameter names stay those of the plain model (checkpoints, exports and
clipping groups are unaffected) and FSDP2's all-gather hooks stay outside the compiled region.

Why around the checkpoint wrapper, not inside it: compiled inside a non-reentrant wrapper, a block's
backward re-runs its forward through dynamo's cache, where every block of the class shares one cache.
Inductor pads the strides of a static graph; once a second shape (the global blocks') has made dynamo
compile a dynamic graph, the frame blocks' recompute can hit that unpadded graph while their backward
belongs to the padded one: `assert_size_stride` fails at the first step that holds two or more scenes
(pytorch#166926; tests/test_compile.py reproduces it on the CPU). With the wrapper inside the compiled
region, recompute is part of the graph's own backward (AOT autograd's partitioner recomputes what the
checkpoint does not keep), no cache lookup happens in backward, and the partitioner applies the
selective policy's MUST_SAVE tags: compile and `selective` work together.

Shapes: the sampler draws a new (scenes, frames, height) every step. Every block input dim is dynamic
from the first call (`dynamic=True`; parameters stay static; no duck sizing, so a dim that equals another
by chance is not specialised with it), so a new shape never recompiles. Measured with the tiny VGGT, a
policy per group, 20 sampler-drawn steps (frames 2-8, two heights) and a validation pass every 5 steps
(dynamo's decisions: "eager" backend; on a similar sequence inductor compiled the same graphs as
aot_eager over 6 steps):
14 graphs with dynamic=True, all by step 14 (7 with gradients and 7 without: DINO; frame, its first
block apart since its input is a view; global and camera trunk, with one scene apart since dynamo
specialises size-1 dims); 17 with automatic dynamic (static first); 47 and still growing with
dynamic=False. A kind of block (`block_kinds`) thus compiles at most `GRAPHS_PER_KIND` graphs, and
dynamo's recompile limit is raised to that bound. Each new graph is logged on rank 0 and counted
(`compiled_graphs`); going past the bound fails (fullgraph) naming the block, never falls back to eager.

Compiling fuses the memory-bound part of a step (LayerNorm, casts, RoPE, LayerScale, residual adds:
about 37% of the 40GB recipe's device time in the profile of
benchmarks/results/2026-11-27-nvidia-h200-followup.md).
"""
from __future__ import annotations

import functools
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.fx.experimental import _config as fx_config

# A kind of block compiles one graph per combination of: one scene or several (dynamo specialises a
# batch dim of 1), one frame or several (the camera trunk's sequence), an input that is a view or not
# (the first block of a group), with or without gradients (validation).
GRAPHS_PER_KIND = 16


@dataclass(frozen=True)
class GraphRecord:
    """One graph dynamo compiled for a block: which block asked, and its input shapes (symbolic dims
    print as s0, s1, ...)."""

    path: str
    input_shapes: tuple[tuple, ...]


_graphs: list[GraphRecord] = []
_calling = threading.local()  # the block path whose compiled forward is running


def compiled_graphs() -> list[GraphRecord]:
    """Every block graph compiled in this process, in order."""
    return list(_graphs)


class _CountingBackend:
    """A dynamo backend that records each graph, then hands it to `backend`."""

    def __init__(self, backend: str):
        self.backend = backend

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        path = getattr(_calling, "path", "?")
        shapes = tuple(tuple(value.shape) for value in _placeholder_values(gm)
                       if isinstance(value, torch.Tensor) and value.dim() >= 2 and not isinstance(value, nn.Parameter))
        # Dynamo may restart a trace from inside the backend (e.g. to turn a float into a tensor): a graph
        # counts once the backend has returned it.
        compiled = torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)
        _graphs.append(GraphRecord(path, shapes))
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"[vggt-fsdp] compile: block graph {len(_graphs)} for {path} (inputs "
                  f"{', '.join('x'.join(map(str, s)) for s in shapes[:2])}, {self.backend})", file=sys.stderr, flush=True)
        return compiled


def _placeholder_values(gm: torch.fx.GraphModule) -> list:
    """The graph's inputs as dynamo traced them (fake tensors whose dynamic dims are symbols)."""
    return [node.meta.get("example_value") for node in gm.graph.nodes if node.op == "placeholder"]


def block_kinds(model: nn.Module, paths: list[str]) -> int:
    """How many different blocks there are to compile graphs for: by type and parameter dtype of the
    module at each path (a wrapper's type names its policy; groups of one type share graphs)."""
    kinds = set()
    for path in paths:
        module = model.get_submodule(path)
        inner = getattr(module, "_checkpoint_wrapped_module", module)
        dtypes = tuple(sorted({str(p.dtype) for p in module.parameters()}))
        checkpoint_fn = getattr(module, "checkpoint_fn", None)
        keywords = tuple(sorted((k, repr(v)) for k, v in getattr(checkpoint_fn, "keywords", {}).items()))
        kinds.add((type(module).__name__, type(inner).__name__, dtypes, keywords,
                   tuple(type(m).__name__ for m in inner.modules())))
    return len(kinds)


def _raise_recompile_limit(graphs: int) -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), graphs))


def compile_blocks(model: nn.Module, paths: list[str], backend: str = "inductor", dynamic: bool | None = True) -> None:
    """Compile the forward of each block unit at `paths` (its checkpoint wrapper, if any, inside).

    `dynamic`: True (the trainer's choice, see the module docstring); None is dynamo's automatic
    dynamic (static first), for tests that need a static graph."""
    counting = _CountingBackend(backend)
    _raise_recompile_limit(GRAPHS_PER_KIND * block_kinds(model, paths))
    for path in paths:
        module = model.get_submodule(path)
        compiled = torch.compile(module.forward, backend=counting, fullgraph=True, dynamic=dynamic)
        module.forward = _named_forward(compiled, path)


def _named_forward(compiled, path: str):
    """The compiled forward, telling the backend which block it compiles for, and naming the block
    when dynamo refuses another graph."""
    too_many = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", ())

    @functools.wraps(compiled)
    def forward(*args, **kwargs):
        _calling.path = path
        try:
            # No duck sizing: a dim that happens to equal another on the first call (batch x frames =
            # the RoPE tables' half head dim, say) would share its symbol and be specialised with it.
            with fx_config.patch(use_duck_shape=False):
                return compiled(*args, **kwargs)
        except too_many as err:
            raise RuntimeError(
                f"parallel.compile: block {path} needs another graph after {len(_graphs)} block graphs "
                f"(bound: {GRAPHS_PER_KIND} per kind of block, vggt_fsdp/parallel/compiling.py); graphs so far: "
                f"{[(g.path, g.input_shapes[:1]) for g in _graphs]}. Set parallel.compile=false and report "
                "the shapes") from err

    return forward
