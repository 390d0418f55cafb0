"""Camera head: iterative refinement of a pose encoding from the last layer's camera tokens.

Each of `num_iterations` steps embeds the previous (detached) prediction, or a learned empty pose
on the first step, turns it into adaLN shift/scale/gate for the camera tokens, runs the trunk of
transformer blocks and adds the predicted delta. Every step's activated encoding is returned.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import POSE_ENCODING_DIMS, CameraHeadConfig
from ..layers import Block, Mlp
from .head_act import activate_pose


class CameraHead(nn.Module):
    # Precision contract (parallel/precision.py): it casts only the camera tokens it reads.
    casts_own_inputs = True

    def __init__(self, dim_in: int, cfg: CameraHeadConfig):
        super().__init__()
        self.target_dim = POSE_ENCODING_DIMS[cfg.pose_encoding_type]
        self.num_iterations = cfg.num_iterations
        self.activations = {"trans_act": cfg.trans_act, "quat_act": cfg.quat_act, "fl_act": cfg.fl_act}
        self.trunk = nn.Sequential(
            *(Block(dim_in, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, init_values=cfg.init_values)
              for _ in range(cfg.trunk_depth))
        )
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, self.target_dim))
        self.embed_pose = nn.Linear(self.target_dim, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, self.target_dim)

    def init_special_parameters(self) -> None:
        nn.init.zeros_(self.empty_pose_tokens)

    def forward(self, aggregated_tokens_list: list[torch.Tensor | None], num_iterations: int | None = None,
                gather_frames=None) -> list[torch.Tensor]:
        """`gather_frames` (context parallelism): collects every rank's pose tokens, so the trunk's
        attention runs over the whole scene (on every rank of the group alike)."""
        tokens = aggregated_tokens_list[-1]
        if tokens is None:
            raise ValueError("the camera head reads the aggregator's last layer, which was not kept")
        # Cast only the camera tokens (B, S, 2C): a copy of the whole layer in fp32 would be wasted memory.
        pose_tokens = tokens[:, :, 0]
        if gather_frames is not None:
            pose_tokens = gather_frames(pose_tokens)
        pose_tokens = self.token_norm(pose_tokens.to(self.token_norm.weight.dtype))
        return self._refine(pose_tokens, num_iterations or self.num_iterations)

    def _refine(self, pose_tokens: torch.Tensor, num_iterations: int) -> list[torch.Tensor]:
        B, S, _ = pose_tokens.shape
        normed = self.adaln_norm(pose_tokens)
        pred = None
        preds = []
        for _ in range(num_iterations):
            if pred is None:
                cond = self.embed_pose(self.empty_pose_tokens.expand(B, S, -1))
            else:
                # No backpropagation through the previous iterations' predictions.
                pred = pred.detach()
                cond = self.embed_pose(pred)
            shift, scale, gate = self.poseLN_modulation(cond).chunk(3, dim=-1)
            x = gate * (normed * (1 + scale) + shift) + pose_tokens
            delta = self.pose_branch(self.trunk_norm(self.trunk(x)))
            pred = delta if pred is None else pred + delta
            preds.append(activate_pose(pred, **self.activations))
        return preds
