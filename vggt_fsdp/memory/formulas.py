"""Bytes each part of VGGT saves for backward, as closed formulas over shapes.

Every function mirrors one forward method of `vggt_fsdp.model`; its docstring lists the tensors that
method leaves saved for backward (what autograd keeps, charged once per storage, parameters excluded),
so a reader can check a term line by line against the model code. Units:

    e     bytes of an element in the module's compute dtype (bf16: 2, fp32: 4)
    T     tokens through a transformer block (batch x sequence)
    C     block width; h heads; d = C / h
    n     images in a DPT chunk (scenes x frames of the chunk)

Device facts (`Kernels`) cover what differs between the CPU and CUDA kernels: the dtype of LayerNorm
statistics, whether SDPA's output needs a copy before `proj`, the length of SDPA's logsumexp, and what
bf16 autocast adds (`parallel.precision.autocast`: on CUDA it runs LayerNorm in fp32).
Only sizes appear here; `planner.py` turns them into a memory plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from vggt_fsdp.parallel.config import parse_policy_label

DeviceKind = Literal["cpu", "cuda"]
# A block's checkpoint policy as the parallel plan labels it: none | attention | block |
# selective(S), S the saved tensors joined by "+" (parallel.config.policy_label, e.g. selective(sdpa+qkv)).
BlockPolicy = str

FP32 = 4


@dataclass(frozen=True)
class Kernels:
    """What the planner must know about the kernels of one device kind."""

    kind: DeviceKind
    # The bf16 forward runs under autocast (parallel.precision.autocast). It changes saved bytes on CUDA
    # only: CUDA autocast runs LayerNorm in fp32, so each LayerNorm of a bf16 block saves an fp32 copy of
    # its input, weight and bias and returns fp32; CPU autocast leaves LayerNorm in its input's dtype
    # (checked on the CPU with memory/cuda_autocast.py, tests/test_precision.py). fp32 units run with
    # autocast off: nothing changes for e = 4.
    autocast: bool = False

    def fp32_norms(self, e: int) -> bool:
        """True when a LayerNorm of a block computing in `e`-byte elements runs in fp32 (CUDA autocast)."""
        return self.kind == "cuda" and self.autocast and e < FP32

    def norm_input(self, e: int) -> int:
        """Bytes of one element of the input a LayerNorm saves: autocast's fp32 copy, or the input itself."""
        return FP32 if self.fp32_norms(e) else e

    def norm_param_copies(self, dim: int, e: int) -> int:
        """Autocast's fp32 copies of a LayerNorm's weight and bias, saved for its backward."""
        return 2 * dim * FP32 if self.fp32_norms(e) else 0

    def ln_stats(self, e: int) -> int:
        """Bytes of one LayerNorm mean (or rstd) element: CUDA keeps fp32 statistics for every input
        dtype; the CPU kernel keeps them in the input's dtype."""
        return FP32 if self.kind == "cuda" else e

    def attn_out_copy(self, fresh_qk: bool, e: int) -> int:
        """1 when `x.transpose(1, 2).reshape(B, N, C)` after SDPA copies the output. Flash kernels (CPU;
        CUDA for bf16/fp16) allocate the output with the query's memory layout: a query that is a view of
        the qkv projection is (B, N, h, d) in memory, so the reshape is a view; a query made fresh by
        qk-norm or RoPE is (B, h, N, d), so it copies. CUDA's memory-efficient kernel (fp32) always writes
        (B, N, h, d)."""
        if self.kind == "cuda" and e == FP32:
            return 0
        return 1 if fresh_qk else 0

    def lse_len(self, seq: int, e: int) -> int:
        """Length of SDPA's saved logsumexp per (batch, head): flash kernels (CPU; CUDA bf16/fp16) keep
        one fp32 value per query; CUDA's memory-efficient kernel (used for fp32) pads it to 32."""
        if self.kind == "cuda" and e == FP32:
            return 32 * math.ceil(seq / 32)
        return seq


# ------------------------------------------------------------------------------------ transformer blocks
@dataclass(frozen=True)
class BlockShape:
    """One `layers.Block` call: `batch` sequences of `seq` tokens, width `dim`."""

    batch: int
    seq: int
    dim: int
    heads: int
    e: int  # element bytes of the compute dtype
    qk_norm: bool
    rope_len: int  # positions RoPE is evaluated at (its tables have batch 1); 0 without RoPE
    layerscale: bool

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def unit(self) -> int:
        """T * C * e: one (tokens, width) activation."""
        return self.tokens * self.dim * self.e


