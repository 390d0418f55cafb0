"""torch.compile of the transformer blocks (`parallel.compile: true`).

Each block's own `forward` is compiled, not the module wrapped: parameter names stay those of the plain
model (checkpoints, exports and clipping groups are unaffected), FSDP2's all-gather hooks and the
checkpoint wrapper stay outside the compiled region, and blocks of one class share compiled code
(dynamo guards on the module's structure, not its identity): VGGT-1B's 76 blocks compiled 4 graphs in
the H200 session 3 run (benchmarks/results/2026-11-27-nvidia-h200-session3.log: with and without RoPE,
frame vs global batch, autocast off in the fp32 camera trunk). Compiling fuses the memory-bound part
of a step (LayerNorm, casts, RoPE, LayerScale, residual adds: about 37% of the 40GB recipe's device
time in the profile of benchmarks/results/2026-11-27-nvidia-h200-followup.md).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper


def compile_blocks(model: nn.Module, paths: list[str], backend: str = "inductor") -> None:
    """Compile the forward of each block at `paths` (inside its checkpoint wrapper, if any)."""
    for path in paths:
        module = model.get_submodule(path)
        inner = module._checkpoint_wrapped_module if isinstance(module, CheckpointWrapper) else module
        inner.forward = torch.compile(inner.forward, backend=backend)
