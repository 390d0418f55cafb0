"""FLOPs of one training step, the accelerators' peak throughput, and model FLOPs utilisation (MFU).

MFU counts the FLOPs the model needs (forward and backward once), not the FLOPs the hardware ran: the
forward that activation checkpointing repeats in backward is excluded. To count exactly that, the
count runs `torch.utils.flop_counter.FlopCounterMode` on a plain copy of the model (never sharded,
never checkpointed).

Counting at the benchmark's full shape would need the memory of an un-checkpointed step, which is the
very thing that does not fit. It is not needed: for a batch of B scenes of S frames, every op of the
model is per frame (patch embed, frame attention, MLPs, DPT heads: linear in S) or across the frames
of a scene (global attention, the camera trunk: quadratic in S), and everything is per scene (linear
in B). So FLOPs(B, S) = B * (a + b S + c S^2), exactly, and three counts at one scene of 1, 2 and 3
frames give a, b and c. (Counting on the `meta` device would need no memory at all, but the model's
RoPE reads its positions' maximum, a value meta tensors do not have.)

Scaled-dot-product attention is counted through its fused kernels' FLOP formulas on CUDA (less the
q k^T their backward formula recomputes); the CPU kernel has no formula, so on the CPU the count forces
the math backend, whose matrix products are counted instead. Both give 4 N^2 d per head forward and
twice that backward.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense BF16 tensor-core peak per GPU in TFLOP/s (vendor datasheets, without 2:4 sparsity).
# Matched against torch.cuda.get_device_name() as substrings, in this order: most specific first.
PEAK_BF16_DENSE_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5
    ("H200", 989.0),  # same compute as H100 SXM5, more and faster memory
    ("A100", 312.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The dense BF16 peak of the named GPU, or None when the table does not know it (and on the CPU)."""
    for key, value in PEAK_BF16_DENSE_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


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


def surrogate_loss(outputs: object) -> torch.Tensor:
    """Sum of the means of every floating-point tensor in a (nested) model output.

    Stands in for the training loss when counting: it makes every output receive a gradient, as the
    real losses do, while its own FLOPs (a few per output element) are negligible beside the model's.
    """
    tensors: list[torch.Tensor] = []

    def collect(obj: object) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and obj.requires_grad:
                tensors.append(obj)
        elif isinstance(obj, dict):
            for value in obj.values():
                collect(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                collect(value)

    collect(outputs)
    if not tensors:
        raise ValueError("the model output holds no floating-point tensor that requires grad")
    return sum(t.float().mean() for t in tensors)


SAMPLE_FRAMES = (1, 2, 3)  # frames per scene of the three counts that fix the quadratic


def _fused_attention_backward_ops() -> tuple:
    aten = torch.ops.aten
    names = ("_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward",
             "_scaled_dot_product_cudnn_attention_backward", "_flash_attention_backward",
             "_efficient_attention_backward")
    return tuple(getattr(aten, name) for name in names if hasattr(aten, name))


def _count(model: nn.Module, inputs: tuple, loss_fn: Callable[[object], torch.Tensor]) -> tuple[int, int]:
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as forward_counter:
        loss = loss_fn(model(*inputs))
    with FlopCounterMode(display=False) as backward_counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    backward = backward_counter.get_total_flops()
    # The fused attention kernels' backward formula counts five products: the four of the gradients
    # plus q k^T recomputed. The recompute is not model FLOPs (the math path has only the four), and
    # with equal query/value head widths, as in every VGGT attention, it is one fifth of the count.
    per_op = backward_counter.get_flop_counts()["Global"]
    fused = sum(per_op.get(op, 0) for op in _fused_attention_backward_ops())
    return forward_counter.get_total_flops(), backward - fused // 5


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
