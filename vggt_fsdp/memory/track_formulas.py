"""Bytes VGGT's track head saves for backward, as closed formulas over shapes (issue 13).

The companion of `formulas.py` for `vggt_fsdp.model.heads.track*`: each function lists the tensors one
part of the head leaves saved for backward (charged once per storage, parameters excluded), so a term
can be checked line by line against the model code, and `planner.py` turns them into plan terms.

The track head computes with bf16 parameters under bf16 autocast (it declares `needs_autocast`), on
every recipe that computes in bf16. Autocast differs between devices, and so do the bytes:

- LayerNorm and GroupNorm: CUDA autocast runs them in fp32 (each saves an fp32 input, a copy unless the
  input is fp32 already, fp32 copies of its weight and bias, fp32 statistics, and returns fp32); CPU
  autocast runs them in the input's dtype (statistics in it too).
- grid_sample: CPU autocast runs it in fp32 (it saves fp32 copies of its input and grid); CUDA autocast
  in its inputs' dtype ("promote"; the sampler casts the grid to the input's dtype).
- matmul, linear, conv, SDPA: bf16 on both (autocast casts fp32 inputs to bf16 copies, which they save).

Shapes (`TrackShape`): B scenes, S frames, N query points per scene, C the feature width (`features`),
h x w the feature maps (half the image), L correlation levels (level l is floor-halved l times),
W2 = (2r+1)^2 the lookup window, Hd the update transformer's width, V its 64 virtual tracks, I the
refinement iterations, n images per chunk (`frames_chunk_size`).

Where the memory is (VGGT-1B, 24 frames, 518 x 518, 512 points, 4 iterations, CUDA formulas): without
recompute the correlation volumes' sampled copies (S N h w per level and iteration) and the update
transformer's activations (about 18 bf16 units of B (N + V) S x Hd per block, 24 blocks per iteration)
dominate; `checkpoint_chunks` keeps the feature maps, their pyramid and a few (B, S, N, .) tensors per
iteration (benchmarks/results/2026-11-29-cpu-track-memory.md has the counts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from vggt_fsdp.memory.formulas import FP32, Kernels

BF16 = 2


@dataclass(frozen=True)
class TrackShape:
    """One track-head call: B scenes of S frames, N query points per scene, on a ph x pw patch grid."""

    scenes: int
    frames: int
    points: int
    ph: int
    pw: int
    patch: int
    dim_in: int  # the aggregator's token width (2C of the aggregator)
    out_channels: tuple[int, int, int, int]
    features: int
    levels: int
    radius: int
    hidden: int
    iters: int
    chunk: int  # images per chunk (feature extractor and correlation lookup)
    predict_conf: bool = True
    heads: int = 8  # EfficientUpdateFormer's
    virtual: int = 64  # its virtual tracks
    depth: int = 6  # its time blocks (and space layers)

    @property
    def images(self) -> int:
        return self.scenes * self.frames

    @property
    def fmap_hw(self) -> tuple[int, int]:
        """The feature maps: the DPT output at half the (patch-rounded) image size."""
        return int(self.ph * self.patch / 2), int(self.pw * self.patch / 2)

    def level_areas(self) -> list[int]:
        h, w = self.fmap_hw
        areas = []
        for _ in range(self.levels):
            areas.append(h * w)
            h, w = h // 2, w // 2
        return areas

    @property
    def window(self) -> int:
        return (2 * self.radius + 1) ** 2

    @property
    def transformer_dim(self) -> int:
        return 3 * self.features + 4

    def chunks(self) -> list[int]:
        return [min(self.chunk, self.images - s) for s in range(0, self.images, self.chunk)]


# ------------------------------------------------------------------------------------ autocast helpers
def _cuda(k: Kernels) -> bool:
    return k.kind == "cuda"


def norm_input(rows: int, dim: int, in_bytes: int, k: Kernels) -> int:
    """The input a LayerNorm/GroupNorm saves: an fp32 tensor on CUDA (autocast's copy unless fp32
    already), the input itself on the CPU."""
    return rows * dim * (FP32 if _cuda(k) else in_bytes)


def norm_rest(rows: int, dim: int, in_bytes: int, k: Kernels) -> int:
    """What a norm saves besides its input: mean and rstd per row (fp32 on CUDA, the input's dtype on
    the CPU) and, on CUDA, autocast's fp32 copies of its bf16 weight and bias."""
    if _cuda(k):
        return 2 * rows * FP32 + 2 * dim * FP32
    return 2 * rows * in_bytes


