"""The alternating-attention aggregator: patch tokens of all frames -> per-layer scene tokens.

Per frame the tokens are [camera, registers..., patches...]. Each layer runs a frame block
(attention within each frame, batch B*S) and a global block (attention across all frames of a
scene, batch B); layer i's output is concat(frame output, global output) -> (B, S, P+5, 2C).
Only the layers some head reads are materialised (see `kept_layers`); the others are None.

Context parallelism (`set_context`): the images hold this rank's share of each scene's frames; global
attention exchanges tokens with the other ranks of the group (layers.Attention), and only the rank that
holds the scene's first frame gives it the first-frame camera and register tokens.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .config import AggregatorConfig, PatchEmbedConfig
from .layers import Attention, Block, ContextHooks, RopeTables, RotaryPositionEmbedding2D, patch_positions
from .patch_embed import DinoVisionTransformer, PatchEmbed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _first_and_rest(token: torch.Tensor, B: int, S: int, starts_scene: bool = True) -> torch.Tensor:
    """(1, 2, n, C) -> (B*S, n, C): index 0 for frame 0 of each scene, index 1 for frames 1..S-1.

    `starts_scene` False (a later share of a scene split over ranks): index 1 for every frame."""
    if not starts_scene:
        return token[:, 1:].expand(B, S, *token.shape[2:]).reshape(B * S, *token.shape[2:])
    first = token[:, :1].expand(B, 1, *token.shape[2:])
    rest = token[:, 1:].expand(B, S - 1, *token.shape[2:])
    return torch.cat((first, rest), dim=1).reshape(B * S, *token.shape[2:])


class Aggregator(nn.Module):
    def __init__(self, cfg: AggregatorConfig, patch_cfg: PatchEmbedConfig, kept_layers: Iterable[int] | None = None):
        super().__init__()
        C = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.depth = cfg.depth
        self.aa_order = tuple(cfg.aa_order)
        self.aa_block_size = cfg.aa_block_size
        self.num_register_tokens = cfg.num_register_tokens
        self.patch_start_idx = 1 + cfg.num_register_tokens
        self.kept_layers = kept_layers  # property setter validates

        if patch_cfg.type == "conv":
            self.patch_embed = PatchEmbed(cfg.patch_size, C)
        else:
            self.patch_embed = DinoVisionTransformer(
                img_size=cfg.img_size,
                patch_size=cfg.patch_size,
                embed_dim=C,
                depth=patch_cfg.depth,
                num_heads=patch_cfg.num_heads,
                mlp_ratio=patch_cfg.mlp_ratio,
                num_register_tokens=patch_cfg.num_register_tokens,
                init_values=patch_cfg.init_values,
                interpolate_antialias=patch_cfg.interpolate_antialias,
                interpolate_offset=patch_cfg.interpolate_offset,
            )
        self.rope = RotaryPositionEmbedding2D(cfg.rope_freq) if cfg.rope_freq > 0 else None
        self.rope_half_dim = C // cfg.num_heads // 2  # each of the row and column halves of a head

        def make_block() -> Block:
            return Block(
                C, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, proj_bias=cfg.proj_bias,
                ffn_bias=cfg.ffn_bias, init_values=cfg.init_values, qk_norm=cfg.qk_norm, rope=self.rope,
            )

        self.frame_blocks = nn.ModuleList(make_block() for _ in range(cfg.depth))
        self.global_blocks = nn.ModuleList(make_block() for _ in range(cfg.depth))
        # Index 0 serves the first frame of a scene, index 1 all other frames.
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, C))
        self.register_token = nn.Parameter(torch.zeros(1, 2, cfg.num_register_tokens, C))
        self.__dict__["context"] = None  # ContextHooks while a scene's frames are split over ranks
        self.register_buffer("_resnet_mean", torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("_resnet_std", torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ layer keeping
    @property
    def kept_layers(self) -> frozenset[int]:
        return self._kept_layers

    @kept_layers.setter
    def kept_layers(self, layers: Iterable[int] | None) -> None:
        """None keeps every layer (upstream behaviour); negative indices count from the end."""
        layers = list(range(self.depth) if layers is None else layers)
        bad = [i for i in layers if not -self.depth <= i < self.depth]
        if bad:
            raise ValueError(f"kept layer(s) {bad} outside the aggregator's {self.depth} layers (0..{self.depth - 1})")
        self._kept_layers = frozenset(i % self.depth for i in layers)

    def set_context(self, context: ContextHooks | None) -> None:
        """Split scenes over ranks (`context`) or not (None): the global attentions exchange tokens."""
        self.__dict__["context"] = context
        # Through modules(), not block.attn: a checkpoint or compile wrapper may stand in between.
        for module in self.global_blocks.modules():
            if isinstance(module, Attention):
                module.__dict__["context"] = context

    # ------------------------------------------------------------------ init
    def init_special_parameters(self) -> None:
        nn.init.normal_(self.camera_token, std=1e-6)
        nn.init.normal_(self.register_token, std=1e-6)
        self._resnet_mean.copy_(torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1))
        self._resnet_std.copy_(torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1))
        if isinstance(self.patch_embed, DinoVisionTransformer):
            self.patch_embed.init_special_parameters()

    # ------------------------------------------------------------------ forward
    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, S, 3, H, W) in [0, 1] -> tokens (B*S, P+5, C) with camera and register tokens first."""
        B, S, _, H, W = images.shape
        # In the parameters' compute dtype: without autocast nothing else would cast the fp32 buffers' result.
        images = ((images - self._resnet_mean) / self._resnet_std).to(self.camera_token.dtype)
        patches = self.patch_embed(images.reshape(B * S, 3, H, W))
        starts = self.context is None or self.context.holds_first_frame
        camera = _first_and_rest(self.camera_token, B, S, starts).to(patches.dtype)
        registers = _first_and_rest(self.register_token, B, S, starts).to(patches.dtype)
        return torch.cat((camera, registers, patches), dim=1)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor | None], int]:
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"expected images of shape (B, S, 3, H, W), got {tuple(images.shape)}")
        B, S, _, H, W = images.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {self.patch_size}")
        tokens = self._embed(images)
        _, P, C = tokens.shape

        frame_pos = global_pos = None
        if self.rope is not None:
            # Batch dim 1: every frame has the same positions; broadcasting avoids B*S copies. The tables
            # are gathered once here and shared by every block (see RotaryPositionEmbedding2D).
            grid_h, grid_w = H // self.patch_size, W // self.patch_size
            positions = patch_positions(grid_h, grid_w, self.patch_start_idx, images.device)
            length = max(grid_h, grid_w) + 1  # known here: no host sync to read positions.max()
            frame_pos = self.rope.tables(positions, self.rope_half_dim, length)
            global_pos = self.rope.tables(positions.repeat(1, S, 1), self.rope_half_dim, length)

        outputs: list[torch.Tensor | None] = [None] * self.depth
        layer = 0
        for _ in range(self.depth // self.aa_block_size):
            results = {}
            for kind in self.aa_order:
                if kind == "frame":
                    tokens, results[kind] = self._run(self.frame_blocks, layer, tokens.reshape(B * S, P, C), frame_pos)
                else:
                    tokens, results[kind] = self._run(self.global_blocks, layer, tokens.reshape(B, S * P, C), global_pos)
            for i in range(self.aa_block_size):
                if layer + i in self._kept_layers:
                    frame_out = results["frame"][i].reshape(B, S, P, C)
                    global_out = results["global"][i].reshape(B, S, P, C)
                    outputs[layer + i] = torch.cat((frame_out, global_out), dim=-1)
            layer += self.aa_block_size
        return outputs, self.patch_start_idx

    def _run(self, blocks: nn.ModuleList, start: int, tokens: torch.Tensor, pos: RopeTables | None):
        """Run aa_block_size consecutive blocks; return the last output and all outputs."""
        outs = []
        for idx in range(start, start + self.aa_block_size):
            tokens = blocks[idx](tokens, pos=pos)
            outs.append(tokens)
        return tokens, outs
