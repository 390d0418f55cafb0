"""DPT head: dense predictions (depth, point maps) or feature maps from four aggregator layers.

Architecture and parameter names follow the reference implementation (vggt/heads/dpt_head.py,
itself after "Vision Transformers for Dense Prediction" and Depth-Anything-V2):

    tokens of 4 layers -> LayerNorm -> 1x1 conv `projects[i]` (+ 0.1 * UV embedding)
      -> `resize_layers[i]` (x4, x2, identity, /2) -> `scratch.layer{i}_rn` (3x3 to `features`)
      -> fusion `scratch.refinenet4..1` (coarse to fine, each upsampling x2 or to the next size)
      -> `scratch.output_conv1` -> bilinear resize to the image (/ down_ratio) (+ UV embedding)
      -> feature maps, or `scratch.output_conv2` + activations -> (values, confidence).

Images are processed in chunks of `frames_chunk_size`, taken over the frames of all scenes together
(upstream chunks each scene's frames with the whole batch inside; see `DPTHead.forward`). With
`checkpoint_chunks` (set by the checkpointing policy) each chunk runs under non-reentrant activation
checkpointing: the head then keeps only the chunk outputs during the forward pass and recomputes a
chunk's activations in backward, which matters because a DPT head's activations dominate VGGT's
training memory (VGGT-1B, blocks checkpointed, 24 frames per GPU on an H200: 37.3 GiB peak with the heads
not checkpointed, 14.5 GiB with chunks; benchmarks/results/2026-11-27-nvidia-h200-followup.md).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .head_act import CONF_ACTIVATIONS, VALUE_ACTIVATIONS, activate_head, check_activation, uv_position_embedding

# F.interpolate indexes its output with 32-bit integers; upstream splits larger batches below this.
_INTERPOLATE_MAX_ELEMENTS = 1_610_612_736


def interpolate_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with align_corners=True, split along the batch when the output is too large."""
    elements = size[0] * size[1] * x.shape[0] * x.shape[1]
    if elements <= _INTERPOLATE_MAX_ELEMENTS:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    chunks = torch.chunk(x, chunks=elements // _INTERPOLATE_MAX_ELEMENTS + 1, dim=0)
    return torch.cat([F.interpolate(c, size=size, mode="bilinear", align_corners=True) for c in chunks], dim=0)


class ResidualConvUnit(nn.Module):
    """relu(x) + conv2(relu(conv1(relu(x)))).

    The skip adds the *activated* input: upstream applies an in-place ReLU to its input before the
    first conv, so the residual it adds afterwards is relu(x), not x. Written out-of-place here.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        return x + self.conv2(F.relu(self.conv1(x)))


class FeatureFusionBlock(nn.Module):
    """Adds a refined skip feature (if any), refines, upsamples (to `size` or x2), 1x1-convolves."""

    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1, stride=1, padding=0, bias=True)
        self.has_residual = has_residual
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: Sequence[int] | None = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            size = (x.shape[-2] * 2, x.shape[-1] * 2)
        return self.out_conv(interpolate_bilinear(x, tuple(size)))


class DPTScratch(nn.Module):
    """The `scratch` submodule: per-stage 3x3 convs to `features`, fusion blocks, output convs."""

    def __init__(self, out_channels: Sequence[int], features: int, output_dim: int, feature_only: bool) -> None:
        super().__init__()
        for i, channels in enumerate(out_channels, start=1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(channels, features, kernel_size=3, stride=1, padding=1, bias=False))
        self.refinenet1 = FeatureFusionBlock(features)
        self.refinenet2 = FeatureFusionBlock(features)
        self.refinenet3 = FeatureFusionBlock(features)
        self.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        if feature_only:
            self.output_conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1)
        else:
            hidden = 32  # upstream's fixed width of the last conv pair
            self.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, stride=1, padding=1)
            self.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, hidden, kernel_size=3, stride=1, padding=1),
                nn.ReLU(),
                nn.Conv2d(hidden, output_dim, kernel_size=1, stride=1, padding=0),
            )

    def forward(self, stages: list[Tensor]) -> Tensor:
        """Fuse the four resized stages (finest first) into one map at twice the finest resolution."""
        s1, s2, s3, s4 = stages
        # Each layer*_rn conv keeps the spatial size; applying it just before its fusion step keeps
        # fewer full-size maps alive at once (upstream `del`s them for the same reason).
        out = self.refinenet4(self.layer4_rn(s4), size=s3.shape[2:])
        out = self.refinenet3(out, self.layer3_rn(s3), size=s2.shape[2:])
        out = self.refinenet2(out, self.layer2_rn(s2), size=s1.shape[2:])
        out = self.refinenet1(out, self.layer1_rn(s1))
        return self.output_conv1(out)


class DPTHead(nn.Module):
    """Dense head over aggregator tokens (B, S, P, dim_in); see the module docstring.

    forward(aggregated_tokens_list, images, patch_start_idx) returns
      - feature_only: features (B, S, features, H / down_ratio, W / down_ratio);
      - otherwise: (values (B, S, H, W, output_dim - 1), confidence (B, S, H, W)),
    where H, W are the image size rounded down to a multiple of the patch size.
    """

    # Precision contract (parallel/precision.py): it casts each chunk of the layers it reads, not the layers.
    casts_own_inputs = True

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        output_dim: int = 4,
        activation: str = "inv_log",
        conf_activation: str = "expp1",
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23),
        pos_embed: bool = True,
        feature_only: bool = False,
        down_ratio: int = 1,
        frames_chunk_size: int | None = 8,
    ) -> None:
        super().__init__()
        if len(out_channels) != 4 or len(intermediate_layer_idx) != 4:
            raise ValueError(
                f"DPTHead has 4 stages: out_channels={list(out_channels)} and intermediate_layer_idx="
                f"{list(intermediate_layer_idx)} must have 4 entries each")
        if not feature_only:
            check_activation("activation", activation, VALUE_ACTIVATIONS)
            check_activation("conf_activation", conf_activation, CONF_ACTIVATIONS)
        if frames_chunk_size is not None and frames_chunk_size <= 0:
            raise ValueError(f"frames_chunk_size={frames_chunk_size} must be positive or None (all frames at once)")
        self.patch_size = patch_size
        self.activation = activation
        self.conf_activation = conf_activation
        self.pos_embed = pos_embed
        self.feature_only = feature_only
        self.down_ratio = down_ratio
        self.intermediate_layer_idx = tuple(intermediate_layer_idx)
        self.frames_chunk_size = frames_chunk_size
        # Set by the checkpointing policy (parallel/checkpointing.py); the head only obeys.
        self.checkpoint_chunks = False

        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(
            [nn.Conv2d(dim_in, channels, kernel_size=1, stride=1, padding=0) for channels in out_channels])
        c0, c1, _, c3 = out_channels
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(c0, c0, kernel_size=4, stride=4, padding=0),
            nn.ConvTranspose2d(c1, c1, kernel_size=2, stride=2, padding=0),
            nn.Identity(),
            nn.Conv2d(c3, c3, kernel_size=3, stride=2, padding=1),
        ])
        self.scratch = DPTScratch(out_channels, features, output_dim, feature_only)

    def forward(self, aggregated_tokens_list: Sequence[Tensor | None], images: Tensor,
                patch_start_idx: int) -> Tensor | tuple[Tensor, Tensor]:
        _, num_frames, _, height, width = images.shape
        layers = []
        for idx in self.intermediate_layer_idx:
            if not -len(aggregated_tokens_list) <= idx < len(aggregated_tokens_list):
                raise ValueError(f"DPTHead reads aggregator layer {idx}, but only {len(aggregated_tokens_list)} "
                                 f"layers were given")
            tokens = aggregated_tokens_list[idx]
            if tokens is None:
                raise ValueError(f"DPTHead reads aggregator layer {idx}, but that layer was not kept (None)")
            layers.append(tokens)

        # Chunks run over the frames of all scenes together (B * S images), not over each scene's
        # frames with the whole batch inside: with many short scenes (12 scenes of 2 frames) the latter
        # would make one huge chunk, and a chunk's recompute sets the head's memory peak.
        batch = images.shape[0]
        flat_layers = [t.flatten(0, 1) for t in layers]  # (B * S, P, C) views of the kept layers
        num_images = batch * num_frames
        chunk = self.frames_chunk_size or num_images
        outputs = []
        for start in range(0, num_images, chunk):
            # Slicing here (not inside the chunk function) makes the chunk's inputs plain views of the
            # tokens, which the aggregator output keeps alive anyway: checkpointing stores nothing new.
            chunk_layers = [t[start:start + chunk, patch_start_idx:] for t in flat_layers]
            if self.checkpoint_chunks and torch.is_grad_enabled():
                outputs.append(checkpoint(self._forward_chunk, height, width, *chunk_layers, use_reentrant=False))
            else:
                outputs.append(self._forward_chunk(height, width, *chunk_layers))

        def join(parts: list[Tensor]) -> Tensor:
            joined = (torch.cat(parts) if len(parts) > 1 else parts[0]).unflatten(0, (batch, num_frames))
            # A module FSDP2 wraps must not return a view: FSDP2 hooks the outputs for backward, and
            # warns that a view "can cause backward to fail or produce wrong gradients" (4 times a run).
            # The copy is one output's size, freed with its base at once; clone's backward is identity.
            return joined.clone() if joined._is_view() else joined

        if self.feature_only:
            return join(outputs)
        return join([o[0] for o in outputs]), join([o[1] for o in outputs])

    def _forward_chunk(self, height: int, width: int, *layers: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """One chunk of images: `layers` are the 4 stages' patch tokens (n, patch_h * patch_w, dim_in)."""
        patch_h, patch_w = height // self.patch_size, width // self.patch_size
        stages = []
        for project, resize, tokens in zip(self.projects, self.resize_layers, layers):
            # Tokens may arrive in bf16 from an autocast aggregator; the head computes in its own dtype.
            x = self.norm(tokens.to(self.norm.weight.dtype))
            x = x.permute(0, 2, 1).reshape(x.shape[0], x.shape[-1], patch_h, patch_w)
            x = project(x)
            if self.pos_embed:
                x = self._add_pos_embed(x, width, height)
            stages.append(resize(x))

        out = self.scratch(stages)
        out_size = (int(patch_h * self.patch_size / self.down_ratio), int(patch_w * self.patch_size / self.down_ratio))
        out = interpolate_bilinear(out, out_size)
        if self.pos_embed:
            out = self._add_pos_embed(out, width, height)
        if self.feature_only:
            return out
        return activate_head(self.scratch.output_conv2(out), self.activation, self.conf_activation)

    @staticmethod
    def _add_pos_embed(x: Tensor, width: int, height: int) -> Tensor:
        """Add 0.1 * the UV embedding of x's grid, with the aspect ratio of the full image."""
        embed = uv_position_embedding(x.shape[-2], x.shape[-1], x.shape[1], aspect_ratio=width / height,
                                      dtype=x.dtype, device=x.device)
        return x + embed