def norm_saved(rows: int, dim: int, in_bytes: int, k: Kernels) -> int:
    return norm_input(rows, dim, in_bytes, k) + norm_rest(rows, dim, in_bytes, k)


def norm_out_bytes(in_bytes: int, k: Kernels) -> int:
    return FP32 if _cuda(k) else in_bytes


# ------------------------------------------------------------------------------------ feature extractor
def features_chunk_saved(s: TrackShape, n: int, k: Kernels) -> int:
    """`DPTHead._forward_chunk` of the track head (feature only, no position embedding, bf16 autocast)
    for n images; the kept layers it reads are the aggregator's (not charged here).

    Per stage i (4): the LayerNorm over D = dim_in (`norm_saved` less the input on the CPU, where it is a
    view of the kept layer; CUDA saves an fp32 copy of the chunk), the 1x1 projection's input (n P D bf16),
    the projected map (n oc_i P, the resize's input) and the resized map (the 3x3 `layer{i}_rn`'s input;
    stage 3's resize is the identity). Fusion as `formulas.dpt_chunk_saved` (2 F A per residual unit, each
    fusion's out_conv input at the next area), and output_conv1's input (F x 4 A_1); all bf16. The final
    bilinear resize to h x w saves nothing.
    """
    P, D, F = s.ph * s.pw, s.dim_in, s.features
    c1, c2, c3, c4 = s.out_channels
    a1, a2, a3 = 16 * P, 4 * P, P
    a4 = math.ceil(s.ph / 2) * math.ceil(s.pw / 2)
    total = 0
    for oc, area in ((c1, a1), (c2, a2), (c3, None), (c4, a4)):
        rows = n * P
        norm = norm_rest(rows, D, BF16, k) + (norm_input(rows, D, BF16, k) if _cuda(k) else 0)
        elems = rows * D + n * oc * P + (n * oc * area if area is not None else 0)
        total += norm + elems * BF16
    fusion = (2 * F * a4 + F * a3) + (4 * F * a3 + F * a2) + (4 * F * a2 + F * a1) + (4 * F * a1 + F * 4 * a1)
    fusion += F * 4 * a1  # output_conv1's input
    return total + n * fusion * BF16


# ------------------------------------------------------------------------------------ tracker
def tracker_once_saved(s: TrackShape, k: Kernels, checkpointed: bool) -> int:
    """What the tracker saves once per call, whatever the iterations:

    fmap_norm over C of the (B, S, C, h, w) bf16 feature maps (`norm_saved`; on the CPU its input is
    the feature maps themselves); the pyramid: level 0 is the norm's output (bf16 on the CPU, fp32 on
    CUDA), levels 1..L-1 its 2x average pools, all saved (as pool inputs, correlation operands or
    checkpoint inputs), except the last level on CUDA without recompute (the matmul saves its bf16 copy);
    the initial track features' grid_sample of frame 0 (CPU: fp32 copies of its input B C h w and grid
    B N 2; CUDA: the grid only, the input being a view of level 0); the visibility and confidence
    predictors' bf16 copies of the final fp32 track features (B S N C each).
    Checkpointed: the inputs every iteration's checkpoints share (queries B N 2 fp32, query embeddings
    B N D fp32, the reference token S D bf16) and the first iteration's track features (B S N C fp32)
    and positions (B S N 2 fp32).
    """
    B, S, N, C = s.scenes, s.frames, s.points, s.features
    h, w = s.fmap_hw
    total = norm_saved(B * S * h * w, C, BF16, k)
    e_pyr = norm_out_bytes(BF16, k)
    areas = s.level_areas()
    for level, area in enumerate(areas):
        last_copied = _cuda(k) and not checkpointed and level == len(areas) - 1 and len(areas) > 1
        if not last_copied:
            total += B * S * C * area * e_pyr
    total += B * N * 2 * FP32 if _cuda(k) else B * C * h * w * FP32 + B * N * 2 * FP32
    total += (2 if s.predict_conf else 1) * B * S * N * C * BF16
    if checkpointed:
        total += B * N * 2 * FP32 + B * N * s.transformer_dim * FP32 + S * s.transformer_dim * BF16
        total += B * S * N * C * FP32 + B * S * N * 2 * FP32
    return total


