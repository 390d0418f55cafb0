"""Training metrics: device-side accumulation, metrics.jsonl, a progress line and experiment trackers.

Trackers are Accelerate's (`train.log_with`: tensorboard, wandb, mlflow, comet_ml, aim, clearml,
dvclive, swanlab, trackio; `train.tensorboard: true` is `log_with: [tensorboard]`): rank 0 gives each
the same numbers metrics.jsonl holds, as scalars at their step (nested ones as `loss_terms/camera`,
`val/loss`): loss and its terms, lr, gradient norms, throughput, MFU, memory. TensorBoard writes to
output_dir/tensorboard, W&B keeps its run under output_dir (offline with WANDB_MODE=offline), the others
where their own settings say (e.g. MLFLOW_TRACKING_URI). Each needs its own package: the `tracking`
extra of setup.cfg, or `pip install NAME`.

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
    """Rank 0's sinks: metrics.jsonl (one JSON object per logged step) and the experiment trackers."""

    def __init__(self, output_dir: Path, tensorboard: bool, static: dict[str, Any], log_with: list[str] = ()):
        names = list(log_with) + (["tensorboard"] if tensorboard and "tensorboard" not in log_with else [])
        output_dir.mkdir(parents=True, exist_ok=True)
        self.trackers = start_trackers(names, output_dir, static)
        self.path = output_dir / "metrics.jsonl"
        self.file = open(self.path, "a", buffering=1)
        self.static = static  # world size, sharding and checkpoint policy: the same on every line

    def write(self, record: dict[str, Any]) -> None:
        record = {**record, **self.static}
        self.file.write(json.dumps(record) + "\n")
        if self.trackers:
            scalars = {key: value for key, value in _scalars(record) if key not in self.static and key != "step"}
            for tracker in self.trackers:
                tracker.log(scalars, step=record["step"])

    def close(self) -> None:
        self.file.close()
        for tracker in self.trackers:
            tracker.finish()


def _scalars(record: dict[str, Any], prefix: str = ""):
    """(tag, number) pairs of a record, nested dicts (loss_terms, grad_norm_groups, val) as `a/b`."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


# tracker -> the package it needs (what `pip install` takes), where it differs from the name
TRACKER_PACKAGES = {"comet_ml": "comet-ml"}


def tracker_problems(names: list[str]) -> list[str]:
    """What is wrong with `train.log_with` here: an unknown tracker (with the closest name) or one whose
    package is not installed (with the command that installs it without touching torch)."""
    import difflib
    import importlib.util

    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    problems = []
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            close = difflib.get_close_matches(name, list(LOGGER_TYPE_TO_CLASS), n=1)
            problems.append(f"{name!r} is not a tracker Accelerate knows" + (f" (did you mean {close[0]!r}?)" if close
                            else "") + f"; valid: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
        elif importlib.util.find_spec(name) is None:
            package = TRACKER_PACKAGES.get(name, name)
            problems.append(f"{name} needs the `{package}` package, which is not installed: pip install {package} "
                            "--constraint <(pip list --format=freeze | grep '^torch==') (keeps your torch), or "
                            "pip install 'vggt-fsdp[tracking]'")
    return problems


def start_trackers(names: list[str], output_dir: Path, config: dict[str, Any]) -> list:
    """Accelerate's tracker objects for `names`, started, with the run's static settings as their config."""
    if not names:
        return []
    problems = tracker_problems(names)
    if problems:
        raise RuntimeError("train.log_with: " + "; ".join(problems))
    from accelerate import PartialState
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    PartialState()  # the trackers log through Accelerate's logger, which needs it (the trainer made it already)
    project = output_dir.resolve().name
    trackers = []
    for name in names:
        cls = LOGGER_TYPE_TO_CLASS[name]
        if name == "tensorboard":  # output_dir/tensorboard, where train.tensorboard always wrote
            tracker = cls("tensorboard", str(output_dir))
        elif name == "wandb":
            tracker = cls(project, dir=str(output_dir))
        elif cls.requires_logging_directory:
            tracker = cls(project, str(output_dir / "trackers"))
        else:
            tracker = cls(project)
        tracker.start()
        trackers.append(tracker)
    flat = {key: (value if isinstance(value, (int, float, str, bool)) else str(value))
            for key, value in _flatten(config)}
    for tracker in trackers:
        tracker.store_init_configuration(flat)
    return trackers


def _flatten(record: dict[str, Any], prefix: str = ""):
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def peak_flops(device: torch.device) -> float | None:
    """The bf16 matmul peak (FLOP/s) of the card this process runs on, as hardware.yaml publishes it;
    None on a CPU or an unknown card (MFU is then not reported: no made-up peak)."""
    if device.type != "cuda":
        return None
    from vggt_fsdp.hardware import card_for_device_name

    found = card_for_device_name(torch.cuda.get_device_name(device))
    return found.peak("matmul") if found is not None else None


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
