"""Training metrics: device-side accumulation, metrics.jsonl, a progress line and TensorBoard.

Per-step values (loss, its terms, gradient norm) are added to device tensors; the host reads them only
at log steps, so the training step never waits for the GPU in between. Times are host wall-clock
intervals: between two log steps their sum equals the real elapsed time, because the log step's read
synchronises.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist


class MetricsAccumulator:
    """Sums of per-step device tensors and host counters between two log steps (every rank)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.frames = 0
        self.tokens = 0
        self.data_wait = 0.0
        self.started = time.perf_counter()

    def add_step(self, values: dict[str, torch.Tensor], frames: int, tokens: int, data_wait: float) -> None:
        for key, value in values.items():
            value = value.detach().float().to(self.device)  # offloaded grad norms live on the host
            if key in self.sums:
                self.sums[key].add_(value)
            else:
                self.sums[key] = value.clone()
        self.steps += 1
        self.frames += frames
        self.tokens += tokens
        self.data_wait += data_wait

    @contextlib.contextmanager
    def excluded(self):
        """Time inside this block (checkpoints, validation) does not count as training time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - t0

    def means(self, reduce_keys: tuple[str, ...] = ()) -> dict[str, float]:
        """Host sync. Per-step means; `reduce_keys` (per-rank values such as loss terms) are averaged
        over ranks with one all-reduce."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        stacked = torch.stack([self.sums[k] for k in keys]) / max(self.steps, 1)
        if dist.is_initialized() and reduce_keys:
            mask = torch.tensor([k in reduce_keys for k in keys], device=stacked.device)
            reduced = stacked.clone()
            dist.all_reduce(reduced)
            stacked = torch.where(mask, reduced / dist.get_world_size(), stacked)
        return dict(zip(keys, stacked.tolist()))


def memory_stats(device: torch.device) -> dict[str, Any]:
    """Peak device memory since the last call (then reset) and host RSS."""
    stats: dict[str, Any] = {"device": device.type,
                             "host_rss_gib": psutil.Process().memory_info().rss / 2**30}
    if device.type == "cuda":
        stats["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        stats["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # The CPU has no allocator statistics comparable to CUDA's; null, not a made-up number.
        stats["peak_allocated_gib"] = None
        stats["peak_reserved_gib"] = None
    return stats


class ProgressLine:
    """Rank 0's progress: one line rewritten in place on a terminal, one line per log step otherwise.
    Plain stderr writes; no dependency."""

    def __init__(self, max_steps: int, enabled: bool, stream=None):
        self.max_steps = max_steps
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        mem = record.get("peak_allocated_gib")
        mem_text = f"{mem:.2f} GiB" if mem is not None else "n/a (cpu)"
        width = len(str(self.max_steps))
        text = (f"step {record['step']:>{width}}/{self.max_steps} {100 * record['step'] / self.max_steps:3.0f}% "
                f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['frames_per_s']:.1f} frames/s "
                f"peak {mem_text}")
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class MetricsWriter:
    """Rank 0's sinks: metrics.jsonl (one JSON object per logged step) and optionally TensorBoard."""

    def __init__(self, output_dir: Path, tensorboard: bool, static: dict[str, Any]):
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        self.file = open(self.path, "a", buffering=1)
        self.static = static  # world size, sharding and checkpoint policy: the same on every line
        self.tb = _tensorboard_writer(output_dir / "tensorboard") if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        record = {**record, **self.static}
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in _scalars(record):
                if key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _scalars(record: dict[str, Any], prefix: str = ""):
    """(tag, number) pairs of a record, nested dicts (loss_terms, grad_norm_groups, val) as `a/b`."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise RuntimeError(
            "train.tensorboard=true needs the `tensorboard` package (pip install tensorboard), "
            f"which is not installed ({err}); or set train.tensorboard=false") from None
    return SummaryWriter(str(path))


def sum_counts(counts: dict[str, dict[str, int]], device: torch.device) -> dict[str, dict[str, int]]:
    """Per-rank counters ({counter: {source: n}}, the same keys on every rank) summed over ranks: one
    all-reduce (collective)."""
    keys = [(name, label) for name in sorted(counts) for label in sorted(counts[name])]
    if dist.is_initialized() and dist.get_world_size() > 1 and keys:
        from vggt_fsdp.train.integrity import collective_device

        values = torch.tensor([counts[n][label] for n, label in keys], dtype=torch.int64,
                              device=collective_device(device))
        dist.all_reduce(values)
        for (name, label), value in zip(keys, values.tolist()):
            counts[name][label] = value
    return counts


def truncate_metrics(output_dir: Path, step: int) -> int:
    """Keep the metrics.jsonl records of steps <= `step` (where a resumed run continues) and move the
    others, which the resumed run writes again, to metrics-discarded.jsonl. Returns how many moved.
    The file is replaced atomically: a crash leaves the old or the new one."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    kept, dropped = [], []
    for line in path.read_text().splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            late = json.loads(line).get("step", 0) > step
        except (json.JSONDecodeError, AttributeError):
            late = True  # a half-written last line of a crashed run
        (dropped if late else kept).append(line if line.endswith("\n") else line + "\n")
    if not dropped:
        return 0
    with open(path.with_name("metrics-discarded.jsonl"), "a") as f:
        f.writelines(dropped)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return len(dropped)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