def corr_saved(s: TrackShape, k: Kernels) -> int:
    """`CorrelationLookup` of one iteration without recompute, per level l (all chunks together):
    autocast's bf16 copy of the fp32 track features for the matmul (B S N C; a copy per level), on CUDA
    its bf16 copy of the fp32 level (B S C a_l), and the window lookup's grid_sample: on the CPU fp32
    copies of the correlation volume (B S N a_l) and of the grid (B S N W2 x 2), on CUDA the bf16 volume
    and grid themselves."""
    B, S, N, C = s.scenes, s.frames, s.points, s.features
    total = 0
    for area in s.level_areas():
        total += B * S * N * C * BF16
        if _cuda(k):
            total += B * S * C * area * BF16 + B * S * N * area * BF16 + B * S * N * s.window * 2 * BF16
        else:
            total += B * S * N * area * FP32 + B * S * N * s.window * 2 * FP32
    return total


def corr_chunk_saved(s: TrackShape, n: int, k: Kernels) -> int:
    """`corr_saved` for one chunk of n images: what its recompute holds in backward."""
    return corr_saved(TrackShape(**{**s.__dict__, "scenes": 1, "frames": n}), k) if n else 0


def update_former_saved(s: TrackShape, k: Kernels) -> int:
    """`EfficientUpdateFormer.forward` for R = B N S track tokens and B V S virtual ones (bf16 linears):

    input_norm over D = 3C + 4 (its input is the bf16 cast of the fp32 concatenation) and
    input_transform's input (R D); `depth` time blocks over the B (N + V) sequences of S frames
    (`attn_block_saved`); after each, a space layer over the B S frames: virtual tracks reading the
    points (`cross_block_saved`), attending among themselves, and the points reading them (whose
    query-side norm input is a view of the space tensor already saved by the first); output_norm of the
    track tokens (R x Hd; fp32 on CUDA, as the blocks' residual stream) and flow_head's input (R Hd bf16).
    """
    B, S, N, V, Hd, D = s.scenes, s.frames, s.points, s.virtual, s.hidden, s.transformer_dim
    R = B * N * S
    total = norm_saved(R, D, BF16, k) + R * D * BF16
    for _ in range(s.depth):
        total += attn_block_saved(B * (N + V), S, s, k)
        total += cross_block_saved(B * S, V, N, s, k)
        total += attn_block_saved(B * S, V, s, k)
        total += cross_block_saved(B * S, N, V, s, k) - norm_input(B * S * N, Hd, BF16, k)
    residual = norm_out_bytes(BF16, k)
    return total + norm_saved(R, Hd, residual, k) + R * Hd * BF16


