"""One GPU's step time for a VGGT training step, predicted before anything is launched.

The time model, in one place:

    step time = sum over kinds k of FLOPs_k / rate_k  +  memory-bound bytes / rate_memory

- FLOPs of each kind (attention, matmul, convolution) and memory-bound bytes are *counted*, not
  estimated: each call of the step (the patch-embed conv, one block of each group at its shape, the
  camera head around its trunk, one chunk of each DPT head) runs forward and backward on the meta
  device under a `flops.Counter` (`flops.py` says what is counted and how a meta run is made to look
  like a GPU's: fused attention, autocast's casts). The step is the sum of its calls
  (`StepWork.model`), plus the forward ops that activation checkpointing runs again in backward
  (`StepWork.recompute`: per unit, by its policy, from the ops of its own counted forward), plus the
  optimizer's, gradient clipping's and FSDP2's copies of parameters and gradients (`state_bytes`, a
  formula over the units). Not counted: the few ops between units (token concatenation, RoPE tables,
  the position-embedding interpolation, joining the DPT chunks): no FLOPs (tests/test_steptime.py
  checks the model FLOPs against a whole-model count), a few hundred MB of traffic at VGGT-1B's 24
  frames.
- The rates are the card's (`vggt_fsdp/hardware.py`): measured on a profiled H200 step, derived for
  other cards. Kinds run one after another (eager PyTorch on one stream: the profile shows the GPU busy
  the whole step); communication is assumed hidden behind compute, as FSDP2 prefetching does
  (benchmarks/comm_model.py estimates whether it is). Kernel launches are not modelled: a step of
  large kernels (VGGT-1B) is bound by its work, a small model's (vggt-tiny) by its launches, so its
  prediction is a lower bound.

Refinements (`Refinements`, off unless given, so the figures above stay the card's): a backward
attention rate of its own (attention backward runs about 1.5x slower than forward on current kernels,
where the card's one attention rate is a mean), a cost per kernel launch (`StepWork.kernel_ops`:
forward ops counted, backward and recompute ops estimated from them), and `calibrate`, which fits
chosen rates and the launch cost to several measured steps at once (least squares, non-negative);
the track head's work is counted when the step tracks points (`track_points`). What is still not
modelled: communication (context-parallel exchange and FSDP2 collectives, assumed hidden).

Which batch: the time of a step depends on how the sampler splits the frame budget into scenes; the
prediction is for the slowest split (`slowest_step`: the one with the most images or the one with the
largest scenes).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch

from vggt_fsdp import hardware
from vggt_fsdp.memory import planner
from vggt_fsdp.memory.flops import KINDS, CallCount, Work, count_call, total
from vggt_fsdp.memory.planner import Batch, UnitInfo

TIME_KINDS = (*KINDS, "memory")
DTYPES = {2: torch.bfloat16, 4: torch.float32}


# ======================================================================================== results
@dataclass(frozen=True)
class StepWork:
    """The counted work of one training step at one batch shape."""

    batch: Batch
    model: Work  # forward and backward once
    recompute: Work  # forward ops checkpointing runs again
    state_bytes: int  # optimizer, clipping, FSDP2 parameter and gradient copies
    parts: dict[str, Work] = field(default_factory=dict)  # model work by part of the model
    recompute_parts: dict[str, Work] = field(default_factory=dict)
    attention_backward_flops: int = 0  # of model.by_kind()["attention"]: what the attention backward runs
    kernel_ops: int = 0  # kernels a step launches (forward ops counted; backward and recompute estimated)

    def by_kind(self) -> dict[str, int]:
        """What the card runs: FLOPs by kind, and memory-bound bytes under "memory"."""
        flops = (self.model + self.recompute).by_kind()
        return {**flops, "memory": self.model.bytes + self.recompute.bytes + self.state_bytes}

    def with_recompute(self, parts: dict[str, Work]) -> StepWork:
        """This step with another recompute, given by part (a policy search composes candidates so)."""
        return dataclasses.replace(self, recompute=total(parts.values()), recompute_parts=dict(parts))

    @property
    def recompute_fraction(self) -> float:
        """Recompute FLOPs over model FLOPs."""
        return self.recompute.total_flops / self.model.model_flops

    def to_dict(self) -> dict:
        return {
            "batch": {"scenes": self.batch.scenes, "frames_per_scene": self.batch.frames,
                      "image_hw": [self.batch.height, self.batch.width]},
            "model": self.model.to_dict(), "recompute": self.recompute.to_dict(),
            "state_bytes": self.state_bytes, "recompute_fraction": round(self.recompute_fraction, 4),
            "parts": {k: v.to_dict() for k, v in self.parts.items()},
            "recompute_parts": {k: v.to_dict() for k, v in self.recompute_parts.items()},
        }


@dataclass(frozen=True)
class StepTime:
    """A predicted step time on one card."""

    card: str
    provenance: str
    seconds: dict[str, float]  # by TIME_KINDS
    model_flops: int
    peak_bf16_flops: float

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())

    @property
    def mfu(self) -> float:
        return self.model_flops / self.total_s / self.peak_bf16_flops

    def to_dict(self) -> dict:
        return {"card": self.card, "predicted_step_s": _sig(self.total_s),
                "seconds_by_kind": {k: _sig(v) for k, v in self.seconds.items()},
                "predicted_mfu": round(self.mfu, 4), "rates": self.provenance}


def _sig(value: float, digits: int = 6) -> float:
    return float(f"{value:.{digits}g}")


@dataclass(frozen=True)
class Refinements:
    """What the base model (work / the card's rates) leaves out, each off until measured or calibrated.

    rates: FLOP/s (bytes/s for "memory") replacing the card's for the kinds named;
    attention_backward_rate: FLOP/s of the attention backward (the card's attention rate, a mean of
      forward and backward, applies to both when None);
    launch_s_per_op: seconds each kernel launch costs beyond its work (eager PyTorch, one stream)."""

    rates: dict[str, float] = field(default_factory=dict)
    attention_backward_rate: float | None = None
    launch_s_per_op: float = 0.0
    provenance: str = ""

    def __post_init__(self):
        unknown = set(self.rates) - set(TIME_KINDS)
        if unknown:
            raise ValueError(f"Refinements.rates: unknown kinds {sorted(unknown)}; valid: {list(TIME_KINDS)}")
        if any(v <= 0 for v in self.rates.values()) or (self.attention_backward_rate or 1) <= 0:
            raise ValueError("Refinements: rates must be positive")
        if self.launch_s_per_op < 0:
            raise ValueError(f"Refinements.launch_s_per_op={self.launch_s_per_op} must be >= 0")


def predict(work: StepWork, card: hardware.Card, refinements: Refinements | None = None) -> StepTime:
    rates = card.rates()
    if refinements is None:
        seconds = {kind: amount / rates[kind] for kind, amount in work.by_kind().items()}
        return StepTime(card.name, card.provenance(), seconds, work.model.model_flops, card.peak("attention"))
    rates = {**rates, **refinements.rates}
    by_kind = work.by_kind()
    seconds = {kind: amount / rates[kind] for kind, amount in by_kind.items()}
    if refinements.attention_backward_rate is not None:
        forward = by_kind["attention"] - work.attention_backward_flops
        seconds["attention"] = (forward / rates["attention"]
                                + work.attention_backward_flops / refinements.attention_backward_rate)
    if refinements.launch_s_per_op:
        seconds["launch"] = work.kernel_ops * refinements.launch_s_per_op
    provenance = card.provenance() + (f"; refined: {refinements.provenance}" if refinements.provenance else "; refined")
    return StepTime(card.name, provenance, seconds, work.model.model_flops, card.peak("attention"))


# The columns `calibrate` can fit: each kind's seconds per unit of work, the backward attention's, a launch.
CALIBRATION_TERMS = ("attention", "attention_backward", "matmul", "convolution", "memory", "launch")


def _terms(work: StepWork) -> dict[str, float]:
    """A step's work in CALIBRATION_TERMS (attention forward and backward apart, kernel launches)."""
    by_kind = work.by_kind()
    return {"attention": by_kind["attention"] - work.attention_backward_flops,
            "attention_backward": work.attention_backward_flops, "matmul": by_kind["matmul"],
            "convolution": by_kind["convolution"], "memory": by_kind["memory"], "launch": work.kernel_ops}


def calibrate(points: list[tuple[StepWork, float]], card: hardware.Card, free: tuple[str, ...],
              provenance: str = "") -> Refinements:
    """Refinements fitted to measured steps: the terms in `free` (CALIBRATION_TERMS) chosen so that the
    predicted times of all `points` (work, measured seconds) are closest to the measured ones (least
    squares, non-negative: a term that would come out negative is fixed at zero); the other terms keep
    the card's rates (the backward attention the card's attention rate, no launch cost). Needs at least
    as many points as free terms."""
    unknown = set(free) - set(CALIBRATION_TERMS)
    if unknown or not free:
        raise ValueError(f"calibrate: free terms {sorted(unknown) or '(none)'}; choose from {list(CALIBRATION_TERMS)}")
    if len(points) < len(free):
        raise ValueError(f"calibrate: {len(points)} measured steps cannot fit {len(free)} terms ({', '.join(free)}); "
                         "measure more configurations or free fewer terms")
    rates = card.rates()
    fixed_rate = {**{k: rates[k] for k in KINDS}, "memory": rates["memory"], "attention_backward": rates["attention"]}
    rows, targets = [], []
    for work, measured in points:
        terms = _terms(work)
        fixed = sum(terms[t] / fixed_rate[t] for t in CALIBRATION_TERMS if t not in free and t != "launch")
        rows.append([float(terms[t]) for t in free])
        targets.append(measured - fixed)
    active = list(range(len(free)))
    solution = [0.0] * len(free)
    while active:
        a = torch.tensor([[row[i] for i in active] for row in rows], dtype=torch.float64)
        b = torch.tensor(targets, dtype=torch.float64)[:, None]
        scale = a.abs().amax(dim=0).clamp_min(1e-30)  # columns of FLOPs, bytes and op counts: scaled alike
        x = (torch.linalg.lstsq(a / scale, b).solution[:, 0] / scale).tolist()
        negative = [i for i, v in zip(active, x) if v < 0]
        if not negative:
            for i, v in zip(active, x):
                solution[i] = v
            break
        active = [i for i in active if i not in negative]
    fitted = dict(zip(free, solution))
    out_rates = {t: 1 / v for t, v in fitted.items() if t in TIME_KINDS and v > 0}
    backward = fitted.get("attention_backward")
    return Refinements(rates=out_rates, attention_backward_rate=(1 / backward if backward else None),
                       launch_s_per_op=fitted.get("launch", 0.0),
                       provenance=provenance or f"calibrated to {len(points)} measured steps ({', '.join(free)} fitted)")


# ======================================================================================== the step
def candidate_batches(frames_per_gpu: int, frames_range: tuple[int, int], image_hw: tuple[int, int],
                      patch: int, context_parallel: int = 1) -> list[Batch]:
    """The splits of the frame budget that can be the slowest: the most images (the largest scenes among
    those: per-frame work), and the largest scenes (global attention grows with their square).
    With context parallelism N a GPU's batch is its share, S/N frames of each scene (its global
    attention is counted over all S frames with H/N heads, as the rank runs it: `_count_calls`)."""
    size = context_parallel
    splits = planner.scene_splits(frames_per_gpu * size, frames_range, size)
    most_images = max(splits, key=lambda bs: (bs[0] * bs[1], bs[1]))
    largest = max(splits, key=lambda bs: (bs[1], bs[0]))
    return [Batch(b, s // size, image_hw[0], image_hw[1], patch) for b, s in dict.fromkeys([most_images, largest])]


def slowest_step(model_cfg, parallel_cfg, frames_per_gpu: int, frames_range: tuple[int, int],
                 image_hw: tuple[int, int], card: hardware.Card | None, *, world_size: int = 1,
                 gpus_per_node: int = 8, freeze: tuple[str, ...] = (), track_points: int = 0) -> StepWork:
    """The work of the slowest split the sampler can draw (`candidate_batches`): by predicted time on
    `card`, by model FLOPs without one."""
    works = [step_work(model_cfg, parallel_cfg, b, world_size=world_size, gpus_per_node=gpus_per_node,
                       freeze=freeze, track_points=track_points)
             for b in candidate_batches(frames_per_gpu, frames_range, image_hw, model_cfg.aggregator.patch_size,
                                        getattr(parallel_cfg, "context_parallel", 1))]
    return max(works, key=lambda w: predict(w, card).total_s if card is not None else w.model.model_flops)


# Kernels a backward launches per forward op (gradients of both inputs of a matmul, elementwise chains):
# an estimate until a profiled step calibrates `Refinements.launch_s_per_op` with it.
BACKWARD_OPS_PER_FORWARD_OP = 2


def step_work(model_cfg, parallel_cfg, batch: Batch, *, world_size: int = 1, gpus_per_node: int = 8,
              freeze: tuple[str, ...] = (), track_points: int = 0) -> StepWork:
    """Count the work of one training step of `batch` under `parallel_cfg` (its checkpoint policy and
    precision; the sharding only for the state traffic); with `track_points` (query points per scene)
    and the track head enabled, the track head's too."""
    units = planner.unit_layout(model_cfg, parallel_cfg, tuple(freeze))
    calls = dict(_calls(model_cfg, parallel_cfg, units, batch, tuple(freeze)))
    if model_cfg.enable_track and track_points > 0:
        calls["track head"] = _track_call(model_cfg, parallel_cfg, units, batch, track_points)
    # Each counted call as often as the step makes it, and what joins the repeated calls.
    parts = {name: (c.count.forward + c.count.backward) * c.times for name, c in calls.items()}
    parts.update(joins(model_cfg, units, calls, batch))
    recompute_parts = _recompute(units, calls, parallel_cfg)
    shard = planner.shard_size(parallel_cfg, world_size, gpus_per_node)
    key = (planner.structure_key(model_cfg, parallel_cfg, tuple(freeze)), shard)
    if key not in _STATE_BYTES:
        _STATE_BYTES[key] = state_bytes(units, shard)
    attention_backward = sum(c.count.backward.by_kind()["attention"] * c.times for c in calls.values())
    forward_ops = sum(len(c.count.forward_ops) * c.times for c in calls.values())
    recompute_ops = sum(len(c.count.forward_ops) * c.times for name, c in calls.items() if name in recompute_parts)
    return StepWork(batch, total(parts.values()), total(recompute_parts.values()), _STATE_BYTES[key], parts,
                    recompute_parts, attention_backward_flops=attention_backward,
                    kernel_ops=forward_ops * (1 + BACKWARD_OPS_PER_FORWARD_OP) + recompute_ops)


_STATE_BYTES: dict[tuple, int] = {}
_TRACK_CALLS: dict[str, "_Call"] = {}


def _track_call(model_cfg, parallel_cfg, units: list[UnitInfo], b: Batch, points: int) -> "_Call":
    """The track head's forward and backward at `b` with `points` query points per scene, counted on the
    meta device like the other heads (its feature extractor reads the aggregator's kept layers). Its
    recompute follows the unit's checkpoint label as the DPT heads' does ("chunks": its forward again)."""
    by_path = {u.path: u for u in units}
    agg = model_cfg.aggregator
    e_tokens = by_path[f"aggregator.global_blocks.{agg.depth - 1}"].param_bytes
    param_bytes = by_path["track_head"].param_bytes
    key = repr((model_cfg, parallel_cfg.precision, e_tokens, param_bytes, b, points))
    if key not in _TRACK_CALLS:
        model = planner._meta_model(model_cfg)
        head = copy.deepcopy(model.track_head).to(DTYPES[param_bytes])
        tokens = b.patches + 1 + agg.num_register_tokens
        layers = [torch.empty(b.scenes, b.frames, tokens, model_cfg.token_dim, device="meta", dtype=DTYPES[e_tokens],
                              requires_grad=True) for _ in range(agg.depth)]
        images = torch.empty(b.scenes, b.frames, 3, b.height, b.width, device="meta")
        queries = torch.empty(b.scenes, points, 2, device="meta")
        count = count_call(head, layers, images, 1 + agg.num_register_tokens, queries,
                           autocast=_autocast(parallel_cfg, param_bytes))
        _TRACK_CALLS[key] = _Call(count, ("track_head",))
    return _TRACK_CALLS[key]


def part_group(part: str) -> str | None:
    """The block group a part of `StepWork.parts`/`recompute_parts` belongs to (its blocks' calls are
    named "<group> blocks", with a suffix when blocks of a group differ), or None for other parts."""
    name, _, rest = part.partition(" blocks")
    return name if rest == "" or rest.startswith(" (") else None


@dataclass(frozen=True)
class _Call:
    count: CallCount
    units: tuple[str, ...]  # the units (paths) this call stands for: blocks of a group, or a head
    each: int = 1  # calls per unit and step (the camera trunk: one per refinement iteration)

    @property
    def times(self) -> int:
        """Calls of this kind in a step."""
        return max(len(self.units), 1) * self.each


_CALLS: dict[str, dict[str, _Call]] = {}


def _calls(model_cfg, parallel_cfg, units: list[UnitInfo], batch: Batch, freeze) -> dict[str, _Call]:
    """The counted calls of a step, by part. They depend on the model, the batch, the precision and the
    frozen parameters, not on the checkpoint policy: cached across policies."""
    dtypes = tuple((u.path, u.param_bytes) for u in units)
    key = repr((model_cfg, parallel_cfg.precision, parallel_cfg.layout, dtypes, freeze, batch,
                getattr(parallel_cfg, "context_parallel", 1)))
    if key not in _CALLS:
        _CALLS[key] = _count_calls(model_cfg, parallel_cfg, units, batch)
    return _CALLS[key]


def _autocast(parallel_cfg, param_bytes: int) -> torch.dtype | None:
    """The autocast a unit computes under: bf16 units under the recipe's bf16 autocast; fp32 units
    (autocast disabled inside them) and the no-autocast mode compute in their parameters' dtype."""
    precision = parallel_cfg.precision
    uses = getattr(precision, "autocast", True) and precision.param_dtype != "fp32"
    return torch.bfloat16 if uses and param_bytes == 2 else None


def _count_calls(model_cfg, parallel_cfg, units: list[UnitInfo], b: Batch) -> dict[str, _Call]:
    from vggt_fsdp.model.layers import Attention, patch_positions
    from vggt_fsdp.parallel.context import StandInGroup

    context = getattr(parallel_cfg, "context_parallel", 1)
    model = planner._meta_model(model_cfg)
    agg, pe = model_cfg.aggregator, model_cfg.patch_embed
    by_path = {u.path: u for u in units}
    trainable = {p.name for u in units for p in u.params if p.trainable}
    flow = planner._grad_flow(model_cfg, units)
    order = list(flow)
    # A stage's input requires grad when anything before it trains.
    input_grad = {key: (order.index(key) > 0 and flow[order[order.index(key) - 1]]) for key in order}
    tokens = b.patches + 1 + agg.num_register_tokens
    start = 1 + agg.num_register_tokens
    calls: dict[str, _Call] = {}

    def unit_copy(path: str, param_bytes: int):
        """A meta copy of the module at `path` in its compute dtype, trainable as the recipe says."""
        module = copy.deepcopy(model.get_submodule(path)).to(DTYPES[param_bytes])
        for name, param in module.named_parameters():
            param.requires_grad_(f"{path}.{name}" in trainable)
        return module

    def meta(*shape, dtype, grad=False):
        return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)

    # -- stem: the patch-embed conv of the root unit, on the normalised images.
    e_root = by_path[""].param_bytes
    stem_path = "aggregator.patch_embed.patch_embed"
    stem_input_dtype = torch.float32 if _autocast(parallel_cfg, e_root) else DTYPES[e_root]
    calls["stem"] = _Call(count_call(unit_copy(stem_path, e_root), meta(b.images, 3, b.height, b.width,
                                                                         dtype=stem_input_dtype),
                                     autocast=_autocast(parallel_cfg, e_root)), ())

    # -- blocks: one counted call per group and trainability; every block of the group is that call.
    rope_tables = {}
    if agg.rope_freq > 0:
        positions = patch_positions(b.ph, b.pw, start, torch.device("meta"))
        length = max(b.ph, b.pw) + 1
        rope_tables["frame"] = model.aggregator.rope.tables(positions, model.aggregator.rope_half_dim, length)
        rope_tables["global"] = model.aggregator.rope.tables(positions.repeat(1, b.frames, 1),
                                                             model.aggregator.rope_half_dim, length)
    D = model_cfg.token_dim
    cam = model_cfg.camera_head
    dino_seq = 1 + pe.num_register_tokens + b.patches
    # group: (block paths, (batch, sequence, width), RoPE tables, does each block's input require grad,
    #         calls per block and step)
    groups = {
        "dino": ([f"aggregator.patch_embed.blocks.{i}" for i in range(pe.depth)], (b.images, dino_seq, agg.embed_dim),
                 None, [input_grad[f"dino.{i}"] for i in range(pe.depth)], 1),
        "frame": ([f"aggregator.frame_blocks.{i}" for i in range(agg.depth)], (b.images, tokens, agg.embed_dim),
                  rope_tables.get("frame"), [input_grad[f"frame.{i}"] for i in range(agg.depth)], 1),
        "global": ([f"aggregator.global_blocks.{i}" for i in range(agg.depth)],
                   (b.scenes, b.frames * tokens, agg.embed_dim), rope_tables.get("global"),
                   [input_grad[f"global.{i}"] for i in range(agg.depth)], 1),
    }
    if model_cfg.enable_camera:  # one camera token per frame, every refinement iteration
        groups["camera_trunk"] = ([f"camera_head.trunk.{i}" for i in range(cam.trunk_depth)], (b.scenes, b.frames, D),
                                  None, [flow["camera_head"]] * cam.trunk_depth, cam.num_iterations)
    for group, (paths, shape, pos, grads, each) in groups.items():
        signatures: dict[tuple, list[str]] = {}
        for path, grad in zip(paths, grads):
            u = by_path[path]
            signatures.setdefault((u.param_bytes, grad, tuple(p.trainable for p in u.params)), []).append(path)
        for n, ((param_bytes, grad, _), members) in enumerate(signatures.items()):
            block = unit_copy(members[0], param_bytes)
            if group == "global" and context > 1:  # attends over the whole scene with H/N heads
                for module in block.modules():
                    if isinstance(module, Attention):
                        module.__dict__["context"] = StandInGroup(context)
            x = meta(*shape, dtype=DTYPES[param_bytes], grad=grad)
            count = count_call(block, x, pos=pos, autocast=_autocast(parallel_cfg, param_bytes))
            calls[f"{group} blocks" + (f" ({n})" if n else "")] = _Call(count, tuple(members), each)

    # -- heads: the camera head around its trunk (counted above), one chunk of each DPT head per chunk size.
    e_tokens = by_path[f"aggregator.global_blocks.{agg.depth - 1}"].param_bytes
    if model_cfg.enable_camera:
        u = by_path["camera_head"]
        last = meta(b.scenes, b.frames, tokens, D, dtype=DTYPES[e_tokens], grad=flow["aggregator"])
        head = unit_copy("camera_head", u.param_bytes)
        head.trunk = torch.nn.Sequential(*(torch.nn.Identity() for _ in head.trunk))
        count = count_call(head, [None] * (agg.depth - 1) + [last], autocast=_autocast(parallel_cfg, u.param_bytes))
        calls["camera head"] = _Call(count, ("camera_head",))
    chunk = model_cfg.dpt_head.frames_chunk_size or b.images
    sizes = [min(chunk, b.images - s) for s in range(0, b.images, chunk)]
    for name in ("depth_head", "point_head"):
        if not getattr(model_cfg, f"enable_{name.split('_')[0]}"):
            continue
        u = by_path[name]
        head = unit_copy(name, u.param_bytes)
        for size in sorted(set(sizes), reverse=True):
            layers = [meta(size, b.patches, D, dtype=DTYPES[e_tokens], grad=flow["aggregator"]) for _ in range(4)]
            count = count_call(head._forward_chunk, b.height, b.width, *layers, root=head,
                               autocast=_autocast(parallel_cfg, u.param_bytes))
            label = name.replace("_", " ") + (f" (chunks of {size})" if len(set(sizes)) > 1 else "")
            calls[label] = _Call(count, (name,), sizes.count(size))
    return calls


def joins(model_cfg, units: list[UnitInfo], calls: dict[str, _Call], b: Batch) -> dict[str, Work]:
    """Memory-bound work between the repeated calls of one unit, which counting each call alone misses
    (formulas):

    gradient accumulation: a unit called n times a step (the camera trunk once per refinement
      iteration, a DPT head once per chunk) has autograd add n - 1 more gradients into each of its
      trainable weights' (read two, write one: 3 x its bytes in the unit's dtype each time). With it
      the camera head's bytes equal a count of the whole head (tests/test_steptime.py).
    DPT chunk join: with several chunks, the head concatenates their outputs (values and confidence,
      fp32 at full resolution: read and written once).
    Not modelled: the gradients of the kept layers each DPT chunk slices (autograd writes a zero layer
    per chunk and layer, copies the chunk's gradient in, and adds up the chunks): a count of the whole
    depth head of VGGT-1B at 24 frames (3 chunks) has 8% more bytes than its chunks with these joins,
    under 1% of the step's memory-bound bytes.
    """
    out: dict[str, Work] = {}
    per_unit: dict[str, int] = {}
    for call in calls.values():
        for path in call.units:
            per_unit[path] = per_unit.get(path, 0) + call.each
    by_path = {u.path: u for u in units}
    accumulated = sum((n - 1) * 3 * u.param_bytes * sum(p.numel for p in u.params if p.trainable)
                      for path, n in per_unit.items() if n > 1 for u in [by_path[path]])
    if accumulated:
        out["gradient accumulation"] = Work.of(bytes=accumulated)
    for head, channels in (("depth_head", 2), ("point_head", 4)):
        if per_unit.get(head, 0) > 1:
            out[f"{head.replace('_', ' ')} join"] = Work.of(bytes=2 * b.images * b.height * b.width * channels * 4)
    return out


# ======================================================================================== recompute
_RECOMPUTE: dict[tuple, Work] = {}


def _recompute_cached(count: CallCount, policy: str, prefix: str, attention_names: tuple[str, ...]) -> Work:
    key = (id(count), policy, prefix, attention_names)  # counts live in _CALLS: their ids stay theirs
    if key not in _RECOMPUTE:
        _RECOMPUTE[key] = recompute_of(count, policy, prefix, attention_names)
    return _RECOMPUTE[key]


def _recompute(units: list[UnitInfo], calls: dict[str, _Call], parallel_cfg) -> dict[str, Work]:
    """The forward work each checkpointed unit runs again in backward, summed by part."""
    policy = {u.path: u.checkpoint for u in units}
    attention_names = _attention_names(parallel_cfg)
    recompute_of = _recompute_cached
    out: dict[str, Work] = {}
    for name, call in calls.items():
        work = total(recompute_of(call.count, policy[path], "", attention_names) for path in call.units) * call.each
        if work.total_flops or work.bytes:
            out[name] = work
    return out


def _attention_names(parallel_cfg) -> tuple[str, ...]:
    """Attribute names of VGGT's attention sub-module inside a block (`Block.attn`)."""
    return ("attn",)


def recompute_of(count: CallCount, policy: str, prefix: str, attention_names: tuple[str, ...]) -> Work:
    """The forward work that `policy` (a unit's checkpoint label) re-runs for the unit at `prefix` inside
    a counted call ("": the call is the unit): none nothing; block and chunks the unit's forward,
    attention its attention sub-module's, selective(...) the block's forward less the ops its policy
    keeps; each as far as a non-reentrant checkpoint re-runs it (`CallCount.recompute`)."""
    def under(names: set[str]):
        return lambda modules: any(m in names or any(m.startswith(n + ".") for n in names) for m in modules)

    unit = under({prefix}) if prefix else (lambda modules: True)
    if policy == "none":
        return Work()
    if policy in ("block", "chunks"):
        return count.recompute(unit)
    if policy == "attention":
        return count.recompute(under({f"{prefix}.{a}" if prefix else a for a in attention_names}))
    if policy.startswith("selective("):
        return count.recompute(unit, _selective_cache(policy))
    raise ValueError(f"the step-time model knows checkpoint policies none, attention, selective(...), block and "
                     f"chunks, not {policy!r}")


class _ForwardContext:
    is_recompute = False


def _selective_cache(label: str):
    """Per block call, the predicate of the ops the selective policy `label` keeps: the policy itself
    (parallel/checkpointing.py) asked op by op, in forward order, as torch's checkpoint asks it."""
    from torch.utils.checkpoint import CheckpointPolicy

    from vggt_fsdp.parallel.checkpointing import SelectivePolicy
    from vggt_fsdp.parallel.config import parse_policy_label

    _, save = parse_policy_label(label)

    def fresh():
        policy = SelectivePolicy(save)
        return lambda r: policy(_ForwardContext, r.op) in (CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE)

    return fresh


# ======================================================================================== state traffic
def state_bytes(units: list[UnitInfo], shard: int) -> int:
    """Memory-bound bytes of the parameters and gradients, per step (formula):

    FSDP2 all-gather, per unit and gather (two when the unit is resharded after forward, else one): the
    shard cast from fp32 into the all-gather input (4 + e B an element of the shard) and the output
    copied into the unsharded parameters (2e B an element); none on a 1-rank mesh, where FSDP2 casts
    the fp32 parameters once a gather (4 + e). Reduce-scatter, per trainable element: the unsharded
    gradient (e) cast into the reduce dtype (r), and the shard accumulated into the fp32 gradient
    (4 + 4 + 4 a shard element). Gradient clipping: the norm reads each shard gradient, the scale reads
    and writes it (12 B a shard element). Fused AdamW: reads parameter, gradient and both moments, writes
    parameter and moments (28 B a shard element).
    """
    total_bytes = 0
    for u in units:
        e, r = u.param_bytes, u.reduce_bytes
        numel = sum(p.numel for p in u.params)
        shard_numel = sum(p.shard_numel(shard) for p in u.params)
        trainable = sum(p.numel for p in u.params if p.trainable)
        trainable_shard = sum(p.shard_numel(shard) for p in u.params if p.trainable)
        gathers = 2 if u.reshard and u.kind != "root" else 1
        if shard == 1:
            total_bytes += gathers * numel * (4 + e)
        else:
            total_bytes += gathers * (shard_numel * (4 + e) + numel * 2 * e)
            total_bytes += trainable * (e + r)
        total_bytes += trainable_shard * (12 + 12 + 28)
    return total_bytes


# ======================================================================================== calibration
def described_step(step: dict) -> StepWork:
    """The work of a step described as hardware.yaml describes a measured one: a `model` and a `parallel`
    recipe section (keys not given at their defaults), the world size and the batch."""
    from vggt_fsdp.parallel.config import ParallelConfig
    from vggt_fsdp.recipe import ModelSpec, from_data, model_config

    spec = from_data(ModelSpec, step["model"], "model")
    parallel = from_data(ParallelConfig, step["parallel"], "parallel")
    cfg = model_config(spec)
    b = step["batch"]
    batch = Batch(b["scenes"], b["frames"], b["height"], b["width"], cfg.aggregator.patch_size)
    return step_work(cfg, parallel, batch, world_size=step["world_size"], freeze=tuple(spec.freeze))


def measured_work(step: dict) -> dict[str, int]:
    """hardware.yaml's `work` of a measured step: FLOPs by kind and memory-bound bytes, as counted now."""
    by_kind = described_step(step).by_kind()
    return {"attention": by_kind["attention"], "matmul": by_kind["matmul"],
            "convolution": by_kind["convolution"], "bytes": by_kind["memory"]}


def main(argv: list[str] | None = None) -> int:
    """`python -m vggt_fsdp.memory.steptime CARD`: the `work` line of a measured card's entry in
    hardware.yaml, counted by the current code (paste it there after a change to what is counted)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vggt_fsdp.memory.steptime", description=main.__doc__)
    parser.add_argument("card", help="a measured card of hardware.yaml, e.g. h200")
    args = parser.parse_args(argv)
    measured = hardware.card(args.card).measured
    if measured is None:
        parser.error(f"{args.card} has no measurement in hardware.yaml (its rates are derived)")
    work = measured_work(measured.step)
    print("        work: {" + ", ".join(f"{k}: {v}" for k, v in work.items()) + "}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