def attention_saved(s: BlockShape, k: Kernels) -> int:
    """`Attention.forward` (without its input, which the caller's norm1 output is):

    qkv Linear output (3 units; q, k, v are views of it, and v, or q and k without qk-norm/RoPE, are saved
    by SDPA); with qk-norm the LayerNorm mean+rstd of q and of k (4 * T * h stats), and under CUDA
    autocast the fp32 copies of q and k (and of the norms' weights) those LayerNorms save; with qk-norm
    or RoPE new q and k (2 units) saved by SDPA (RoPE's tables: `rope_tables_saved`);
    SDPA output (1 unit) and logsumexp (B * h * lse_len fp32);
    the output's copy before `proj` where the layout needs one (`Kernels.attn_out_copy`), which `proj`
    saves as its input (otherwise `proj` saves a view of the SDPA output).
    """
    total = 3 * s.unit
    if s.qk_norm:
        total += 4 * s.tokens * s.heads * k.ln_stats(s.e)
        if k.fp32_norms(s.e):
            total += 2 * s.tokens * s.dim * FP32 + 2 * k.norm_param_copies(s.dim // s.heads, s.e)
    if s.qk_norm or s.rope_len:
        total += 2 * s.unit
    total += s.unit  # SDPA output
    total += s.batch * s.heads * k.lse_len(s.seq, s.e) * FP32
    total += k.attn_out_copy(s.qk_norm or bool(s.rope_len), s.e) * s.unit
    return total


def rope_q_bytes(s: BlockShape, k: Kernels) -> int:
    """Element bytes of q where RoPE rotates it: fp32 in an fp32 block, or after qk-norm under CUDA
    autocast (its LayerNorm returns fp32); otherwise the block's dtype."""
    return FP32 if s.e == FP32 or (s.qk_norm and k.fp32_norms(s.e)) else s.e


def rope_tables_saved(s: BlockShape, k: Kernels | None = None) -> int:
    """`RotaryPositionEmbedding2D.tables`: cos and sin for rows and columns, (1, 1, rope_len, d/2) each, in
    q's dtype (`rope_q_bytes`; None: the block's dtype). The fp32 tables are gathered once per positions
    tensor and shared by every block that receives it (`rope_tables_shared`); a lower-precision q makes
    each block cast, and save, its own copy. Saved by blocks that keep their attention activations."""
    e = s.e if k is None else rope_q_bytes(s, k)
    return 4 * s.rope_len * (s.dim // s.heads // 2) * e


def rope_tables_shared(s: BlockShape, k: Kernels) -> bool:
    """True when every block saves the same fp32 tables (one set in all); False: one copy per block."""
    return rope_q_bytes(s, k) == FP32


def block_saved(s: BlockShape, k: Kernels, policy: BlockPolicy) -> int:
    """`Block.forward` under a checkpoint policy (the block's input x is charged to the block).

    none:      x (saved by norm1), norm1 mean+rstd, norm1 output (qkv's input), attention (above),
               attention output (saved by ls1's multiply), x1 = x + ls1(..) (norm2's input), norm2
               mean+rstd, norm2 output (fc1's input), fc1 output (4 units, GELU's input), GELU output
               (4 units, fc2's input), fc2 output (ls2's input). Without LayerScale the two outputs
               that only ls1/ls2 save are not kept. Under CUDA autocast norm1 and norm2 save fp32 copies
               of x and x1 (and of their weights) instead, and return fp32, which qkv and fc1 cast back
               to bf16 (the copies they save).
    attention: the same with `attention_saved` replaced by nothing: the checkpoint keeps the attention
               input (norm1's output: fp32 under CUDA autocast, as norm1 returned it).
    block:     x only (the checkpoint's saved input).
    selective: x and what the SAC cache keeps (`selective_saved`).
    """
    if policy == "block":
        return s.unit
    if policy.startswith("selective"):
        return selective_saved(s, k, parse_policy_label(policy)[1])
    T, C = s.tokens, s.dim
    stats = 2 * T * k.ln_stats(s.e)
    ls = 1 if s.layerscale else 0
    norms = 2 * (T * C * k.norm_input(s.e) + stats + k.norm_param_copies(C, s.e))  # x, x1 and their norms
    n1 = T * C * k.norm_input(s.e) if policy == "attention" else s.unit  # as the checkpoint or qkv saves it
    kept = norms + n1 + s.unit * (ls + 1 + 4 + 4 + ls)  # + ls1 in, n2, fc1, gelu, ls2 in
    if policy == "attention":
        return kept
    if policy != "none":
        raise ValueError(f"block policy {policy!r}; valid choices: none, attention, block, selective(...)")
    return kept + attention_saved(s, k)


def selective_saved(s: BlockShape, k: Kernels, save: tuple[str, ...]) -> int:
    """A selective block (parallel/checkpointing.py): x (the checkpoint's saved input), plus per name in
    `save` the outputs of the ops its SAC policy marks MUST_SAVE:

    sdpa: the fused SDPA op's outputs: the attention output (1 unit) and logsumexp (B * h * lse_len
          fp32); 2 C e + 4 h bytes per token (VGGT-1B, bf16: 2,112 B). CUDA's flash and cuDNN kernels
          also return RNG seed and offset scalars (16 B a block), not counted.
    qkv:  the output of the matmuls before SDPA, the qkv projection (3 units; 6 C e per token, VGGT-1B
          bf16: 6,144 B).
    """
    unknown = set(save) - {"sdpa", "qkv"}
    if unknown or not save:
        raise ValueError(f"selective save set {tuple(save)}; valid names: sdpa, qkv")
    total = s.unit
    if "sdpa" in save:
        total += s.unit + s.batch * s.heads * k.lse_len(s.seq, s.e) * FP32
    if "qkv" in save:
        total += 3 * s.unit
    return total


def block_recompute(s: BlockShape, k: Kernels, policy: BlockPolicy) -> int:
    """What backward re-materialises for one checkpointed block before its gradients are computed."""
    if policy == "none":
        return 0
    if policy == "attention":
        return attention_saved(s, k)
    # block: everything but the input; selective: everything but the input and the cached outputs.
    return block_saved(s, k, "none") - block_saved(s, k, policy)


def block_forward_flops(s: BlockShape) -> dict[str, int]:
    """FLOPs of one `Block.forward` by kind (2 per multiply-add, as torch.utils.flop_counter counts):
    matmul: qkv (3C), proj (C), fc1 (4C), fc2 (4C wide) over T tokens of C: 24 T C^2;
    attention: q k^T and the weighted sum of v per sequence: 4 B N^2 C."""
    return {"matmul": 24 * s.tokens * s.dim * s.dim, "attention": 4 * s.batch * s.seq * s.seq * s.dim}


def block_recompute_flops(s: BlockShape, policy: BlockPolicy) -> dict[str, int]:
    """FLOPs backward re-runs for one block under `policy` (the forward recompute only), by kind:

    none: nothing. block: the whole forward (`block_forward_flops`). attention: the attention
    sub-module: the qkv and proj matmuls (8 T C^2) and attention. selective: the whole forward except
    the cached ops: no attention with sdpa saved, no qkv matmul (6 T C^2) with qkv saved.
    """
    full = block_forward_flops(s)
    if policy == "none":
        return {"matmul": 0, "attention": 0}
    if policy == "block":
        return full
    if policy == "attention":
        return {"matmul": 8 * s.tokens * s.dim * s.dim, "attention": full["attention"]}
    save = parse_policy_label(policy)[1]
    return {"matmul": full["matmul"] - (6 * s.tokens * s.dim * s.dim if "qkv" in save else 0),
            "attention": 0 if "sdpa" in save else full["attention"]}


def block_backward_work(s: BlockShape) -> int:
    """Gradient temporaries at a block's widest point: the MLP's hidden gradient (4 units) and GELU's
    input gradient (4 units) coexist, plus the gradient of the block's output and input (2 units)."""
    return 10 * s.unit


# ------------------------------------------------------------------------------------ DPT head
@dataclass(frozen=True)
class DPTShape:
    """One DPT head call over `n` images of a `ph` x `pw` patch grid (fp32 head)."""

    n: int
    ph: int
    pw: int
    patch: int
    dim_in: int
    out_channels: tuple[int, int, int, int]
    features: int
    output_dim: int  # 2 depth, 4 point
    activation: str
    pos_embed: bool
    token_copy: bool  # the chunk's token slice is copied by reshape (scenes > 1 and several chunks)


def dpt_chunk_saved(s: DPTShape) -> int:
    """`DPTHead._forward_chunk` for n images (fp32, 4 bytes an element; P = ph * pw patches, D = dim_in).

    Per stage i (4): the reshaped tokens when the slice is not a view (n P D, norm's input), norm
    mean+rstd (2 n P), norm output (n P D, the 1x1 `projects[i]` conv's input), the projected map with
    the UV embedding added (n oc_i P; `resize_layers[i]`'s input), the resized map (`layer{i}_rn`'s
    input; the identity stage 3 is its own input) at 4x, 2x, 1x and stride-2 resolution.
    Fusion (`scratch`), F = features, A_i the area of stage i: each ResidualConvUnit saves relu(x) and
    relu(conv1(.)) (2 F A); refinenet4 has one unit, refinenet1..3 two; each fusion block's out_conv
    saves its upsampled input (F x the next area, refinenet1: 4 A_1). output_conv1 saves refinenet1's
    output (F x 4 A_1). At full resolution H W (= 14 ph x 14 pw): the UV-embedded output_conv1 map
    (F/2 H W, output_conv2[0]'s input), ReLU's result (32 H W), and the activations of the output:
    depth `exp`: values and confidence exp results (2 H W); point `inv_log`: the raw output (4 H W,
    abs's input), sign and expm1 results (3 + 3 H W) and the confidence exp result (H W).
    """
    n, P, D, F = s.n, s.ph * s.pw, s.dim_in, s.features
    c1, c2, c3, c4 = s.out_channels
    a1 = (4 * s.ph) * (4 * s.pw)
    a2 = (2 * s.ph) * (2 * s.pw)
    a3 = P
    a4 = math.ceil(s.ph / 2) * math.ceil(s.pw / 2)
    elems = 0
    for oc, area in ((c1, a1), (c2, a2), (c3, None), (c4, a4)):
        elems += (P * D if s.token_copy else 0) + 2 * P + P * D + oc * P
        if area is not None:
            elems += oc * area
    elems += 2 * F * a4 + F * a3  # refinenet4: one unit, out_conv input at A_3
    elems += 4 * F * a3 + F * a2  # refinenet3
    elems += 4 * F * a2 + F * a1  # refinenet2
    elems += 4 * F * a1 + F * 4 * a1  # refinenet1 (upsampled x2)
    elems += F * 4 * a1  # output_conv1's input (refinenet1's output)
    hw = (s.ph * s.patch) * (s.pw * s.patch)
    elems += (F // 2) * hw + 32 * hw
    elems += _dpt_output_elems(s.activation, s.output_dim) * hw
    return n * elems * FP32


def _dpt_output_elems(activation: str, output_dim: int) -> int:
    """Per-pixel elements the value/confidence activations save (see `heads/head_act.py`)."""
    values = output_dim - 1
    if activation == "exp":
        return values + 1  # exp results of values and confidence
    if activation == "inv_log":
        return output_dim + 2 * values + 1  # raw output (abs input), sign, expm1, confidence exp
    raise ValueError(f"the planner models DPT activations 'exp' and 'inv_log', not {activation!r}")


def dpt_chunk_backward_work(s: DPTShape) -> int:
    """Gradient temporaries of one chunk at its widest point: at full resolution the gradients of the
    F/2-channel UV-embedded map and of its bilinear source coexist with output_conv2's (F/2 + F/2 + 32
    per pixel, fp32)."""
    hw = (s.ph * s.patch) * (s.pw * s.patch)
    return s.n * (s.features + 32) * hw * FP32


# ------------------------------------------------------------------------------------ camera head
@dataclass(frozen=True)
class CameraShape:
    batch: int  # scenes
    frames: int
    dim: int  # 2C
    heads: int
    trunk_depth: int
    iterations: int
    target_dim: int


def camera_head_saved(s: CameraShape, k: Kernels, trunk_policies: tuple[BlockPolicy, ...]) -> int:
    """`CameraHead.forward` (fp32) on the last layer's camera tokens, M = batch * frames tokens of D.

    token_norm: mean+rstd (its input is a view of the kept last layer, counted there) and its output
    pose_tokens (M D, adaln_norm's input); adaln_norm mean+rstd and output (M D, reused every iteration).
    Per iteration: embed_pose input (the detached previous prediction, M x 9; the first iteration reads
    a view of a parameter), SiLU input and output (2 M D), the modulation output (3 M D; `gate` is a
    view of it), 1 + scale (M D), the modulated tokens (M D), the trunk blocks (`block_saved`, batch
    = scenes, seq = frames), trunk_norm input, mean+rstd and output (2 M D), pose_branch fc1 output and
    GELU output (2 M D/2), the relu'd focal part (M x 2). `trunk_policies`: one per trunk block.
    """
    if len(trunk_policies) != s.trunk_depth:
        raise ValueError(f"{len(trunk_policies)} trunk policies for a trunk of {s.trunk_depth} blocks")
    M, D = s.batch * s.frames, s.dim
    stats = 2 * M * k.ln_stats(FP32)
    once = 2 * stats + 2 * M * D * FP32
    block = BlockShape(s.batch, s.frames, D, s.heads, FP32, qk_norm=False, rope_len=0, layerscale=True)
    per_iter = (
        M * 9  # embed_pose input
        + 2 * M * D  # SiLU input and output
        + 3 * M * D  # modulation output (shift, scale, gate views)
        + 2 * M * D  # 1 + scale, modulated tokens
        + 2 * M * D  # trunk_norm input and output
        + M * D  # pose_branch fc1 and GELU outputs (D/2 each)
        + M * (s.target_dim - 7)  # relu'd focal part
    ) * FP32 + stats + sum(block_saved(block, k, policy) for policy in trunk_policies)
    first_iter_discount = M * 9 * FP32  # the first embed_pose input is a view of a parameter
    return once + s.iterations * per_iter - first_iter_discount