def attn_block_saved(batch: int, seq: int, s: TrackShape, k: Kernels) -> int:
    """`AttnBlock` (nn.MultiheadAttention) over batch sequences of seq tokens, u = tokens x Hd bf16:
    norm1 and norm2 (`norm_saved`), in_proj's input (u), the packed q/k/v copy SDPA saves (3u), the SDPA
    output (u; out_proj reads it without a copy) and logsumexp (batch x heads x seq fp32), fc1's input
    (u), GELU's input and fc2's input (4u each)."""
    T, Hd = batch * seq, s.hidden
    u = T * Hd * BF16
    return 2 * norm_saved(T, Hd, BF16, k) + 14 * u + batch * s.heads * k.lse_len(seq, BF16) * FP32


def cross_block_saved(batch: int, q_len: int, ctx_len: int, s: TrackShape, k: Kernels) -> int:
    """`CrossAttnBlock`: norm1, norm_context and norm2; the q projection's input and output (2 uq), the
    k/v projection's input (uc) and packed k/v copy (2 uc), the SDPA output (uq) and logsumexp, fc1's
    input (uq), GELU's and fc2's inputs (4 uq each)."""
    Tq, Tc, Hd = batch * q_len, batch * ctx_len, s.hidden
    uq, uc = Tq * Hd * BF16, Tc * Hd * BF16
    norms = 2 * norm_saved(Tq, Hd, BF16, k) + norm_saved(Tc, Hd, BF16, k)
    return norms + 12 * uq + 3 * uc + batch * s.heads * k.lse_len(q_len, BF16) * FP32


def update_saved(s: TrackShape, k: Kernels) -> int:
    """`Tracker._update` (one iteration, without recompute): corr_mlp (fc1's input R x L W2 bf16, GELU's
    and fc2's inputs R x Hd), the update transformer (`update_former_saved`), ffeat_norm, a GroupNorm over
    the C feature deltas (a contiguous copy of the R x C slice of the transformer's output, fp32 on CUDA,
    its statistics and, on CUDA, an fp32 copy of its weight: GroupNorm's backward does not need the
    bias), ffeat_updater's Linear and GELU inputs (R C bf16 each)."""
    B, S, N, C, Hd = s.scenes, s.frames, s.points, s.features, s.hidden
    R = B * N * S
    total = R * s.levels * s.window * BF16 + 2 * R * Hd * BF16
    total += update_former_saved(s, k)
    total += norm_input(R, C, BF16, k) + 2 * R * norm_out_bytes(BF16, k) + (C * FP32 if _cuda(k) else 0)
    return total + 2 * R * C * BF16


def iteration_saved(s: TrackShape, k: Kernels, checkpointed: bool, first: bool) -> int:
    """One refinement iteration. Without recompute: `corr_saved` + `update_saved`. Checkpointed: the
    checkpoints' inputs: the correlation windows (B S N L W2; fp32 on the CPU, bf16 on CUDA), and from
    the second iteration on the new positions (B S N 2 fp32) and track features (B N S C fp32, plus the
    (B S, N, C) copy the lookup flattens when B > 1)."""
    if not checkpointed:
        return corr_saved(s, k) + update_saved(s, k)
    B, S, N, C = s.scenes, s.frames, s.points, s.features
    e_corr = BF16 if _cuda(k) else FP32
    total = B * S * N * s.levels * s.window * e_corr
    if not first:
        total += B * S * N * 2 * FP32 + B * S * N * C * FP32 * (2 if B > 1 else 1)
    return total


def tracker_saved(s: TrackShape, k: Kernels, checkpointed: bool) -> int:
    """The whole tracker: `tracker_once_saved` + every iteration."""
    return tracker_once_saved(s, k, checkpointed) + sum(
        iteration_saved(s, k, checkpointed, first=i == 0) for i in range(s.iters))


def features_saved(s: TrackShape, k: Kernels, checkpointed: bool) -> int:
    """The feature extractor over all chunks; checkpointed, only the chunk inputs (kept-layer views)."""
    return 0 if checkpointed else sum(features_chunk_saved(s, n, k) for n in s.chunks())


