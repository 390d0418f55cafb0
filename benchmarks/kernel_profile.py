"""Where a training step's device time goes: one profiled step, its kernels grouped by kind.

Used by `bench_step --profile FILE`. Kernel names are classified by substrings of the names cuBLAS,
cuDNN, FlashAttention and PyTorch's own kernels carry; a name that matches nothing counts as "other",
so the groups always add up to the profiled total.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

# First match wins: attention kernels also contain "gemm"-like substrings, convolutions "gemm" too.
KINDS: list[tuple[str, tuple[str, ...]]] = [
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("convolution", ("conv", "dgrad", "wgrad", "fprop", "cudnn", "implicit_gemm")),
    ("matmul", ("gemm", "xmma", "cutlass", "sm90", "sm80", "cublas", "matmul")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy / cast", ("copy", "cat", "fill", "memcpy", "memset")),
    ("elementwise / reduce", ("elementwise", "reduce", "vectorized", "unrolled", "index", "softmax", "gelu")),
]


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, keys in KINDS if any(k in name for k in keys)), "other")


def profile_step(step: Callable[[], None], device: torch.device, path: Path, top: int = 25) -> dict:
    """Profile one call of `step` on a CUDA device; write the summary to `path` (JSON) and return it."""
    if device.type != "cuda":
        raise ValueError(f"--profile needs a CUDA device, got {device}")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize(device)
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.self_device_time_total for e in kernels) or 1.0
    by_kind: dict[str, float] = {}
    for e in kernels:
        kind = kind_of(e.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + e.self_device_time_total
    summary = {
        "device_time_ms": round(total_us / 1e3, 2),
        "by_kind": {k: {"ms": round(v / 1e3, 2), "share": round(v / total_us, 4)}
                    for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"kernel": e.key[:160], "kind": kind_of(e.key), "calls": e.count,
                         "ms": round(e.self_device_time_total / 1e3, 2)}
                        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary
