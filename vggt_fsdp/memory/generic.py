"""One GPU's peak memory for a training step of *any* model a recipe's `parallel:` section describes.

`planner.py` predicts VGGT from formulas. A user's model has no formulas here, so this plan has two
kinds of term, and says which is which:

- exact, from the FSDP unit layout (`plan_parallelism` on the model built on the meta device) at the
  target world size: sharded fp32 parameters, gradients and AdamW state, the unsharded root and the
  units kept after forward, the largest unit in flight (its parameters plus the next unit's all-gather)
  and its backward (unsharded gradients, reduce-scatter). The same terms as VGGT's plan (`planner`).
- measured and scaled: on the CPU, the model sharded as the recipe says on a 1-process group runs one
  forward per size of its `example_inputs(size)`, 1, 2 and 4, under the recipe's checkpoint policy and
  precision and once with checkpointing off; saved-tensor hooks count exactly what is kept for backward
  (in total and per block) and so what each block's backward recomputes. Each quantity is fitted as
  a + b x size from sizes 1 and 2, checked at size 4 (a misfit is reported) and extrapolated.

The peak is the larger of the end of forward and the costliest block's backward (the blocks up to it,
everything saved outside blocks, its recompute, all sharded gradients: conservative) and the optimizer
step. Not modelled: gradient temporaries inside backward, the loss's, anything allocated outside
autograd; CPU attention kernels may save slightly other tensors than CUDA's fused ones. Checked on the
CPU against FSDPMemTracker over a fake process group (tests/test_own_model.py): states and saved
activations exact, the peak 0 to +20% (conservative).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vggt_fsdp.memory.accounting import SavedTensorCounter
from vggt_fsdp.memory.planner import FRAGMENTATION, NON_PYTORCH_BYTES, GiB, Term, _state_terms, _unsharded_terms
from vggt_fsdp.memory.units import shard_size, unit_layout_of

FIT_SIZES = (1, 2)  # the linear fit's two points
CHECK_SIZE = 4  # where the fit is checked against a third measurement
LINEARITY_TOLERANCE = 0.05  # a larger misfit at CHECK_SIZE is reported as a warning in the plan

ExampleInputs = Callable[[int], Any]  # size -> a tuple of positional inputs, or a dict of keyword inputs


def model_state_bytes(model: nn.Module, parallel_cfg, world_size: int, gpus_per_node: int,
                      freeze: tuple[str, ...] = ()) -> tuple[int, int]:
    """(bytes, shard size): one rank's sharded fp32 parameters, gradients and AdamW state, the planner's
    state terms, wherever they live (device or, offloaded, host)."""
    shard = shard_size(parallel_cfg, world_size, gpus_per_node)
    terms = _state_terms(unit_layout_of(model, parallel_cfg, freeze), shard, offload=False, device_kind="cpu")
    return sum(term.bytes for term in terms), shard


# ======================================================================================== measuring
@dataclass(frozen=True)
class Sample:
    """What one CPU forward at `size` measured, in bytes."""

    size: int
    saved: int  # saved for backward at the end of forward, recipe's checkpoint policy
    # Activations live in the costliest block's backward: what the blocks up to it and everything
    # outside blocks saved, plus what that block recomputes (saved without checkpointing - under the
    # policy). Blocks are taken to run in the order the model registers them.
    backward: int
    inputs: int


@contextlib.contextmanager
def _one_rank_group() -> Iterator[None]:
    """A 1-rank gloo group for FSDP2 on the CPU (real collectives, real values), removed on exit."""
    if dist.is_initialized():
        raise RuntimeError("the activation measurement creates its own 1-process group; run it in a process "
                           "without one (e.g. the `vggt-fsdp plan` command)")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _as_call(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise TypeError(f"example_inputs returned {type(inputs).__name__}; return a tuple of positional inputs "
                    "or a dict of keyword inputs")


def _bytes(inputs: Any) -> int:
    args, kwargs = _as_call(inputs)
    return sum(t.untyped_storage().nbytes() for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))


def _cpu_model(build: Callable[[], nn.Module], parallel_cfg) -> tuple[nn.Module, list[str]]:
    """The model as training shards it (checkpoint wrappers, mixed precision, autocast) on a 1-rank CPU
    mesh, with random values (saved sizes do not depend on them); returns it and its block paths."""
    from vggt_fsdp.parallel.config import ShardingConfig
    from vggt_fsdp.parallel.sharding import apply_parallelism, build_mesh

    # Sharding does not change activations; compiling is GPU work and is measured there, not here.
    cfg = dataclasses.replace(parallel_cfg, sharding=ShardingConfig(), compile=False)
    with torch.device("meta"):
        model = build()
    plan = apply_parallelism(model, cfg, build_mesh(cfg.sharding, "cpu"))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            if local.is_floating_point():
                local.uniform_(-0.02, 0.02)
            else:
                local.zero_()  # index-like buffers: zeros index anything
    return model.train(), [u.path for u in plan.units if u.kind == "block"]


def _saved(model: nn.Module, blocks: list[str], inputs: Any) -> tuple[int, dict[str, int]]:
    """(total saved bytes, each block's) of one forward."""
    args, kwargs = _as_call(inputs)
    counter = SavedTensorCounter({path: model.get_submodule(path) for path in blocks})
    with counter:
        output = model(*args, **kwargs)
    del output
    report = counter.report
    return report.total_bytes, {path: report.by_group[path] for path in blocks}


def measure(build: Callable[[], nn.Module], example_inputs: ExampleInputs, parallel_cfg,
            sizes: tuple[int, ...] = (*FIT_SIZES, CHECK_SIZE)) -> list[Sample]:
    """One CPU forward per size under the recipe's policy, and one with checkpointing off: a block's
    backward recomputes the difference. Needs a process without a process group."""
    unchecked_cfg = dataclasses.replace(
        parallel_cfg, checkpoint=dataclasses.replace(parallel_cfg.checkpoint, policy="none", groups={}, heads="none"))
    samples = []
    with _one_rank_group(), warnings.catch_warnings():
        # FSDP2 warns that a unit returns a view (an in-place op on it would skip a hook); nothing here does.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        model, blocks = _cpu_model(build, parallel_cfg)
        plain, _ = _cpu_model(build, unchecked_cfg)
        for size in sizes:
            inputs = example_inputs(size)
            saved, kept = _saved(model, blocks, inputs)
            _, unchecked = _saved(plain, blocks, inputs)
            samples.append(Sample(size, saved, _backward_live(saved, blocks, kept, unchecked), _bytes(inputs)))
    return samples


def _backward_live(saved: int, blocks: list[str], kept: dict[str, int], unchecked: dict[str, int]) -> int:
    """The largest activation bytes alive while one block's backward runs (see Sample.backward); the
    activations outside blocks are counted alive throughout (their place in the forward is not known)."""
    outside = saved - sum(kept.values())
    live, before = outside, 0
    for path in blocks:
        before += kept[path]
        live = max(live, outside + before + unchecked[path] - kept[path])
    return live


@dataclass(frozen=True)
class Scaled:
    """A measured quantity fitted as intercept + slope x size (from FIT_SIZES), checked at CHECK_SIZE."""

    intercept: float
    slope: float
    check_error: float  # |fit - measured| / measured at CHECK_SIZE (0 when both are 0)

    @classmethod
    def fit(cls, samples: list[Sample], key: str) -> Scaled:
        by_size = {s.size: getattr(s, key) for s in samples}
        (s1, s2), measured = FIT_SIZES, by_size[CHECK_SIZE]
        slope = (by_size[s2] - by_size[s1]) / (s2 - s1)
        intercept = by_size[s1] - slope * s1
        predicted = intercept + slope * CHECK_SIZE
        error = abs(predicted - measured) / measured if measured else float(predicted != 0)
        return cls(intercept, slope, error)

    def at(self, size: int) -> int:
        return max(0, math.ceil(self.intercept + self.slope * size))


# ======================================================================================== the plan
@dataclass
class ModelPlan:
    """One GPU's predicted peak for a step of a user's model. `peak_bytes` ~ torch.cuda.max_memory_allocated."""

    model: str
    world_size: int
    shard_size: int
    size: int
    device_kind: str
    terms: list[Term]
    phases: dict[str, int]
    peak_phase: str
    peak_bytes: int
    device_bytes: int
    samples: list[Sample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fits(self, device_memory_bytes: int) -> bool:
        return self.device_bytes <= device_memory_bytes

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["terms"] = [dataclasses.asdict(t) | {"GiB": round(t.bytes / GiB, 4)} for t in self.terms]
        data["peak_GiB"] = round(self.peak_bytes / GiB, 4)
        data["device_GiB"] = round(self.device_bytes / GiB, 4)
        return data

    def table(self) -> str:
        rows = [("term", "kind", "bytes", "source: formula")]
        rows += [(t.name, t.category, human_bytes(t.bytes), t.formula) for t in self.terms]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
        lines.append("")
        for phase, value in self.phases.items():
            mark = "  <- peak" if phase == self.peak_phase else ""
            lines.append(f"{phase:<36} {human_bytes(value):>12}{mark}")
        lines.append(f"{'predicted peak allocated':<36} {human_bytes(self.peak_bytes):>12}")
        if self.device_kind == "cuda":
            lines.append(f"{'device total (x' + str(FRAGMENTATION) + ' + non-PyTorch)':<36} "
                         f"{human_bytes(self.device_bytes):>12}")
        return "\n".join(lines)


def human_bytes(n: int) -> str:
    return f"{n / GiB:.3f} GiB" if n >= GiB else f"{n / 2**20:.2f} MiB"


def describe_model(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__} ({sum(p.numel() for p in model.parameters()):,} parameters)"


def plan_model(build: Callable[[], nn.Module], example_inputs: ExampleInputs, parallel_cfg, world_size: int,
               size: int, device_kind: str = "cuda", *, gpus_per_node: int = 8,
               samples: list[Sample] | None = None) -> ModelPlan:
    """Predict one GPU's peak for a step of the model `build()` makes, at `size` (the unit of
    `example_inputs`) per GPU over `world_size` GPUs. `samples`: earlier `measure` results to reuse."""
    if world_size < 1 or size < 1:
        raise ValueError(f"world size {world_size} and size {size} must be >= 1")
    with torch.device("meta"):
        meta = build()
    units = unit_layout_of(meta, parallel_cfg)
    shard = shard_size(parallel_cfg, world_size, gpus_per_node)
    samples = samples if samples is not None else measure(build, example_inputs, parallel_cfg)
    saved, backward, inputs = (Scaled.fit(samples, key) for key in ("saved", "backward", "inputs"))
    sizes = ", ".join(str(s.size) for s in samples)
    how = f"CPU forward at sizes {sizes}, fit a + b x size on {FIT_SIZES}, scaled to {size}"

    terms = _state_terms(units, shard, parallel_cfg.sharding.cpu_offload, device_kind)
    terms += _unsharded_terms(units, shard, fused_adamw=device_kind == "cuda")
    terms += [
        Term("inputs", "io", inputs.at(size), f"measured: example_inputs bytes ({how})"),
        Term("activations saved for backward", "activation", saved.at(size),
             f"measured: saved-tensor bytes at the end of forward, checkpoint policy as recipe ({how})"),
        Term("activations in the costliest block's backward", "activation_backward", backward.at(size),
             "measured: saved by the blocks up to it and outside blocks + its recompute (saved with "
             f"checkpointing off - under the policy) ({how})"),
    ]
    phases = _phases(terms)
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    notes = [
        f"exact: model states and units in flight, from the FSDP unit layout at world size {world_size} "
        f"(parameters sharded over {shard})",
        f"measured on this CPU (saved-tensor hooks), scaled linearly: inputs, saved activations, the "
        f"activations of the costliest block's backward; {how}",
    ]
    for name, fit in (("saved activations", saved), ("backward activations", backward)):
        if fit.check_error > LINEARITY_TOLERANCE:
            notes.append(f"warning: {name} are not linear in size: the fit is {fit.check_error:.0%} off at "
                         f"size {CHECK_SIZE}; the prediction at {size} is uncertain")
    return ModelPlan(model=describe_model(meta), world_size=world_size, shard_size=shard, size=size,
                     device_kind=device_kind, terms=terms, phases=phases, peak_phase=peak_phase, peak_bytes=peak,
                     device_bytes=int(peak * FRAGMENTATION) + NON_PYTORCH_BYTES if device_kind == "cuda" else peak,
                     samples=samples, notes=notes)


def _phases(terms: list[Term]) -> dict[str, int]:
    """Bytes live at the candidate peaks. In backward the sharded gradients are counted whole from the
    start (conservative: they fill up as backward proceeds)."""
    by = {t.name: t.bytes for t in terms}
    state = sum(t.bytes for t in terms if t.category in ("state", "io"))
    grads = sum(t.bytes for t in terms if t.category == "grads")
    unit = by["running unit + prefetch all-gather"]
    unit_backward = by["unit backward: prefetched params, unsharded grads, reduce-scatter"]
    return {
        "end of forward": state + by["activations saved for backward"] + unit,
        "costliest block backward": state + grads + by["activations in the costliest block's backward"] + unit
        + unit_backward,
        "optimizer step": state + grads + by["optimizer step temporaries"],
    }
