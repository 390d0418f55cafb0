"""What context parallelism (parallel.context_parallel = N) adds to one GPU's plan and step.

A rank holds S/N frames of each scene through every frame-wise part, so the planner plans the local
batch (scenes x S/N frames) with the usual terms. On top of them (parallel/context.py says why each
exists):
- the whole-scene dense outputs every rank gathers for the loss (alive until backward ends), and the
  other ranks' frames of the ground truth, which the group gathers for the loss (data/split_scenes.py;
  a rank loads only its own frames, images included);
- the exchange buffers of one global attention: the send and receive copies of q, k, v and of the
  attention output (transient, one block at a time);
- the all-to-all time: 4 exchanges a global block forward, 4 in backward, 4 more where the block (or its
  attention) is recomputed. Each moves (N-1)/N of a (tokens x C) tensor off the GPU over the node's
  GPU links; the link speeds below are datasheet figures per direction, an estimate, not a measurement.
"""
from __future__ import annotations

from vggt_fsdp.model.config import VGGTConfig

# Per-direction GPU-to-GPU bandwidth inside a node (datasheets: NVLink 3 on A100 600 GB/s and NVLink 4 on
# H100/H200 900 GB/s, both directions together); other cards: PCIe 4.0 x16, ~25 GB/s a direction.
LINK_BYTES_PER_S = {"a100": 300e9, "h100": 450e9, "h200": 450e9}
PCIE_BYTES_PER_S = 25e9
EXCHANGE_LATENCY_S = 30e-6  # per all-to-all (an estimate)
EXCHANGES = {"none": 8}  # per global block and step; a recomputed block or attention exchanges 4 more


# The ground truth a frame's pixel carries in a batch: depth (fp32), world and camera points (3 x fp32
# each) and the valid-point mask (bool). (A one-process plan leaves its own batch's ground truth out, as
# the plans always have: a share of the activations' size.)
GROUND_TRUTH_BYTES_PER_PIXEL = 4 + 12 + 12 + 1


def exchanged_qkv_delta(qk_norm: bool) -> int:
    """Units (tokens x C x e) a global block without checkpointing saves beyond formulas.attention_saved
    at the local shape. SDPA saves the exchanged q, k, v, all fresh tensors, where one process saves v as a
    view of the qkv output: with qk-norm (whose LayerNorm saves the qkv output anyway) one unit more;
    without it the qkv output is no longer kept by v, and RoPE's fresh q, k are exchanged: two fewer."""
    return 1 if qk_norm else -2


def exchange_buffer_bytes(scenes: int, local_frames: int, tokens_per_frame: int, dim: int, elem: int) -> int:
    """Send and receive copies of q, k, v and of the attention output for one global attention."""
    return 2 * 4 * scenes * local_frames * tokens_per_frame * dim * elem


def gathered_output_bytes(model_cfg: VGGTConfig, scenes: int, frames: int, size: int, hw: int) -> int:
    """The whole-scene dense outputs beyond this rank's own share (the local ones are planned already)."""
    dense = (2 if model_cfg.enable_depth else 0) + (4 if model_cfg.enable_point else 0)
    return scenes * frames * (size - 1) // size * dense * hw * 4


def link_bytes_per_s(card_name: str) -> float:
    name = card_name.lower()
    return next((rate for key, rate in LINK_BYTES_PER_S.items() if key in name), PCIE_BYTES_PER_S)


def exchange_seconds(model_cfg: VGGTConfig, global_policy: str, batch, size: int, param_dtype: str,
                     card_name: str) -> float:
    """All-to-all time of one training step (forward, backward, recompute) on one rank whose `batch`
    (memory.planner.Batch) is its share, the global blocks checkpointed as `global_policy` (a policy
    label): an estimate that assumes no overlap with compute (Ulysses' exchanges sit between a block's
    matmuls)."""
    if size == 1:
        return 0.0
    agg = model_cfg.aggregator
    elem = 4 if param_dtype == "fp32" else 2
    tokens = batch.scenes * batch.frames * (batch.patches + 1 + agg.num_register_tokens)
    moved = tokens * agg.embed_dim * elem * (size - 1) / size
    calls = agg.depth * EXCHANGES.get(global_policy, 12)
    return calls * (moved / link_bytes_per_s(card_name) + EXCHANGE_LATENCY_S)
