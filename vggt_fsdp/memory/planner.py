"""One GPU's peak memory for a VGGT training step, predicted from shapes before anything is launched.

The plan is a table of terms, each a formula over the model config, the `parallel:` policy, the world
size, the frames per GPU and the image size (see `formulas.py` for the activation formulas and the
`Term.formula` strings for the rest). Three kinds of term:

- model state (persistent): FSDP2's sharded fp32 parameters, gradients and AdamW state on rank 0 (the
  largest shard: dim 0 is split in chunks of ceil(d0 / shard)), or nothing on the device with CPU offload;
  the unsharded root and, without resharding after forward, every unit's unsharded parameters.
- activations: what the forward pass leaves saved for backward under the checkpoint policy.
- backward transients at the peak: recomputed activations of the unit being differentiated, gradient
  temporaries, the running and prefetched units' unsharded parameters, unsharded gradients and the
  reduce-scatter buffer.

The peak is the largest of three moments: the end of forward, the first head's backward (all
activations still alive, plus one chunk's recompute), the first aggregator block's backward. The
predicted figure is what `torch.cuda.max_memory_allocated` reports; `device_bytes` adds the allocator's
fragmentation and the memory outside PyTorch's allocator (CUDA context, NCCL) to decide what fits.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vggt_fsdp.memory import context_terms as CT
from vggt_fsdp.memory import formulas as F
from vggt_fsdp.memory import track_formulas as TF
from vggt_fsdp.memory.units import (  # noqa: F401 (planner._meta_model, planner._unit_layout: read by tests)
    UnitInfo, _meta_model, _unit_layout, shard_size, structure_key, unit_layout)
from vggt_fsdp.model.config import VGGTConfig

GiB = 1024**3

# Allocator and runtime overheads (CUDA): the caching allocator's reserved memory exceeds the allocated
# peak by fragmentation (small with expandable_segments, which the trainer and upstream set: reserved /
# allocated was 1.05 at a 63 GiB peak and 1.004-1.006 in the runs that ran out of a 40 or 80 GiB cap, H200
# comparison of 2026-11-27, benchmarks/results/2026-11-27-nvidia-h200.md; up to 1.3 only in runs far
# below the card's memory); the CUDA context, cuBLAS/cuDNN handles and NCCL buffers live outside
# PyTorch's allocator (1.25 GiB is an estimate, not measured by this project).
FRAGMENTATION = 1.05
NON_PYTORCH_BYTES = int(1.25 * GiB)

# Checkpoint options the fitter tries, least recompute first within each head setting: the order of
# their recompute FLOPs (formulas.block_recompute_flops) for VGGT-1B's blocks at 24 frames a scene, 518 px
# (0, 0.25, 0.255, 0.33, 0.34, 0.5, 0.77, 1 of a forward; tests/test_memory.py checks it). The order is
# shape-dependent: attention is cheaper than selective(sdpa) in short scenes, selective cheaper than
# every_4 in longer ones.
BLOCK_POLICIES = ("none", "every_4", "selective(sdpa+qkv)", "every_3", "selective(sdpa)", "every_2", "attention",
                  "block")
HEAD_POLICIES = ("none", "chunks")


# ======================================================================================== results
@dataclass(frozen=True)
class Term:
    name: str
    category: str  # state | activation | transient | overhead
    bytes: int
    formula: str
    group: str | None = None  # model part, for comparisons with measured saved-tensor groups


@dataclass
class MemoryPlan:
    """The predicted peak of one GPU and its terms. `peak_bytes` ~ torch.cuda.max_memory_allocated."""

    model: str
    world_size: int
    shard_size: int
    frames_per_gpu: int
    scenes: int
    frames_per_scene: int
    image_hw: tuple[int, int]
    device_kind: str
    policy: dict
    terms: list[Term]
    peak_phase: str
    peak_bytes: int
    device_bytes: int  # peak * fragmentation + memory outside PyTorch's allocator (CUDA only)
    phases: dict[str, int] = field(default_factory=dict)

    def term(self, name: str) -> Term:
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(f"no term {name!r}; terms: {[t.name for t in self.terms]}")

    def total(self, category: str, group: str | None = None) -> int:
        return sum(t.bytes for t in self.terms if t.category == category and (group is None or t.group == group))

    def fits(self, device_memory_bytes: int) -> bool:
        return self.device_bytes <= device_memory_bytes

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["terms"] = [dataclasses.asdict(t) | {"GiB": round(t.bytes / GiB, 3)} for t in self.terms]
        data["peak_GiB"] = round(self.peak_bytes / GiB, 3)
        data["device_GiB"] = round(self.device_bytes / GiB, 3)
        return data

    def table(self) -> str:
        rows = [("term", "kind", "GiB", "formula")]
        for t in self.terms:
            rows.append((t.name, t.category, f"{t.bytes / GiB:.3f}", t.formula))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
        lines.append("")
        for phase, value in self.phases.items():
            mark = "  <- peak" if phase == self.peak_phase else ""
            lines.append(f"{phase:<28} {value / GiB:8.3f} GiB{mark}")
        lines.append(f"{'predicted peak allocated':<28} {self.peak_bytes / GiB:8.3f} GiB")
        if self.device_kind == "cuda":
            lines.append(f"{'device total (x' + str(FRAGMENTATION) + ' + non-PyTorch)':<28} "
                         f"{self.device_bytes / GiB:8.3f} GiB")
        return "\n".join(lines)


# ======================================================================================== inputs
@dataclass(frozen=True)
class Batch:
    scenes: int
    frames: int  # per scene
    height: int
    width: int
    patch: int
    track_points: int = 0  # query points per scene the track head tracks (0: no track head)

    @property
    def ph(self) -> int:
        return self.height // self.patch

    @property
    def pw(self) -> int:
        return self.width // self.patch

    @property
    def patches(self) -> int:
        return self.ph * self.pw

    @property
    def images(self) -> int:
        return self.scenes * self.frames


def scene_splits(frames_per_gpu: int, frames_range: tuple[int, int], multiple: int = 1) -> list[tuple[int, int]]:
    """Every (scenes, frames per scene) batch the sampler can draw: S in frames_range, floor(budget / S)
    scenes. Memory depends on the split, not only on the frame count: the DPT heads chunk the frames of
    each scene but take all scenes of the batch at once, so short scenes make large chunks. `multiple`:
    a context group's size, whose budget is its GPUs' together and whose scenes are multiples of it."""
    lo, hi = frames_range
    if frames_per_gpu < lo:
        raise ValueError(f"frames_per_gpu={frames_per_gpu} is below the smallest scene ({lo} frames)")
    splits = sorted({(frames_per_gpu // s, s) for s in range(lo, min(hi, frames_per_gpu) + 1) if s % multiple == 0})
    if not splits:
        raise ValueError(f"no scene of {lo}-{hi} frames is a multiple of the context group's {multiple} ranks")
    return splits


# ======================================================================================== the plan
def plan(
    model_cfg: VGGTConfig,
    parallel_cfg,
    world_size: int,
    frames_per_gpu: int,
    image_hw: tuple[int, int],
    device_kind: F.DeviceKind = "cuda",
    *,
    frames_range: tuple[int, int] | None = None,
    freeze: tuple[str, ...] = (),
    gpus_per_node: int = 8,
    track_points: int = 0,
) -> MemoryPlan:
    """Predict one GPU's peak for a training step (forward, backward, AdamW step).

    `frames_range` (the recipe's data.frames_range): the plan is the worst over every scene split the
    sampler can draw from it (`scene_splits`); None: one scene of `frames_per_gpu` frames.
    `track_points`: query points per scene when the track head is enabled (its memory grows with them).
    """
    if model_cfg.enable_track and track_points < 1:
        raise ValueError(f"track_points={track_points}: the track head's memory depends on the query points per "
                         f"scene; pass track_points (a recipe's data.synthetic.num_track_queries)")
    if device_kind not in ("cpu", "cuda"):
        raise ValueError(f"device_kind={device_kind!r}; valid choices: cpu, cuda")
    if world_size < 1 or frames_per_gpu < 1:
        raise ValueError(f"world_size={world_size} and frames_per_gpu={frames_per_gpu} must be >= 1")
    height, width = image_hw
    patch = model_cfg.aggregator.patch_size
    if height % patch or width % patch:
        raise ValueError(f"image {height}x{width} is not a multiple of the patch size {patch}")
    # Context parallelism: a group of `size` GPUs shares each scene; a GPU plans its share of the frames.
    size = parallel_cfg.context_parallel
    group = frames_per_gpu * size
    splits = scene_splits(group, frames_range or (group, group), size)
    points = track_points if model_cfg.enable_track else 0
    plans = [_plan_batch(model_cfg, parallel_cfg, world_size, frames_per_gpu,
                         Batch(b, s // size, height, width, patch, points), device_kind, tuple(freeze), gpus_per_node)
             for b, s in splits]
    return max(plans, key=lambda p: p.peak_bytes)


def _plan_batch(model_cfg, parallel_cfg, world_size, frames_per_gpu, batch: Batch, device_kind, freeze,
                gpus_per_node) -> MemoryPlan:
    from vggt_fsdp.parallel.precision import uses_autocast

    kernels = F.Kernels(device_kind, autocast=uses_autocast(parallel_cfg.precision))
    units = unit_layout(model_cfg, parallel_cfg, freeze)
    shard = shard_size(parallel_cfg, world_size, gpus_per_node)

    states, params_live = _model_state_terms(model_cfg, parallel_cfg, freeze, units, shard, device_kind)
    acts, work = _activation_terms(model_cfg, units, batch, kernels)
    terms = states + _io_terms(model_cfg, batch) + acts + params_live + work
    size = parallel_cfg.context_parallel
    if size > 1:
        camera = sum(t.bytes for t in acts if t.group == "camera")
        terms += _context_terms(model_cfg, batch, size, [u for u in units if u.group == "global"], camera)
    phases = _phases(terms, units, shard, parallel_cfg.sharding.cpu_offload)
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    device = int(peak * FRAGMENTATION) + NON_PYTORCH_BYTES if device_kind == "cuda" else peak
    policy = {
        "blocks": {u.group or u.path: u.checkpoint for u in units if u.kind == "block"},
        "heads": parallel_cfg.checkpoint.heads,
    }
    return MemoryPlan(
        model=model_name(model_cfg), world_size=world_size, shard_size=shard, frames_per_gpu=frames_per_gpu,
        scenes=batch.scenes, frames_per_scene=batch.frames * size, image_hw=(batch.height, batch.width),
        device_kind=device_kind, policy=policy, terms=terms, peak_phase=peak_phase, peak_bytes=peak,
        device_bytes=device, phases=phases,
    )


def model_name(cfg: VGGTConfig) -> str:
    a = cfg.aggregator
    return f"VGGT(embed {a.embed_dim}, depth {a.depth}, patch-embed depth {cfg.patch_embed.depth})"


# ---------------------------------------------------------------------------------------- model state
_STATE_TERMS: dict[tuple, tuple[list[Term], list[Term]]] = {}


def _model_state_terms(model_cfg, parallel_cfg, freeze, units, shard: int, device_kind: str):
    """(sharded state terms, unsharded parameter terms): the same for every batch and checkpoint setting
    of a structure, so computed once per structure, shard and device kind."""
    key = (structure_key(model_cfg, parallel_cfg, freeze), shard, device_kind)
    if key not in _STATE_TERMS:
        _STATE_TERMS[key] = (_state_terms(units, shard, parallel_cfg.sharding.cpu_offload, device_kind),
                             _unsharded_terms(units, shard, fused_adamw=device_kind == "cuda",
                                              offload=parallel_cfg.sharding.cpu_offload))
    return _STATE_TERMS[key]


def _state_terms(units: list[UnitInfo], shard: int, offload: bool, device_kind: str) -> list[Term]:
    params = [p for u in units for p in u.params]
    trainable = [p for p in params if p.trainable]
    sharded = sum(p.shard_numel(shard) for p in params) * 4
    grads = sum(p.shard_numel(shard) for p in trainable) * 4
    where = " (in host memory: 0 on the device)" if offload else ""
    scale = 0 if offload else 1
    # AdamW: exp_avg and exp_avg_sq like each sharded parameter, and a 4-byte step per tensor.
    opt = 2 * grads + 4 * len(trainable)
    return [
        Term("sharded parameters (fp32)", "state", scale * sharded,
             f"sum_p ceil(d0/{shard}) * numel/d0 * 4 B over {len(params)} tensors{where}"),
        Term("sharded gradients (fp32)", "grads", scale * grads,
             f"same over {len(trainable)} trainable tensors{where}"),
        Term("AdamW state (fp32 exp_avg, exp_avg_sq, step)", "state", scale * opt,
             f"2 x sharded gradients + 4 B x {len(trainable)} steps{where}"),
    ]


def _unsharded_terms(units: list[UnitInfo], shard: int, fused_adamw: bool, offload: bool = False) -> list[Term]:
    root = next(u for u in units if u.kind == "root")
    kept = [u for u in units if u.kind != "root" and not u.reshard]
    biggest = max((u for u in units if u.kind != "root"), key=lambda u: u.unsharded())
    trainable = sum(p.shard_numel(shard) for u in units for p in u.params if p.trainable) * 4
    terms = [
        Term("unsharded root parameters", "state", root.unsharded(),
             "root unit numel x param dtype (kept from forward to backward)"),
    ]
    if kept:
        terms.append(Term("unsharded parameters kept after forward", "state",
                          sum(u.unsharded() for u in kept),
                          f"{len(kept)} units with reshard_after_forward false: numel x param dtype"))
    terms.append(Term("running unit + prefetch all-gather", "transient",
                      biggest.unsharded() + biggest.all_gather(shard),
                      f"largest unit {biggest.path or '<root>'}: unsharded params + the next unit's all-gather "
                      f"output ({shard} x padded shard x dtype)"))
    terms.append(Term("unit backward: prefetched params, unsharded grads, reduce-scatter", "transient",
                      biggest.unsharded() + biggest.grad_unsharded() + biggest.reduce_scatter(shard),
                      f"largest unit: numel x param dtype (the next unit, prefetched) + trainable numel x param "
                      f"dtype + {shard} x padded shard x reduce dtype"))
    terms.append(Term("optimizer step temporaries", "transient", 0 if fused_adamw or offload else trainable,
                      "with CPU offload: on the host (memory/offload.py); fused AdamW: none; foreach AdamW: one "
                      "fp32 list like the sharded gradients"))
    return terms


def _io_terms(model_cfg: VGGTConfig, b: Batch) -> list[Term]:
    """The batch's images (alive the whole step) and the dense outputs (alive until backward ends)."""
    hw = b.height * b.width
    dense = (2 if model_cfg.enable_depth else 0) + (4 if model_cfg.enable_point else 0)
    return [
        Term("input images (fp32)", "io", b.images * 3 * hw * 4, "images x 3 x H x W x 4 B"),
        Term("dense outputs (fp32)", "outputs", b.images * dense * hw * 4,
             "images x H x W x 4 B x (depth + conf: 2, points + conf: 4)"),
    ]


def _context_terms(model_cfg: VGGTConfig, b: Batch, size: int, global_units: list[UnitInfo],
                   camera: int) -> list[Term]:
    """What a rank of a context group holds beyond its share of frames (memory/context_terms.py)."""
    hw = b.height * b.width
    agg = model_cfg.aggregator
    tokens = b.patches + 1 + agg.num_register_tokens
    elem = global_units[0].param_bytes
    kept = sum(1 for u in global_units if u.checkpoint == "none")
    return [
        Term("global attention inputs after the exchange", "activation",
             kept * CT.exchanged_qkv_delta(agg.qk_norm) * b.images * tokens * agg.embed_dim * elem,
             f"{kept} global blocks without checkpointing x {CT.exchanged_qkv_delta(agg.qk_norm)} units "
             "(SDPA saves fresh exchanged q, k, v instead of views of the qkv output)", group="global"),
        Term("camera head over the other ranks' frames", "activation", camera * (size - 1),
             f"camera head terms x {size - 1}: its trunk runs on every rank over the whole scene's pose tokens "
             "(linear in frames: its attention over one token a frame is negligible)", group="camera"),
        Term("gathered ground truth (context group)", "io",
             b.images * (size - 1) * CT.GROUND_TRUTH_BYTES_PER_PIXEL * hw,
             f"scenes x frames on the {size - 1} other ranks x H x W x {CT.GROUND_TRUTH_BYTES_PER_PIXEL} B "
             "(depth, world and camera points, mask), gathered for the loss"),
        Term("gathered dense outputs (context group)", "outputs",
             CT.gathered_output_bytes(model_cfg, b.scenes, b.frames * size, size, hw),
             "the other ranks' frames of the dense outputs, gathered for the loss"),
        Term("context exchange buffers (one global attention)", "transient",
             CT.exchange_buffer_bytes(b.scenes, b.frames, tokens, model_cfg.aggregator.embed_dim, elem),
             "2 x 4 x (this rank's tokens) x C x e: send and receive copies of q, k, v, attention output"),
    ]


# ---------------------------------------------------------------------------------------- activations
def _grad_flow(model_cfg: VGGTConfig, units: list[UnitInfo]) -> dict[str, bool]:
    """Whether each stage of the forward pass saves activations: it does once anything trainable comes
    before it or in it (frozen leading stages with frozen inputs save nothing)."""
    trainable = [p.name for u in units for p in u.params if p.trainable]

    def any_in(prefixes: tuple[str, ...]) -> bool:
        return any(n.startswith(prefixes) for n in trainable)

    dino_stem = any_in(("aggregator.patch_embed.patch_embed.", "aggregator.patch_embed.cls_token",
                        "aggregator.patch_embed.pos_embed", "aggregator.patch_embed.register_tokens"))
    flow: dict[str, bool] = {"stem": dino_stem}
    on = dino_stem
    for i in range(model_cfg.patch_embed.depth):
        on = on or any_in((f"aggregator.patch_embed.blocks.{i}.",))
        flow[f"dino.{i}"] = on
    on = on or any_in(("aggregator.patch_embed.norm.",))
    flow["dino_norm"] = on
    on = on or any_in(("aggregator.camera_token", "aggregator.register_token"))  # joined after the norm
    agg = model_cfg.aggregator
    layer = 0
    for _ in range(agg.depth // agg.aa_block_size):
        for kind in agg.aa_order:
            for i in range(layer, layer + agg.aa_block_size):
                on = on or any_in((f"aggregator.{kind}_blocks.{i}.",))
                flow[f"{kind}.{i}"] = on
        layer += agg.aa_block_size
    flow["aggregator"] = on
    for head in ("camera_head", "depth_head", "point_head", "track_head"):
        flow[head] = on or any_in((head + ".",))
    return flow


def _activation_terms(model_cfg: VGGTConfig, units, b: Batch, k: F.Kernels) -> tuple[list[Term], list[Term]]:
    """Saved activations (category activation) and the backward transients of activations."""
    agg, pe = model_cfg.aggregator, model_cfg.patch_embed
    C, D = agg.embed_dim, model_cfg.token_dim
    policies = {u.path: u.checkpoint for u in units if u.kind == "block"}
    dtype = {u.path: u.param_bytes for u in units}
    flow = _grad_flow(model_cfg, units)
    terms: list[Term] = []
    work: list[tuple[str, int, str]] = []  # (name, bytes, formula) of backward transients
    tokens = b.patches + 1 + agg.num_register_tokens  # per frame in the aggregator: camera, registers, patches
    e_root = dtype[""]

    # -- patch embed (root unit): conv input and the DINO blocks.
    if pe.type != "dinov2":
        raise ValueError("the planner models the DINOv2 patch embed (patch_embed.type 'dinov2')")
    stem = b.images * 3 * b.height * b.width * e_root if flow["stem"] else 0
    terms.append(Term("patch-embed conv input", "activation", stem,
                      f"images x 3 x H x W x {e_root} B (normalised images, saved for the conv's weight grad)",
                      group="other"))
    dino_seq = 1 + pe.num_register_tokens + b.patches
    dino_terms = _blocks_term(
        "DINO blocks", "dino", [f"aggregator.patch_embed.blocks.{i}" for i in range(pe.depth)],
        [flow[f"dino.{i}"] for i in range(pe.depth)], policies, dtype, k,
        lambda e: F.BlockShape(b.images, dino_seq, C, pe.num_heads, e, False, 0, bool(pe.init_values)),
        f"T = images x (1 + {pe.num_register_tokens} + P)")
    terms.append(dino_terms[0])
    work.append(dino_terms[1])
    dino_last = F.BlockShape(b.images, dino_seq, C, pe.num_heads, e_root, False, 0, True)
    final_norm = (dino_last.tokens * C * k.norm_input(e_root) + 2 * dino_last.tokens * k.ln_stats(e_root)
                  + k.norm_param_copies(C, e_root))
    terms.append(Term("DINO final norm input", "activation", final_norm if flow["dino_norm"] else 0,
                      "T x C x e (fp32 under CUDA autocast) + LayerNorm mean/rstd (the last DINO block's output)",
                      group="other"))

    # -- aggregator blocks.
    rope = agg.rope_freq > 0
    frame_terms = _blocks_term(
        "frame blocks", "frame", [f"aggregator.frame_blocks.{i}" for i in range(agg.depth)],
        [flow[f"frame.{i}"] for i in range(agg.depth)], policies, dtype, k,
        lambda e: F.BlockShape(b.images, tokens, C, agg.num_heads, e, agg.qk_norm, tokens if rope else 0,
                               bool(agg.init_values)),
        "T = scenes x frames x (P + 5), RoPE over P + 5")
    global_terms = _blocks_term(
        "global blocks", "global", [f"aggregator.global_blocks.{i}" for i in range(agg.depth)],
        [flow[f"global.{i}"] for i in range(agg.depth)], policies, dtype, k,
        lambda e: F.BlockShape(b.scenes, b.frames * tokens, C, agg.num_heads, e, agg.qk_norm,
                               b.frames * tokens if rope else 0, bool(agg.init_values)),
        "T = scenes x frames x (P + 5), RoPE over frames x (P + 5)")
    terms += [frame_terms[0], global_terms[0]]
    work += [frame_terms[1], global_terms[1]]

    terms_h, work_h = _head_terms(model_cfg, units, b, k, policies, flow, tokens)
    terms += terms_h
    work += work_h
    work_terms = [Term(n, "transient", v, f) for n, v, f in work]
    return terms, work_terms


def _head_input_mode(units: list[UnitInfo]) -> str:
    """How the fp32 heads receive the aggregator's kept layers (the tokens list):

    shared:   tokens are already in the heads' dtype (an fp32 aggregator): every head reads the same tensors.
    per_head: FSDP2 casts each fp32 head unit's floating inputs (MixedPrecisionPolicy.cast_forward_inputs:
              a head without `casts_own_inputs`): each head gets its own fp32 copy of every layer.
    chunk:    tokens arrive in bf16 and the heads cast what they read (DPT: each chunk; camera: its tokens).
    """
    heads = [u for u in units if u.path in ("camera_head", "depth_head", "point_head")]
    token_bytes = next(u.param_bytes for u in units if u.path.startswith("aggregator.global_blocks."))
    if not heads or all(u.param_bytes == token_bytes for u in heads):
        return "shared"
    casts = all(u.casts_inputs for u in heads)
    return "per_head" if casts else "chunk"


def _head_terms(model_cfg: VGGTConfig, units, b: Batch, k: F.Kernels, policies, flow, tokens: int):
    agg, dpt = model_cfg.aggregator, model_cfg.dpt_head
    D = model_cfg.token_dim
    token_bytes = next(u.param_bytes for u in units if u.path.startswith("aggregator.global_blocks."))
    mode = _head_input_mode(units)
    dpt_heads = [h for h in ("depth_head", "point_head") if getattr(model_cfg, f"enable_{h.split('_')[0]}")]
    # DPTHead chunks the scenes' frames together: (B S, P, 2C) sliced into chunks of frames_chunk_size images.
    chunk = dpt.frames_chunk_size or b.images
    chunks = [min(chunk, b.images - s) for s in range(0, b.images, chunk)]
    # A chunk's slice of the flattened layer is a view; the DPT norm saves it as such (the whole layer
    # stays alive) unless the head casts it, which makes the chunk its own fp32 copy.
    copies_chunks = mode == "chunk"
    any_view = not copies_chunks
    dpt_layers = sorted({i % agg.depth for i in dpt.intermediate_layer_idx}) if dpt_heads else []
    ckpt = {h: next(u.checkpoint for u in units if u.path == h) == "chunks" for h in dpt_heads}
    layer_elems = b.images * tokens * D
    terms: list[Term] = []
    work: list[tuple[str, int, str]] = []

    # -- kept layers: which whole layers stay saved, in which dtype, how many copies.
    whole: dict[tuple[str, int], int] = {}  # (copy owner, layer) -> element bytes
    owner = lambda head: "shared" if mode == "shared" else head  # noqa: E731
    if model_cfg.enable_camera and flow["camera_head"] and mode != "chunk":
        whole[(owner("camera_head"), agg.depth - 1)] = 4
    for head in dpt_heads:
        if not flow[head]:
            continue
        if ckpt[head]:  # the checkpoint saves its chunk inputs: views of the layers as the head received them
            for layer in dpt_layers:
                whole[("bf16" if mode == "chunk" else owner(head), layer)] = token_bytes if mode == "chunk" else 4
        elif any_view:
            for layer in dpt_layers:
                whole[(owner(head), layer)] = 4
    track = model_cfg.enable_track and flow["track_head"]
    track_layers = sorted({i % agg.depth for i in dpt.intermediate_layer_idx}) if model_cfg.enable_track else []
    if track:  # the bf16 track head reads (checkpointed: keeps) views of the layers as the aggregator made them
        for layer in track_layers:
            whole[("shared" if mode == "shared" else "bf16", layer)] = token_bytes
    kept = sum(whole.values()) * layer_elems
    copies = {o for o, _ in whole}
    terms.append(Term("kept layer outputs (as the heads hold them)", "activation", kept,
                      f"{len(whole)} whole layers x scenes x frames x (P + 5) x 2C x dtype; head inputs: {mode}"
                      + (f" ({len(copies)} copies)" if mode == "per_head" else ""), group="kept"))

    # -- camera head.
    if model_cfg.enable_camera:
        cam = model_cfg.camera_head
        trunk = tuple(policies[f"camera_head.trunk.{i}"] for i in range(cam.trunk_depth))
        shape = F.CameraShape(b.scenes, b.frames, D, cam.num_heads, cam.trunk_depth, cam.num_iterations, 9)
        own_copy = b.images * D * 4 if mode == "chunk" else 0  # its fp32 camera tokens
        terms.append(Term("camera head", "activation",
                          F.camera_head_saved(shape, k, trunk) + own_copy if flow["camera_head"] else 0,
                          "formulas.camera_head_saved: M = scenes x frames tokens of 2C, fp32, "
                          f"{cam.num_iterations} iterations x {cam.trunk_depth} trunk blocks", group="camera"))

    # -- DPT heads: every chunk's activations, or (checkpointed) nothing beyond the kept chunk inputs.
    for head in dpt_heads:
        output_dim, act = (2, dpt.depth_activation) if head == "depth_head" else (4, dpt.point_activation)

        def shape(images_in_chunk: int) -> F.DPTShape:
            return F.DPTShape(images_in_chunk, b.ph, b.pw, model_cfg.aggregator.patch_size, D,
                              tuple(dpt.out_channels), dpt.features, output_dim, act, dpt.pos_embed,
                              copies_chunks)

        saved = 0 if ckpt[head] or not flow[head] else sum(F.dpt_chunk_saved(shape(c)) for c in chunks)
        name = head.replace("_", " ")
        terms.append(Term(name, "activation", saved,
                          "chunks checkpointed: only the chunk inputs (kept layers)" if ckpt[head] else
                          f"sum over {len(chunks)} chunks of formulas.dpt_chunk_saved (fp32, full resolution)",
                          group=head.split("_")[0]))
        recompute = F.dpt_chunk_saved(shape(max(chunks))) if ckpt[head] else 0
        work.append((f"{name} backward (recompute + grads of one chunk)",
                     recompute + F.dpt_chunk_backward_work(shape(max(chunks))),
                     ("dpt_chunk_saved + " if ckpt[head] else "") + "dpt_chunk_backward_work of the largest chunk"))
    if dpt_heads:
        # The gradient of each layer a DPT head read accumulates over all its chunks in the dtype the head
        # received it in; after the head (per-head fp32 copies) it is cast back and waits in the
        # aggregator's dtype until the aggregator's backward reaches the layer.
        head_grad = 4 if mode != "chunk" else token_bytes
        layers = f"{len(dpt_layers)} layers x scenes x frames x (P + 5) x 2C"
        work.append(("gradients of the kept layers (in a head)", len(dpt_layers) * layer_elems * head_grad,
                     f"{layers} x {head_grad} B"))
        work.append(("gradients of the kept layers (aggregator dtype)", len(dpt_layers) * layer_elems * token_bytes,
                     f"{layers} x {token_bytes} B"))
    if model_cfg.enable_track:
        track_terms, track_work = _track_terms(model_cfg, units, b, k, track)
        terms += track_terms
        work += track_work
        if not dpt_heads:  # the track head alone reads the DPT layers: their gradients are its
            layers = f"{len(track_layers)} layers x scenes x frames x (P + 5) x 2C x {token_bytes} B"
            work.append(("gradients of the kept layers (in a head)", len(track_layers) * layer_elems * token_bytes,
                         layers))
            work.append(("gradients of the kept layers (aggregator dtype)", 0, "the same tensors as in the head"))
    return terms, work


def track_shape(model_cfg: VGGTConfig, b: Batch) -> TF.TrackShape:
    """The track head's call at batch `b` (track_formulas.TrackShape)."""
    t, dpt = model_cfg.track_head, model_cfg.dpt_head
    return TF.TrackShape(b.scenes, b.frames, b.track_points, b.ph, b.pw, b.patch, model_cfg.token_dim,
                         tuple(dpt.out_channels), t.features, t.corr_levels, t.corr_radius, t.hidden_size, t.iters,
                         dpt.frames_chunk_size or b.images, t.predict_conf)


def _track_terms(model_cfg: VGGTConfig, units, b: Batch, k: F.Kernels, saves: bool):
    """The track head (track_formulas): its feature extractor and tracker activations, its outputs, and the
    backward transient of its largest recomputed region. It computes with bf16 parameters under autocast."""
    unit = next(u for u in units if u.path == "track_head")
    if unit.param_bytes != 2:
        raise ValueError("the memory planner models the track head computing in bf16 (under autocast), as "
                         "upstream trains it; it is an fp32 unit here (parallel.precision)")
    s = track_shape(model_cfg, b)
    chunks = unit.checkpoint == "chunks"
    note = f"B x S = {b.images} images, N = {s.points} points, {s.iters} iterations, chunks of {s.chunk} images"
    features = TF.features_saved(s, k, chunks) if saves else 0
    tracker = TF.tracker_saved(s, k, chunks) if saves else 0
    terms = [
        Term("track head feature extractor", "activation", features,
             "chunks checkpointed: only the chunk inputs (kept layers)" if chunks else
             f"sum over chunks of track_formulas.features_chunk_saved (bf16 autocast); {note}", group="track"),
        Term("track head tracker", "activation", tracker,
             "track_formulas.tracker_saved: " + ("feature maps, pyramid and each iteration's checkpoint inputs"
                                                 if chunks else "correlation volumes and update transformer "
                                                                "of every iteration") + f"; {note}",
             group="track"),
        Term("track outputs", "outputs",
             s.iters * b.images * s.points * 2 * F.FP32 + 4 * b.images * s.points * TF.BF16,
             "tracks of every iteration (B S N 2 fp32), visibility and confidence logits and probabilities"),
    ]
    largest = max(s.chunks())
    feature_grads = largest * 2 * s.features * 64 * b.patches * TF.BF16
    update_grads = 10 * b.scenes * (s.points + s.virtual) * b.frames * s.hidden * TF.BF16
    recompute_features = TF.features_chunk_saved(s, largest, k) if chunks else 0
    recompute_update = TF.update_saved(s, k) + TF.corr_chunk_saved(s, largest, k) if chunks else 0
    # The work recompute adds (for a step-time model): track_formulas.recompute_flops, by kind.
    flops = sum(TF.recompute_flops(s, chunks).values())
    work = [("track head backward (recompute + grads of one chunk)",
             max(recompute_features + feature_grads, recompute_update + update_grads),
             ("the larger of a feature-extractor chunk (features_chunk_saved) and one iteration (update_saved + "
              f"corr_chunk_saved), recomputed ({flops / 1e12:.2f} TFLOP a step in all: "
              "track_formulas.recompute_flops), " if chunks else "") +
             "plus gradient temporaries estimated as 2 F-channel maps at refinenet1's resolution, or 10 "
             "update-transformer units of B (N + V) S x Hd bf16")]
    return terms, work


def _blocks_term(title, group, paths, flows, policies, dtype, k, make_shape, shape_note):
    """The saved bytes of a group of blocks, and the backward transient of its costliest block."""
    saved = 0
    worst = 0
    counts: dict[str, int] = {}
    tables = 0
    for path, on in zip(paths, flows):
        policy = policies[path]
        counts[policy] = counts.get(policy, 0) + 1
        shape = make_shape(dtype[path])
        if on:
            saved += F.block_saved(shape, k, policy)
            if policy == "none":  # one shared set of fp32 tables, or each block's own cast copy
                one = F.rope_tables_saved(shape, k)
                tables = one if F.rope_tables_shared(shape, k) else tables + one
        worst = max(worst, F.block_recompute(shape, k, policy) + F.block_backward_work(shape))
    mix = ", ".join(f"{n} x {p}" for p, n in counts.items())
    term = Term(f"{title} ({mix})", "activation", saved + tables,
                f"sum of formulas.block_saved per block (+ rope_tables_saved: once, or per block when cast); "
                f"{shape_note}", group=group)
    return term, (f"{title}: recompute + grads of one block", worst,
                  "formulas.block_recompute + block_backward_work")


# ---------------------------------------------------------------------------------------- the peak
def _phases(terms: list[Term], units: list[UnitInfo], shard: int, offload: bool = False) -> dict[str, int]:
    """Bytes live at the candidate peaks. Gradients are None until backward (zero_grad(set_to_none))."""
    by = {t.name: t.bytes for t in terms}
    # The batch's images live through the step; the outputs until backward ends (the trainer's loss reads
    # them): counted with the state and the activations respectively.
    state = sum(t.bytes for t in terms if t.category in ("state", "io"))
    grads = sum(t.bytes for t in terms if t.category == "grads")
    acts = sum(t.bytes for t in terms if t.category in ("activation", "outputs"))
    head_acts = sum(t.bytes for t in terms if t.category == "activation"
                    and t.group in ("depth", "point", "camera", "track"))
    unit = by["running unit + prefetch all-gather"]
    unit_grads = by["unit backward: prefetched params, unsharded grads, reduce-scatter"]
    head_work = max((t.bytes for t in terms if t.name.endswith("(recompute + grads of one chunk)")), default=0)
    head_kept_grads = by.get("gradients of the kept layers (in a head)", 0)
    agg_kept_grads = by.get("gradients of the kept layers (aggregator dtype)", 0)
    block_work = max((t.bytes for t in terms if t.name.endswith("recompute + grads of one block")), default=0)
    kept = by.get("kept layer outputs (as the heads hold them)", 0)
    exchange = by.get("context exchange buffers (one global attention)", 0)
    # The heads' sharded gradients, made before the aggregator's backward (on the host with CPU offload).
    head_grads = 0 if offload else sum(p.shard_numel(shard) * 4 for u in units if u.kind == "module"
                                       for p in u.params if p.trainable)
    # The track head runs last in forward, so its backward comes first, then the DPT heads'.
    dpt_acts = sum(t.bytes for t in terms if t.category == "activation" and t.group in ("depth", "point", "track"))
    return {
        "end of forward": state + acts + unit + exchange,
        "first head backward": state + acts + unit + head_work + head_kept_grads,
        # The DPT (and track) heads are done: their activations are freed, the kept layers' gradients wait.
        "largest unit backward": state + head_grads + acts - dpt_acts + agg_kept_grads + unit + unit_grads,
        # The heads' activations and kept copies are freed; the kept layers' gradients remain.
        "first block backward": state + head_grads + acts - head_acts - kept + agg_kept_grads + unit + unit_grads
        + block_work + exchange,
        "optimizer step": state + grads + by["optimizer step temporaries"],
    }


# ======================================================================================== fitting
def max_frames_that_fit(model_cfg, parallel_cfg, world_size, image_hw, device_memory_bytes, device_kind="cuda",
                        *, frames_range=None, freeze=(), gpus_per_node: int = 8, limit: int = 1 << 14,
                        track_points: int = 0) -> int:
    """The largest frames per GPU whose plan fits `device_memory_bytes` (0 if not even one frame).
    Memory grows with frames, so doubling then bisection is exact; the search stops at `limit`."""
    def fits(frames: int) -> bool:
        rng = clip_range(frames_range, frames, parallel_cfg.context_parallel) if frames_range else None
        return plan(model_cfg, parallel_cfg, world_size, frames, image_hw, device_kind, frames_range=rng,
                    freeze=freeze, gpus_per_node=gpus_per_node, track_points=track_points).fits(device_memory_bytes)

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi < limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit)
    if hi == limit and fits(limit):
        return limit
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def policy_candidates(parallel_cfg) -> list:
    """Checkpoint settings, one per BLOCK_POLICIES entry (none, every 4th/3rd/2nd block, selective with
    each save set, attention, every block) for every block group, with DPT chunk recompute off, then the
    same with it on. The camera trunk keeps the recipe's own setting (one token per frame: nothing to
    gain)."""
    from vggt_fsdp.parallel.config import GroupCheckpoint, parse_policy_label

    out = []
    for heads in HEAD_POLICIES:
        for name in BLOCK_POLICIES:
            cfg = dataclasses.replace(parallel_cfg, checkpoint=dataclasses.replace(parallel_cfg.checkpoint))
            save = list(cfg.checkpoint.save)
            if name.startswith("every_"):
                policy, n = "every_n", int(name.split("_")[1])
            else:
                (policy, saved), n = parse_policy_label(name), cfg.checkpoint.n
                save = list(saved) or save
            groups = {g: GroupCheckpoint(policy=policy, n=n, save=save if policy == "selective" else None)
                      for g in ("dino", "frame", "global")}
            if "camera_trunk" in parallel_cfg.checkpoint.groups:
                groups["camera_trunk"] = parallel_cfg.checkpoint.groups["camera_trunk"]
            cfg.checkpoint.policy = policy
            cfg.checkpoint.n = n
            cfg.checkpoint.save = save
            cfg.checkpoint.groups = groups
            cfg.checkpoint.heads = heads
            out.append((f"blocks {name}, heads {heads}", cfg))
    return out


def recompute_rank(label: str) -> tuple[int, int]:
    """Recompute order of a candidate: first without DPT chunk recompute, then with it (a second forward
    of both heads at full resolution, the costliest recompute), each from no block recompute to all."""
    block, heads = label.replace("blocks ", "").split(", heads ")
    return HEAD_POLICIES.index(heads), BLOCK_POLICIES.index(block)


def cheapest_policy_that_fits(model_cfg, parallel_cfg, world_size, frames_per_gpu, image_hw, device_memory_bytes,
                              device_kind="cuda", *, frames_range=None, freeze=(), track_points: int = 0):
    """(label, ParallelConfig, MemoryPlan) of the least-recompute candidate that fits, or None."""
    for label, cfg in sorted(policy_candidates(parallel_cfg), key=lambda c: recompute_rank(c[0])):
        p = plan(model_cfg, cfg, world_size, frames_per_gpu, image_hw, device_kind,
                 frames_range=frames_range, freeze=freeze, track_points=track_points)
        if p.fits(device_memory_bytes):
            return label, cfg, p
    return None


# ======================================================================================== recipes
@dataclass(frozen=True)
class RecipeShape:
    model_cfg: VGGTConfig
    world_size: int
    image_hw: tuple[int, int]
    frames_range: tuple[int, int]
    freeze: tuple[str, ...]
    track_points: int = 0  # query points per scene of the track head (0: head off)


def recipe_shape(recipe, gpus: int | None = None, image_hw: tuple[int, int] | None = None) -> RecipeShape:
    """What a recipe implies for planning: its model config, the world size (accelerate num_processes,
    or `gpus`), the largest image the data section produces (width x the tallest aspect ratio, rounded
    down to patches), the scene sizes and, with the track head, the query points per scene (the most
    tracks a source gives a scene: data.synthetic.num_track_queries; other sources give none)."""
    from vggt_fsdp.data.sampler import image_hw_for
    from vggt_fsdp.recipe import model_config

    data = recipe.data
    if image_hw is None:
        image_hw = image_hw_for(max(data.aspect_range), data.image_width, data.patch_size)
    world = gpus if gpus is not None else int(recipe.accelerate.get("num_processes", 1))
    tracked = [s.synthetic.num_track_queries for s in data.source_configs() if s.source == "synthetic"]
    points = max(tracked, default=0) if recipe.model.heads.track else 0
    return RecipeShape(model_config(recipe.model), world, image_hw, tuple(data.frames_range),
                       tuple(recipe.model.freeze), points)


def clip_range(frames_range: tuple[int, int], frames: int, group: int = 1) -> tuple[int, int]:
    """The scene sizes a budget of `frames` per GPU can draw: no scene is larger than the budget of the
    `group` GPUs holding it (parallel.context_parallel)."""
    lo, hi = frames_range
    return (min(lo, frames * group), min(hi, frames * group))


def resolve_frames_per_gpu(recipe, device_memory_bytes: int, device_kind: str = "cuda", *,
                           gpus: int | None = None, image_hw: tuple[int, int] | None = None,
                           gpus_per_node: int = 8) -> int:
    """`data.frames_per_gpu: auto`: the largest budget that fits this device under the recipe's policy,
    at least the largest scene (data.frames_range[1]); raises when not even that fits. `gpus` and
    `image_hw` as in `recipe_shape`. The one place this decision is made (plan command and trainer)."""
    shape = recipe_shape(recipe, gpus, image_hw)
    best = max_frames_that_fit(shape.model_cfg, recipe.parallel, shape.world_size, shape.image_hw,
                               device_memory_bytes, device_kind, frames_range=shape.frames_range,
                               freeze=shape.freeze, gpus_per_node=gpus_per_node, track_points=shape.track_points)
    need = -(-shape.frames_range[1] // recipe.parallel.context_parallel)  # a GPU's share of the largest scene
    if best < need:
        raise ValueError(
            f"data.frames_per_gpu: auto found {best} frames per GPU fit {device_memory_bytes / GiB:.1f} GiB: "
            f"not even the largest scene (data.frames_range[1]={need}); lower data.frames_range, the image "
            f"size, or choose a stronger parallel.checkpoint policy (`vggt-fsdp plan` lists one)")
    return best