# ------------------------------------------------------------------------------------ FLOPs
# By kind, as torch.utils.flop_counter counts them (2 per multiply-add; attention as its two matmuls),
# for the step-time model: what the head runs forward, and what chunk recompute runs again in backward.
def features_forward_flops(s: TrackShape, n: int) -> dict[str, int]:
    """The feature extractor over n images: all convolutions (projections, resizes, the fusion's
    residual units and 1x1 out_convs, output_conv1)."""
    P, D, F = s.ph * s.pw, s.dim_in, s.features
    c1, c2, c3, c4 = s.out_channels
    a1, a2, a3 = 16 * P, 4 * P, P
    a4 = math.ceil(s.ph / 2) * math.ceil(s.pw / 2)
    macs = P * D * (c1 + c2 + c3 + c4)  # 1x1 projections
    macs += c1 * c1 * a1 + c2 * c2 * a2 + c4 * c4 * 9 * a4  # transposed x4, x2 (one tap an output), 3x3 stride 2
    macs += 9 * F * (c1 * a1 + c2 * a2 + c3 * a3 + c4 * a4)  # layer{i}_rn
    macs += 2 * 9 * F * F * (a4 + 2 * a3 + 2 * a2 + 2 * a1)  # residual units: refinenet4 one, the others two
    macs += F * F * (a3 + a2 + a1 + 4 * a1)  # each fusion's 1x1 out_conv after its upsampling
    macs += 9 * F * F * 4 * a1  # output_conv1
    return {"convolution": 2 * n * macs}


def corr_forward_flops(s: TrackShape) -> dict[str, int]:
    """One iteration's correlation volumes: a (N x C) by (C x a_l) product per image and level."""
    return {"matmul": 2 * s.images * s.points * s.features * sum(s.level_areas())}


def update_forward_flops(s: TrackShape) -> dict[str, int]:
    """One iteration's `Tracker._update`: corr_mlp, the update transformer (input transform, time blocks
    over S frames per track, space layers over N + V tracks per frame, flow head), ffeat_updater."""
    B, S, N, V, C, Hd = s.scenes, s.frames, s.points, s.virtual, s.features, s.hidden
    R, T_all = B * N * S, B * (N + V) * S
    BS = B * S
    macs = R * (s.levels * s.window * Hd + Hd * C)  # corr_mlp
    macs += R * s.transformer_dim * Hd + R * Hd * (C + 2) + R * C * C  # input transform, flow head, ffeat
    attn_macs = 0
    for _ in range(s.depth):
        macs += 12 * T_all * Hd * Hd  # time block: qkv, out, MLP (4x)
        attn_macs += 2 * B * (N + V) * S * S * Hd
        macs += Hd * Hd * (10 * BS * V + 2 * BS * N) + 12 * BS * V * Hd * Hd + Hd * Hd * (10 * BS * N + 2 * BS * V)
        attn_macs += 2 * BS * V * N * Hd + 2 * BS * V * V * Hd + 2 * BS * N * V * Hd
    return {"matmul": 2 * macs, "attention": 2 * attn_macs}


def _add(*parts: dict[str, int], times: int = 1) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        for kind, value in part.items():
            out[kind] = out.get(kind, 0) + value * times
    return out


def forward_flops(s: TrackShape) -> dict[str, int]:
    """The head's forward: the feature extractor, every iteration, the visibility/confidence linears."""
    heads = 2 if s.predict_conf else 1
    iteration = _add(corr_forward_flops(s), update_forward_flops(s))
    return _add(features_forward_flops(s, s.images), _add(iteration, times=s.iters),
                {"matmul": 2 * heads * s.images * s.points * s.features})


def recompute_flops(s: TrackShape, checkpointed: bool) -> dict[str, int]:
    """What chunk recompute runs again in backward: the feature extractor once, each iteration's update
    and correlation volumes once (nothing without recompute)."""
    if not checkpointed:
        return {}
    iteration = _add(corr_forward_flops(s), update_forward_flops(s))
    return _add(features_forward_flops(s, s.images), _add(iteration, times=s.iters))
