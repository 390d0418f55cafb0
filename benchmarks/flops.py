"""Model FLOPs of one training step, the accelerators' peak throughput, and model FLOPs utilisation (MFU).

MFU counts the FLOPs the model needs (forward and backward once), not the FLOPs the hardware ran: the
forward that activation checkpointing repeats in backward is excluded, and so is the q k^T that a fused
attention backward recomputes. The count runs the package's counter (`vggt_fsdp.memory.flops.Counter`,
which the step-time planner uses too) on a plain copy of the model (never sharded, never checkpointed)
on the benchmark's device.

Counting at the benchmark's full shape would need the memory of an un-checkpointed step, which is the
very thing that does not fit. It is not needed: for a batch of B scenes of S frames, every op of the
model is per frame (patch embed, frame attention, MLPs, DPT heads: linear in S) or across the frames
of a scene (global attention, the camera trunk: quadratic in S), and everything is per scene (linear
in B). So FLOPs(B, S) = B * (a + b S + c S^2), exactly, and three counts at one scene of 1, 2 and 3
frames give a, b and c.

Why not count on the meta device, which needs no memory at all? What blocks it is autocast:
`torch.autocast` cannot be entered on the meta device, not even to disable it (torch 2.13:
`torch.autocast("meta", enabled=False)` raises "unsupported scalarType"), and VGGT's forward disables
autocast around its fp32 heads, as fp32 units under bf16 autocast must. (FLOPs do not depend on dtypes;
the planner therefore counts on meta unit by unit, each unit called directly: `vggt_fsdp/memory/steptime.py`.
Its model FLOPs for the 40GB recipe's 24-frame step equal this module's count on the H200 exactly,
569,861,497,663,488: tests/test_steptime.py.) A whole-model meta count is also slow: every elementwise
op runs a Python meta kernel, about 45 s for VGGT-1B on this project's CPU, where three small counts on
a GPU take seconds.

Scaled-dot-product attention is counted through its fused kernels' FLOP formulas on CUDA; on the CPU
the count forces the math backend, whose matrix products are counted instead. Both give 4 N^2 d per
head forward and twice that backward.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vggt_fsdp.hardware import card_for_device_name
from vggt_fsdp.memory.flops import ATTENTION_BACKWARD, Counter, surrogate_loss

__all__ = ["StepFlops", "count_step_flops", "mfu", "peak_tflops", "quadratic_in_frames", "surrogate_loss"]


def peak_tflops(device_name: str) -> float | None:
    """The dense BF16 peak of the named GPU (torch.cuda.get_device_name()) from the planner's card
    catalog (vggt_fsdp/hardware.yaml, which names card variants: an H200 NVL is not an H200 SXM),
    or None when the catalog does not know the card (and on the CPU)."""
    card = card_for_device_name(device_name)
    return None if card is None else card.peak_tflops["bf16"]


def mfu(flops_per_step: float, step_time_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (None without a known peak)."""
    if peak is None or step_time_s <= 0:
        return None
    return flops_per_step / step_time_s / (peak * 1e12)


@dataclass(frozen=True)
class StepFlops:
    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


SAMPLE_FRAMES = (1, 2, 3)  # frames per scene of the three counts that fix the quadratic


def _fused_attention_backward_ops() -> tuple:
    """The fused attention backward ops, whose FLOP formula includes recomputing q k^T."""
    return tuple(ATTENTION_BACKWARD)


def _count(model: nn.Module, inputs: tuple, loss_fn: Callable[[object], torch.Tensor]) -> tuple[int, int]:
    """Model FLOPs (forward, backward) of one call of `model` and the backward of `loss_fn` of its output."""
    model.zero_grad(set_to_none=True)
    with Counter() as forward_counter:
        loss = loss_fn(model(*inputs))
    with Counter() as backward_counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return forward_counter.work.model_flops, backward_counter.work.model_flops


def quadratic_in_frames(counts: dict[int, int], frames: int) -> int:
    """Evaluate at `frames` the quadratic through the counts at 1, 2 and 3 frames (exact in integers)."""
    f1, f2, f3 = (counts[s] for s in SAMPLE_FRAMES)
    # Newton's forward differences: f(s) = f1 + (s-1) d1 + (s-1)(s-2)/2 d2, integral at integer s.
    d1, d2 = f2 - f1, f3 - 2 * f2 + f1
    return f1 + (frames - 1) * d1 + (frames - 1) * (frames - 2) // 2 * d2


def count_step_flops(
    model: nn.Module,
    make_images: Callable[[int, int], torch.Tensor],
    scenes: int,
    frames_per_scene: int,
    loss_fn: Callable[[object], torch.Tensor] = surrogate_loss,
) -> StepFlops:
    """Model FLOPs of one forward and backward over `scenes` scenes of `frames_per_scene` frames.

    `model` is the plain, un-checkpointed model (its gradients are cleared after counting);
    `make_images(scenes, frames)` makes its input batch on the model's device.
    """
    device = next(model.parameters()).device
    model.train()
    counts_fwd, counts_bwd = {}, {}
    with _countable_attention(device):
        for frames in SAMPLE_FRAMES:
            counts_fwd[frames], counts_bwd[frames] = _count(model, (make_images(1, frames),), loss_fn)
    return StepFlops(forward=scenes * quadratic_in_frames(counts_fwd, frames_per_scene),
                     backward=scenes * quadratic_in_frames(counts_bwd, frames_per_scene))


def _countable_attention(device: torch.device):
    """On the CPU, the SDPA math backend (its matmuls are counted); elsewhere, the default kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH]) if device.type == "cpu" else contextlib.nullcontext()
