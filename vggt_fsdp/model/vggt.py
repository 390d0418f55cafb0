"""The assembled VGGT model: aggregator + camera / depth / point / track heads."""
from __future__ import annotations

import torch
from torch import nn

from .aggregator import Aggregator
from .config import VGGTConfig
from .heads.camera import CameraHead
from .heads.dpt import DPTHead
from .heads.track import TrackHead
from .layers import ContextHooks
from .init import init_special_parameters


def _build_track_head(cfg: VGGTConfig) -> nn.Module:
    dpt, track = cfg.dpt_head, cfg.track_head
    return TrackHead(
        cfg.token_dim,
        patch_size=cfg.aggregator.patch_size,
        features=track.features,
        iters=track.iters,
        predict_conf=track.predict_conf,
        stride=track.stride,
        corr_levels=track.corr_levels,
        corr_radius=track.corr_radius,
        hidden_size=track.hidden_size,
        out_channels=dpt.out_channels,
        intermediate_layer_idx=dpt.intermediate_layer_idx,
        frames_chunk_size=dpt.frames_chunk_size,
    )


def _build_dpt_head(cfg: VGGTConfig, output_dim: int, activation: str) -> DPTHead:
    dpt = cfg.dpt_head
    return DPTHead(
        cfg.token_dim,
        patch_size=cfg.aggregator.patch_size,
        output_dim=output_dim,
        activation=activation,
        conf_activation=dpt.conf_activation,
        features=dpt.features,
        out_channels=dpt.out_channels,
        intermediate_layer_idx=dpt.intermediate_layer_idx,
        pos_embed=dpt.pos_embed,
        frames_chunk_size=dpt.frames_chunk_size,
    )


def _at_least_fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    """Upcast bf16/fp16 to fp32; leave fp32 and fp64 (used by precision tests) alone."""
    if t is not None and t.is_floating_point() and torch.finfo(t.dtype).bits < 32:
        return t.float()
    return t


class VGGT(nn.Module):
    """forward(images (B, S, 3, H, W) or (S, 3, H, W) in [0, 1], query_points (B, N, 2) or (N, 2))."""

    # Precision contract (parallel/precision.py): images and query points stay fp32 on entry; the
    # aggregator casts the normalised images to its compute dtype, the heads read them in fp32.
    casts_own_inputs = True

    def __init__(self, config: VGGTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.aggregator = Aggregator(config.aggregator, config.patch_embed, kept_layers=config.kept_layers())
        # Attribute order = state-dict order of upstream (camera, point, depth, track).
        self.camera_head = CameraHead(config.token_dim, config.camera_head) if config.enable_camera else None
        self.point_head = _build_dpt_head(config, 4, config.dpt_head.point_activation) if config.enable_point else None
        self.depth_head = _build_dpt_head(config, 2, config.dpt_head.depth_activation) if config.enable_depth else None
        self.track_head = _build_track_head(config) if config.enable_track else None
        if not self.aggregator.camera_token.is_meta:
            init_special_parameters(self)  # on meta, materialize() does all init later

    def set_context(self, context: ContextHooks | None) -> None:
        """Split each scene's frames over a group of ranks (context parallelism) or not (None).

        `images` then hold this rank's frames; the aggregator exchanges tokens around global attention,
        the camera head's trunk runs over every rank's pose tokens, and every prediction is gathered to
        the whole scene, so outputs (and the loss on them) are those of one process holding the scene.
        The track head reads frame 0's features for every frame and is refused.
        """
        if context is not None and self.track_head is not None:
            raise ValueError("context parallelism does not support the track head (its correlation reads "
                             "the first frame's feature maps in every frame, held by one rank): disable "
                             "model.heads.track or set parallel.context_parallel=1")
        self.__dict__["context"] = context
        self.aggregator.set_context(context)

    @property
    def context(self) -> ContextHooks | None:
        return self.__dict__.get("context")

    def set_keep_all_layers(self, keep_all: bool) -> None:
        """Keep every aggregator layer (upstream's memory behaviour) or only those the heads read."""
        self.aggregator.kept_layers = self.config.replace(keep_all_layers=keep_all).kept_layers()

    def forward(self, images: torch.Tensor, query_points: torch.Tensor | None = None) -> dict:
        if images.ndim == 4:
            images = images.unsqueeze(0)
        if query_points is not None and query_points.ndim == 2:
            query_points = query_points.unsqueeze(0)

        tokens_list, patch_start_idx = self.aggregator(images)
        predictions: dict = {}
        context = self.context
        gather = context.gather_frames if context is not None else None

        # Camera, depth and point heads run in fp32 whatever the surrounding autocast says. They cast
        # the tokens they read themselves (the DPT heads chunk by chunk), so no fp32 copy of the kept
        # layers is made here: such a copy would be saved for backward in place of the bf16 tokens.
        with torch.autocast(device_type=images.device.type, enabled=False):
            fp32_images = _at_least_fp32(images)
            if self.camera_head is not None:
                pose_enc_list = self.camera_head(tokens_list, gather_frames=gather)
                predictions["pose_enc"] = pose_enc_list[-1]
                predictions["pose_enc_list"] = pose_enc_list
            if self.depth_head is not None:
                depth, depth_conf = self.depth_head(tokens_list, images=fp32_images, patch_start_idx=patch_start_idx)
                predictions["depth"] = depth
                predictions["depth_conf"] = depth_conf
            if self.point_head is not None:
                points, points_conf = self.point_head(tokens_list, images=fp32_images, patch_start_idx=patch_start_idx)
                predictions["world_points"] = points
                predictions["world_points_conf"] = points_conf

        # The track head follows the surrounding precision.
        if self.track_head is not None and query_points is not None:
            tracks, vis_logits, conf_logits = self.track_head(
                tokens_list, images=images, patch_start_idx=patch_start_idx, query_points=query_points,
                apply_sigmoid=False)
            predictions["track"] = tracks[-1]
            predictions["track_list"] = tracks  # every iteration, for the per-iteration track loss
            predictions["vis"] = torch.sigmoid(vis_logits)
            predictions["conf"] = torch.sigmoid(conf_logits) if conf_logits is not None else None
            # The loss takes logits: BCE of a bf16 probability saturates (1 - p rounds to 0 beyond logit ~5.5).
            predictions["vis_logits"] = vis_logits
            predictions["conf_logits"] = conf_logits

        if gather is not None:
            for key in ("depth", "depth_conf", "world_points", "world_points_conf"):
                if key in predictions:
                    predictions[key] = gather(predictions[key])
        if not self.training:
            predictions["images"] = images if gather is None else gather(images)  # as upstream: kept for visualisation at inference
        return predictions


def build_model(config: VGGTConfig, device: str | torch.device = "cpu") -> VGGT:
    """Build on `device`; "meta" builds the structure only (no memory, fast): shard, then materialize()."""
    with torch.device(device):
        return VGGT(config)
