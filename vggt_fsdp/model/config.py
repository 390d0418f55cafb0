"""Typed architecture configuration of VGGT, its presets and the parity-fixture reader.

Every constructor argument the upstream implementation exposes is a field here, with the upstream
default, so `VGGTConfig()` *is* VGGT-1B. The width, image size and patch size of the DINOv2 patch
embed are the aggregator's (upstream builds it that way), so they live only in `AggregatorConfig`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

AttentionKind = Literal["frame", "global"]
PoseActivation = Literal["linear", "inv_log", "exp", "relu"]

POSE_ENCODING_DIMS = {"absT_quaR_FoV": 9}


@dataclass
class PatchEmbedConfig:
    """The image backbone: a DINOv2 ViT with registers ("dinov2") or a single conv ("conv")."""

    type: Literal["dinov2", "conv"] = "dinov2"
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    init_values: float = 1.0  # LayerScale init of the DINO blocks
    interpolate_antialias: bool = True
    interpolate_offset: float = 0.0


@dataclass
class AggregatorConfig:
    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    aa_order: tuple[AttentionKind, ...] = ("frame", "global")
    aa_block_size: int = 1
    qk_norm: bool = True
    rope_freq: float = 100.0  # <= 0 disables RoPE
    init_values: float = 0.01


@dataclass
class CameraHeadConfig:
    trunk_depth: int = 4
    num_heads: int = 16
    mlp_ratio: float = 4.0
    init_values: float = 0.01
    pose_encoding_type: Literal["absT_quaR_FoV"] = "absT_quaR_FoV"
    trans_act: PoseActivation = "linear"
    quat_act: PoseActivation = "linear"
    fl_act: PoseActivation = "relu"
    num_iterations: int = 4


@dataclass
class DPTHeadConfig:
    """Shared by the depth head, the point head and (its out_channels/layers) the track extractor."""

    features: int = 256
    out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    intermediate_layer_idx: tuple[int, int, int, int] = (4, 11, 17, 23)
    pos_embed: bool = True
    frames_chunk_size: int = 8
    depth_activation: str = "exp"
    point_activation: str = "inv_log"
    conf_activation: str = "expp1"


@dataclass
class TrackHeadConfig:
    features: int = 128
    iters: int = 4
    predict_conf: bool = True
    stride: int = 2
    corr_levels: int = 7
    corr_radius: int = 4
    hidden_size: int = 384


@dataclass
class VGGTConfig:
    patch_embed: PatchEmbedConfig = field(default_factory=PatchEmbedConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    camera_head: CameraHeadConfig = field(default_factory=CameraHeadConfig)
    dpt_head: DPTHeadConfig = field(default_factory=DPTHeadConfig)
    track_head: TrackHeadConfig = field(default_factory=TrackHeadConfig)
    enable_camera: bool = True
    enable_depth: bool = True
    enable_point: bool = True
    enable_track: bool = True
    # Upstream returns all `depth` aggregator layers; by default only the ones an enabled head reads
    # are kept (the rest are None). True reproduces upstream's memory behaviour (benchmarks).
    keep_all_layers: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- derived facts
    @property
    def head_dim(self) -> int:
        return self.aggregator.embed_dim // self.aggregator.num_heads

    @property
    def token_dim(self) -> int:
        """Width of the aggregator's outputs (frame and global halves concatenated)."""
        return 2 * self.aggregator.embed_dim

    def layers_read_by_heads(self) -> tuple[int, ...]:
        """Aggregator layer indices the enabled heads read (sorted, unique)."""
        depth = self.aggregator.depth
        read: set[int] = set()
        if self.enable_camera:
            read.add(depth - 1)
        if self.enable_depth or self.enable_point or self.enable_track:
            read.update(i % depth for i in self.dpt_head.intermediate_layer_idx)
        return tuple(sorted(read))

    def kept_layers(self) -> tuple[int, ...]:
        if self.keep_all_layers:
            return tuple(range(self.aggregator.depth))
        return self.layers_read_by_heads()

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        agg, pe, cam, dpt = self.aggregator, self.patch_embed, self.camera_head, self.dpt_head
        _positive(self, "aggregator", ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "aa_block_size"))
        _positive(self, "patch_embed", ("num_heads",))
        if agg.embed_dim % agg.num_heads:
            raise ValueError(f"aggregator.embed_dim={agg.embed_dim} must be divisible by aggregator.num_heads={agg.num_heads}")
        if agg.rope_freq > 0 and self.head_dim % 4:
            raise ValueError(
                f"2-D RoPE splits the head dim into y/x halves of rotate-half pairs: head dim "
                f"{self.head_dim} (aggregator.embed_dim / num_heads) must be a multiple of 4")
        if agg.img_size % agg.patch_size:
            raise ValueError(f"aggregator.img_size={agg.img_size} must be a multiple of patch_size={agg.patch_size}")
        if agg.depth % agg.aa_block_size:
            raise ValueError(f"aggregator.depth={agg.depth} must be divisible by aa_block_size={agg.aa_block_size}")
        if not agg.aa_order or any(kind not in ("frame", "global") for kind in agg.aa_order):
            raise ValueError(f"aggregator.aa_order={list(agg.aa_order)} must list 'frame'/'global' entries")
        if sorted(set(agg.aa_order)) != ["frame", "global"] or len(agg.aa_order) != 2:
            # The output concatenates one frame and one global result per layer.
            raise ValueError(f"aggregator.aa_order={list(agg.aa_order)} must be a permutation of ['frame', 'global']")
        if pe.type not in ("dinov2", "conv"):
            raise ValueError(f"patch_embed.type={pe.type!r}; valid choices: 'dinov2', 'conv'")
        if pe.type == "dinov2" and agg.embed_dim % pe.num_heads:
            raise ValueError(f"aggregator.embed_dim={agg.embed_dim} must be divisible by patch_embed.num_heads={pe.num_heads}")
        if pe.type == "dinov2" and pe.num_register_tokens < 0:
            raise ValueError(f"patch_embed.num_register_tokens={pe.num_register_tokens} must be >= 0")
        if cam.pose_encoding_type not in POSE_ENCODING_DIMS:
            raise ValueError(f"camera_head.pose_encoding_type={cam.pose_encoding_type!r}; valid choices: {list(POSE_ENCODING_DIMS)}")
        if self.token_dim % cam.num_heads:
            raise ValueError(f"2 * aggregator.embed_dim={self.token_dim} must be divisible by camera_head.num_heads={cam.num_heads}")
        for name in ("trans_act", "quat_act", "fl_act"):
            if getattr(cam, name) not in get_args(PoseActivation):
                raise ValueError(f"camera_head.{name}={getattr(cam, name)!r}; "
                                 f"valid choices: {', '.join(get_args(PoseActivation))}")
        if len(dpt.out_channels) != 4 or len(dpt.intermediate_layer_idx) != 4:
            raise ValueError(
                f"dpt_head.out_channels={list(dpt.out_channels)} and intermediate_layer_idx="
                f"{list(dpt.intermediate_layer_idx)} must have 4 entries each (the DPT has 4 stages)")
        for idx in dpt.intermediate_layer_idx:
            if not -agg.depth <= idx < agg.depth:
                raise ValueError(
                    f"dpt_head.intermediate_layer_idx contains {idx}, outside the aggregator's "
                    f"{agg.depth} layers (valid: 0..{agg.depth - 1})")

    # ---------------------------------------------------------------- constructors
    def replace(self, **changes) -> "VGGTConfig":
        """A validated copy with top-level fields changed (e.g. enable_track=False)."""
        return dataclasses.replace(copy.deepcopy(self), **changes)

    @classmethod
    def from_dict(cls, data: dict) -> "VGGTConfig":
        """Build from nested plain dicts (as `dataclasses.asdict` writes); unknown keys are errors."""
        sections = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key not in sections:
                raise ValueError(f"unknown VGGTConfig key {key!r}; valid keys: {sorted(sections)}")
            sub_cls = _SECTION_TYPES.get(key)
            kwargs[key] = _build_section(sub_cls, value, key) if sub_cls else value
        return cls(**kwargs)

    @classmethod
    def from_fixture(cls, path: str | Path) -> "VGGTConfig":
        """Read a parity fixture's config.json (schema: tests/fixtures/README.md)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        raw = json.loads(path.read_text())
        missing = [k for k in ("aggregator", "patch_embed", "camera_head", "dpt_head", "track_head") if k not in raw]
        if missing:
            raise ValueError(f"{path}: not a fixture config, missing sections {missing}")
        pe = dict(raw["patch_embed"])
        pe_type = pe.pop("type", "dinov2")
        pe["type"] = "conv" if "conv" in pe_type else "dinov2"
        # Top-level keys beyond the five sections ("inputs", the batch shape) are not architecture.
        heads = {k: bool(raw[k]) for k in ("enable_camera", "enable_depth", "enable_point", "enable_track") if k in raw}
        return cls(
            **heads,
            patch_embed=_build_section(PatchEmbedConfig, pe, "patch_embed"),
            aggregator=_build_section(AggregatorConfig, raw["aggregator"], "aggregator"),
            camera_head=_build_section(CameraHeadConfig, raw["camera_head"], "camera_head"),
            dpt_head=_build_section(DPTHeadConfig, raw["dpt_head"], "dpt_head"),
            track_head=_build_section(TrackHeadConfig, raw["track_head"], "track_head"),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTION_TYPES = {
    "patch_embed": PatchEmbedConfig,
    "aggregator": AggregatorConfig,
    "camera_head": CameraHeadConfig,
    "dpt_head": DPTHeadConfig,
    "track_head": TrackHeadConfig,
}


def _build_section(cls, values: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    # JSON lists become tuples so configs compare and hash like the presets.
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _positive(cfg: VGGTConfig, section: str, names: tuple[str, ...]) -> None:
    sub = getattr(cfg, section)
    for name in names:
        value = getattr(sub, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{section}.{name}={value!r} must be a positive integer")


# ------------------------------------------------------------------------------------ presets
def _vggt_1b() -> VGGTConfig:
    return VGGTConfig()


def _vggt_mid() -> VGGTConfig:
    # A ViT-S/14 DINO backbone and 12 alternating layers at width 384 (head dim 64 as in 1B).
    return VGGTConfig(
        patch_embed=PatchEmbedConfig(depth=12, num_heads=6),
        aggregator=AggregatorConfig(embed_dim=384, depth=12, num_heads=6),
        camera_head=CameraHeadConfig(trunk_depth=2, num_heads=12),
        dpt_head=DPTHeadConfig(features=128, out_channels=(96, 192, 384, 384), intermediate_layer_idx=(2, 5, 8, 11)),
        track_head=TrackHeadConfig(features=64, hidden_size=192, corr_levels=4, corr_radius=3),
    )


def _vggt_tiny() -> VGGTConfig:
    # The parity fixture's architecture at a slightly larger width: fast on a CPU.
    return VGGTConfig(
        patch_embed=PatchEmbedConfig(depth=2, num_heads=4),
        aggregator=AggregatorConfig(img_size=112, embed_dim=96, depth=4, num_heads=4),
        camera_head=CameraHeadConfig(trunk_depth=1, num_heads=4),
        dpt_head=DPTHeadConfig(features=32, out_channels=(24, 48, 96, 96), intermediate_layer_idx=(0, 1, 2, 3)),
        track_head=TrackHeadConfig(features=16, iters=2, corr_levels=3, corr_radius=2, hidden_size=32),
    )


PRESETS = {"vggt-1b": _vggt_1b, "vggt-mid": _vggt_mid, "vggt-tiny": _vggt_tiny}


def get_preset(name: str) -> VGGTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid choices: {', '.join(PRESETS)}")
    return PRESETS[name]()
