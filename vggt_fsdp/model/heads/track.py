"""Track head: a feature-only DPT head and an iterative CoTracker-style point tracker.

Follows the reference implementation (vggt/heads/track_head.py and track_modules/
base_track_predictor.py), parameter names included. The tracker starts every track at its query
point in all frames and refines positions and per-track features `iters` times: each iteration looks
up windowed correlations around the current positions, embeds the displacement from the query, and
lets the EfficientUpdateFormer predict updates. The first frame's position stays the query point.

Precision: the track head follows the surrounding autocast (upstream runs it under bf16 autocast).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..layers import Mlp
from .dpt import DPTHead
from .track_blocks import EfficientUpdateFormer
from .track_corr import CorrelationLookup, feature_pyramid, sample_features4d
from .track_embed import displacement_embedding, grid_sincos_embedding


class Tracker(nn.Module):
    """Upstream's BaseTrackerPredictor: query points (B, N, 2) + feature maps (B, S, C, h, w) -> tracks.

    With `checkpoint_chunks` (set by the checkpointing policy, `parallel.checkpoint.heads: chunks`) each
    refinement iteration keeps only its inputs (track features, positions, the correlation windows) and
    recomputes its update transformer in backward, and the correlation volumes are recomputed per chunk
    of frames (`CorrelationLookup`); the results are those of the plain forward.
    """

    def __init__(self, stride: int = 1, corr_levels: int = 5, corr_radius: int = 4, latent_dim: int = 128,
                 hidden_size: int = 384, use_spaceatt: bool = True, depth: int = 6, max_scale: int = 518,
                 predict_conf: bool = True, frames_chunk_size: int | None = None) -> None:
        super().__init__()
        if latent_dim % 4:
            raise ValueError(f"tracker latent_dim={latent_dim} must be a multiple of 4 (its sin-cos embeddings)")
        self.stride = stride
        self.latent_dim = latent_dim
        self.corr_levels = corr_levels
        self.corr_radius = corr_radius
        self.max_scale = max_scale
        self.predict_conf = predict_conf
        self.checkpoint_chunks = False
        # Input of the update transformer: displacement embedding (latent + 4), correlations, track feature.
        self.transformer_dim = 3 * latent_dim + 4

        self.corr = CorrelationLookup(corr_radius, frames_chunk_size)
        self.corr_mlp = Mlp(corr_levels * (2 * corr_radius + 1) ** 2, hidden_size, latent_dim)
        # Row 0 marks the query frame, row 1 every other frame.
        self.query_ref_token = nn.Parameter(torch.randn(1, 2, self.transformer_dim))
        self.updateformer = EfficientUpdateFormer(
            space_depth=depth if use_spaceatt else 0, time_depth=depth, input_dim=self.transformer_dim,
            hidden_size=hidden_size, output_dim=latent_dim + 2, mlp_ratio=4.0, add_space_attn=use_spaceatt)
        self.fmap_norm = nn.LayerNorm(latent_dim)
        self.ffeat_norm = nn.GroupNorm(1, latent_dim)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent_dim, 1))
        if predict_conf:
            self.conf_predictor = nn.Sequential(nn.Linear(latent_dim, 1))

    def forward(self, query_points: Tensor, fmaps: Tensor, iters: int = 6,
                apply_sigmoid: bool = True) -> tuple[list[Tensor], Tensor, Tensor | None]:
        """Returns (tracks of every iteration, each (B, S, N, 2) in image pixels; visibility (B, S, N);
        confidence (B, S, N) or None): probabilities, or logits with `apply_sigmoid=False` (for losses)."""
        batch, num_points, _ = query_points.shape
        frames, height, width = fmaps.shape[1], fmaps.shape[3], fmaps.shape[4]
        fmaps = self.fmap_norm(fmaps.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
        pyramid = feature_pyramid(fmaps, self.corr_levels)

        # Work in feature-map pixels; every frame starts at the query position.
        queries = query_points / float(self.stride)
        coords = queries.reshape(batch, 1, num_points, 2).repeat(1, frames, 1, 1)
        track_feats = sample_features4d(fmaps[:, 0], queries).unsqueeze(1).repeat(1, frames, 1, 1)  # B,S,N,C

        # Constant over iterations (upstream recomputes them each time): the query's grid embedding and
        # the query-frame / other-frame marker.
        grid_embed = grid_sincos_embedding(self.transformer_dim, height, width, device=fmaps.device)
        query_embed = sample_features4d(grid_embed.expand(batch, -1, -1, -1), queries)
        query_embed = query_embed.reshape(batch * num_points, 1, self.transformer_dim)
        ref_token = torch.cat(
            [self.query_ref_token[:, 0:1], self.query_ref_token[:, 1:2].expand(-1, frames - 1, -1)], dim=1)

        recompute = self.checkpoint_chunks and torch.is_grad_enabled()
        coord_preds = []
        for _ in range(iters):
            coords = coords.detach()  # as upstream: no gradient through earlier iterations' positions
            corrs = self.corr(pyramid, track_feats, coords, checkpoint=recompute)  # B,S,N,L
            step = (track_feats, coords, corrs, queries, query_embed, ref_token)
            if recompute:
                track_feats, coords = checkpoint(self._update, *step, use_reentrant=False)
            else:
                track_feats, coords = self._update(*step)
            coord_preds.append(coords * self.stride)

        flat_feats = track_feats.reshape(batch * frames * num_points, self.latent_dim)
        vis = self.vis_predictor(flat_feats).reshape(batch, frames, num_points)
        conf = self.conf_predictor(flat_feats).reshape(batch, frames, num_points) if self.predict_conf else None
        if apply_sigmoid:
            vis = torch.sigmoid(vis)
            conf = torch.sigmoid(conf) if conf is not None else None
        return coord_preds, vis, conf

    def _update(self, track_feats: Tensor, coords: Tensor, corrs: Tensor, queries: Tensor, query_embed: Tensor,
                ref_token: Tensor) -> tuple[Tensor, Tensor]:
        """One refinement: the update transformer's position and feature deltas for every track and frame."""
        batch, frames, num_points, _ = coords.shape
        corrs = self.corr_mlp(corrs.permute(0, 2, 1, 3).reshape(batch * num_points, frames, -1))
        flows = (coords - coords[:, 0:1]).permute(0, 2, 1, 3).reshape(batch * num_points, frames, 2)
        flows_embed = torch.cat(
            [displacement_embedding(flows, self.latent_dim // 2), flows / self.max_scale, flows / self.max_scale],
            dim=-1)
        feats = track_feats.permute(0, 2, 1, 3).reshape(batch * num_points, frames, self.latent_dim)

        x = torch.cat([flows_embed, corrs, feats], dim=2) + query_embed
        x = x + ref_token.to(x.dtype)
        delta = self.updateformer(x.reshape(batch, num_points, frames, -1))
        delta = delta.reshape(batch * num_points * frames, -1)

        feats = feats.reshape(-1, self.latent_dim)
        feats = self.ffeat_updater(self.ffeat_norm(delta[:, 2:])) + feats
        track_feats = feats.reshape(batch, num_points, frames, self.latent_dim).permute(0, 2, 1, 3)
        coords = coords + delta[:, :2].reshape(batch, num_points, frames, 2).permute(0, 2, 1, 3)
        coords = torch.cat([queries.unsqueeze(1), coords[:, 1:]], dim=1)  # the query frame stays put
        return track_feats, coords


class TrackHead(nn.Module):
    """forward(aggregated_tokens_list, images, patch_start_idx, query_points (B, N, 2) in pixels (x, y),
    iters=None, apply_sigmoid=True) -> (list of tracks (B, S, N, 2) per iteration, vis (B, S, N),
    conf (B, S, N) or None); vis and conf are logits with apply_sigmoid=False.

    `checkpoint_chunks` (set by `parallel.checkpoint.heads: chunks`) switches on recompute in both parts:
    the feature extractor per chunk of frames (as the DPT heads) and the tracker per iteration and per
    chunk of frames of its correlation volumes.
    """

    # Precision contract (parallel/precision.py): like upstream's, the tracker mixes fp32 embeddings and
    # positions with bf16 features and relies on autocast; query points stay fp32 (not cast on entry).
    casts_own_inputs = True
    needs_autocast = True

    def __init__(self, dim_in: int, patch_size: int = 14, features: int = 128, iters: int = 4,
                 predict_conf: bool = True, stride: int = 2, corr_levels: int = 7, corr_radius: int = 4,
                 hidden_size: int = 384, out_channels: Sequence[int] = (256, 512, 1024, 1024),
                 intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23), frames_chunk_size: int | None = 8) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.iters = iters
        # Feature maps at half the image resolution, without position embedding (as upstream).
        self.feature_extractor = DPTHead(
            dim_in, patch_size=patch_size, features=features, out_channels=out_channels,
            intermediate_layer_idx=intermediate_layer_idx, pos_embed=False, feature_only=True, down_ratio=2,
            frames_chunk_size=frames_chunk_size)
        self.tracker = Tracker(latent_dim=features, predict_conf=predict_conf, stride=stride,
                               corr_levels=corr_levels, corr_radius=corr_radius, hidden_size=hidden_size,
                               frames_chunk_size=frames_chunk_size)

    @property
    def checkpoint_chunks(self) -> bool:
        return self.feature_extractor.checkpoint_chunks and self.tracker.checkpoint_chunks

    @checkpoint_chunks.setter
    def checkpoint_chunks(self, enabled: bool) -> None:
        self.feature_extractor.checkpoint_chunks = enabled
        self.tracker.checkpoint_chunks = enabled

    def forward(self, aggregated_tokens_list: Sequence[Tensor | None], images: Tensor, patch_start_idx: int,
                query_points: Tensor | None = None, iters: int | None = None, apply_sigmoid: bool = True):
        if query_points is None:
            raise ValueError("TrackHead needs query_points (B, N, 2) in pixels (x, y) of the first frame")
        feature_maps = self.feature_extractor(aggregated_tokens_list, images, patch_start_idx)
        return self.tracker(query_points, feature_maps, iters=self.iters if iters is None else iters,
                            apply_sigmoid=apply_sigmoid)
