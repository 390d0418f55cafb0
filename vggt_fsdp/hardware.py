"""The cards the planner knows, and the recipe section that states which one a recipe is for.

`hardware.yaml` (package data, beside this module) lists each card: its memory, its published peaks and
bandwidth, and the rate at which it runs each kind of work (measured on that card, or derived from a
measured card's efficiency). `card(name)` returns one; `card_for_device_name` finds the card torch
reports. A recipe names its card in `hardware.device` (`HardwareConfig`); `cpu` stands for CPU
processes, whose memory the recipe states itself.
"""
from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import yaml

CATALOG = Path(__file__).with_name("hardware.yaml")
CPU = "cpu"
GPU = "gpu"  # a CUDA card not in the catalog: the recipe states its memory, and no rates are known
GiB = 1024**3
# Kinds of work and the peak each is held against when a rate is derived (see hardware.yaml).
RATE_PEAKS = {"attention": "bf16", "matmul": "bf16", "convolution": "tf32", "memory": "bandwidth"}


@dataclass(frozen=True)
class Measurement:
    """A profiled step on a card: kernel time and counted work by kind (see hardware.yaml)."""

    kernel_ms: dict[str, float]
    work: dict[str, int]  # attention, matmul, convolution: FLOPs; bytes: memory-bound bytes
    step: dict
    source: dict[str, str]


@dataclass(frozen=True)
class Card:
    name: str
    title: str
    match: tuple[str, ...]
    memory_gib: float
    memory_source: str
    peak_tflops: dict[str, float]
    bandwidth_gbps: float
    source: str
    measured: Measurement | None
    derived_from: str | None

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GiB)

    def peak(self, kind: str) -> float:
        """The peak a rate of `kind` is held against: FLOP/s, or bytes/s for memory."""
        which = RATE_PEAKS[kind]
        return self.bandwidth_gbps * 1e9 if which == "bandwidth" else self.peak_tflops[which] * 1e12

    def rates(self) -> dict[str, float]:
        """FLOP/s for attention, matmul and convolution; bytes/s for memory-bound work."""
        if self.measured is not None:
            m = self.measured
            work = {"attention": m.work["attention"], "matmul": m.work["matmul"],
                    "convolution": m.work["convolution"], "memory": m.work["bytes"]}
            if not all(work.values()):
                raise ValueError(f"hardware.yaml: {self.name}'s measured work is incomplete: {m.work}")
            return {kind: work[kind] / (m.kernel_ms[kind] / 1e3) for kind in RATE_PEAKS}
        base = card(self.derived_from)
        return {kind: rate / base.peak(kind) * self.peak(kind) for kind, rate in base.rates().items()}

    def efficiency(self) -> dict[str, float]:
        """Each rate as a fraction of its peak."""
        return {kind: rate / self.peak(kind) for kind, rate in self.rates().items()}

    def provenance(self) -> str:
        if self.measured is not None:
            s = self.measured.source
            return f"measured on {self.title} ({s['date']}, torch {s['torch']}, commit {s['commit']}: {s['profile']})"
        return (f"derived from {card(self.derived_from).title}'s measured efficiency and {self.title}'s "
                f"published peaks ({self.source}): an estimate")


@functools.cache
def cards() -> dict[str, Card]:
    """Every card of hardware.yaml, by name."""
    raw = yaml.safe_load(CATALOG.read_text())["cards"]
    out = {}
    for name, d in raw.items():
        rates = d["rates"]
        measured = None
        if "measured" in rates:
            m = rates["measured"]
            measured = Measurement(kernel_ms=dict(m["kernel_ms"]), work=dict(m["work"]), step=m["step"],
                                   source={k: str(m[k]) for k in ("date", "torch", "commit", "profile", "run",
                                                                 "command")})
        derived = rates.get("derived_from")
        if (measured is None) == (derived is None):
            raise ValueError(f"hardware.yaml: {name}.rates needs either `measured` or `derived_from`")
        if derived is not None and derived not in raw:
            raise ValueError(f"hardware.yaml: {name}.rates.derived_from {derived!r} is not a card")
        out[name] = Card(name=name, title=d["title"], match=tuple(d["match"]), memory_gib=float(d["memory_gib"]),
                         memory_source=d["memory_source"], peak_tflops=dict(d["peak_tflops"]),
                         bandwidth_gbps=float(d["bandwidth_gbps"]), source=d["source"], measured=measured,
                         derived_from=derived)
    return out


def card(name: str) -> Card:
    known = cards()
    if name not in known:
        raise ValueError(f"unknown card {name!r}{_suggest(name, known)}; known cards: {', '.join(known)}")
    return known[name]


def card_for_device_name(device_name: str) -> Card | None:
    """The card whose longest `match` substring occurs in `device_name` (torch.cuda.get_device_name()),
    or None."""
    lowered = device_name.lower()
    best = None
    for c in cards().values():
        for pattern in c.match:
            if pattern.lower() in lowered and (best is None or len(pattern) > best[0]):
                best = (len(pattern), c)
    return None if best is None else best[1]


def _suggest(value: str, names) -> str:
    close = difflib.get_close_matches(value, list(names), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ======================================================================================== recipe section
@dataclass
class HardwareConfig:
    """The `hardware:` section of a recipe: the card the recipe is sized for.

    `vggt-fsdp plan` checks the recipe against this card's memory and predicts its step time on it
    (unless told otherwise); `device: cpu` means CPU processes (then `memory_gib` is required: host
    memory per process).
    """

    # A card of vggt_fsdp/hardware.yaml (a100_40g, a100_80g, h100_sxm, h200, ...), gpu (any other CUDA
    # card, memory_gib required), or cpu; null: unstated.
    device: Union[str, None] = None
    # The memory to plan against, GiB; null: the card's (hardware.yaml).
    memory_gib: Union[float, None] = None

    def validate(self) -> None:
        generic = (CPU, GPU)
        if self.device is not None and self.device not in generic and self.device not in cards():
            raise ValueError(f"hardware.device: {self.device!r} is not a known card"
                             f"{_suggest(self.device, [*cards(), *generic])}; valid: {', '.join([*cards(), *generic])}")
        if self.memory_gib is not None and self.memory_gib <= 0:
            raise ValueError(f"hardware.memory_gib must be > 0, got {self.memory_gib}")
        if self.device == CPU and self.memory_gib is None:
            raise ValueError("hardware.device is cpu: state the memory of a process with hardware.memory_gib")
        if self.device == GPU and self.memory_gib is None:
            raise ValueError("hardware.device is gpu (a card not in the catalog): state its memory with "
                             "hardware.memory_gib")

    @property
    def kind(self) -> str:
        """The kernels to plan for: cpu or cuda."""
        return "cpu" if self.device == CPU else "cuda"

    def card(self) -> Card | None:
        return None if self.device in (None, CPU, GPU) else card(self.device)

    def memory_bytes(self) -> int | None:
        if self.memory_gib is not None:
            return int(self.memory_gib * GiB)
        c = self.card()
        return None if c is None else c.memory_bytes
