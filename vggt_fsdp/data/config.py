"""The `data:` section of a recipe.

Plain typed dataclasses, no YAML code: `vggt_fsdp.recipe` loads, type-checks and overrides them and
then calls `validate()` for the cross-field checks that types cannot express.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

Source = Literal["synthetic", "co3d", "vkitti", "folder"]


@dataclass
class AugmentConfig:
    """Photometric and crop augmentation, applied per frame of training batches only."""

    enabled: bool = True
    color_jitter_prob: float = 0.9  # chance a frame gets colour jitter at all
    brightness: float = 0.5  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.5
    saturation: float = 0.5
    hue: float = 0.1  # shift drawn from [-h, h] of a full turn
    grayscale_prob: float = 0.05
    # With this probability all frames of a scene share one colour-jitter draw (upstream's "cojitter").
    cojitter_prob: float = 0.3
    # Side-length fraction of the largest principal-point-centred window that the crop keeps, drawn
    # uniformly and capped at 1 (upstream's augs.scales): a random zoom, intrinsics scaled to match.
    crop_scale_range: list[float] = field(default_factory=lambda: [0.8, 1.2])

    def validate(self) -> None:
        for name in ("color_jitter_prob", "grayscale_prob", "cojitter_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.augment.{name}={getattr(self, name)} must be in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"data.augment.{name}={getattr(self, name)} must be in [0, 1)")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"data.augment.hue={self.hue} must be in [0, 0.5]")
        _check_range("data.augment.crop_scale_range", self.crop_scale_range, 0.05, 4.0)


@dataclass
class SyntheticConfig:
    """The built-in procedural world (source: synthetic); scene i is a pure function of (seed, i)."""

    num_scenes: int = 10000  # scenes per epoch of the train split
    num_val_scenes: int = 64
    objects_range: list[int] = field(default_factory=lambda: [3, 8])  # boxes and spheres per room
    fov_range_deg: list[float] = field(default_factory=lambda: [40.0, 90.0])  # horizontal field of view
    num_track_queries: int = 64  # query points per scene with ground-truth tracks (0: no tracks)

    def validate(self) -> None:
        if self.num_scenes < 1 or self.num_val_scenes < 0:
            raise ValueError(f"data.synthetic.num_scenes={self.num_scenes} must be >= 1 and "
                             f"num_val_scenes={self.num_val_scenes} >= 0")
        _check_range("data.synthetic.objects_range", self.objects_range, 0, 64)
        _check_range("data.synthetic.fov_range_deg", self.fov_range_deg, 10.0, 150.0)
        if self.num_track_queries < 0:
            raise ValueError(f"data.synthetic.num_track_queries={self.num_track_queries} must be >= 0")


@dataclass
class Co3dConfig:
    """source: co3d. Layout as upstream: images under root/<category>/<sequence>/images/, annotations
    `{category}_{train|test}.jgz` in annotation_dir."""

    annotation_dir: Union[str, None] = None  # None: data.root
    categories: Union[list[str], None] = None  # None: every category with an annotation file
    min_frames: int = 24  # sequences with fewer annotated frames are left out, as upstream
    depth_max_percentile: float = 98.0  # depths above this percentile of a map are dropped, as upstream
    mask_threshold: int = 128  # depth-mask pixels above this value are valid, as upstream

    def validate(self) -> None:
        if self.min_frames < 1:
            raise ValueError(f"data.co3d.min_frames={self.min_frames} must be >= 1")
        if not 0 < self.depth_max_percentile <= 100:
            raise ValueError(f"data.co3d.depth_max_percentile={self.depth_max_percentile} must be in (0, 100]")
        if not 0 <= self.mask_threshold < 255:
            raise ValueError(f"data.co3d.mask_threshold={self.mask_threshold} must be in [0, 255)")


@dataclass
class VKittiConfig:
    """source: vkitti (Virtual KITTI 2). Layout as upstream: root/<Scene>/<variation>/frames/rgb/Camera_<k>/."""

    max_depth: float = 80.0  # metres; farther depth (sky) is invalid, as upstream

    def validate(self) -> None:
        if self.max_depth <= 0:
            raise ValueError(f"data.vkitti.max_depth={self.max_depth} must be > 0")


@dataclass
class DataConfig:
    source: Source = "synthetic"
    root: Union[str, None] = None  # dataset folder; required for every source but synthetic
    # Frames per scene S, drawn uniformly per batch from [lo, hi] (inclusive) as upstream.
    frames_range: list[int] = field(default_factory=lambda: [2, 24])
    # Frame budget per GPU and step: batch = floor(frames_per_gpu / S) scenes. "auto": the memory
    # planner picks it before training starts.
    frames_per_gpu: Union[int, Literal["auto"]] = 48
    aspect_range: list[float] = field(default_factory=lambda: [0.33, 1.0])  # height / width
    image_width: int = 518
    patch_size: int = 14  # heights are floor(width * aspect / patch_size) * patch_size
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    co3d: Co3dConfig = field(default_factory=Co3dConfig)
    vkitti: VKittiConfig = field(default_factory=VKittiConfig)
    # A frame whose files are missing or malformed raises by default; with this set it is replaced by
    # another frame of the scene and counted in the loader's `skipped_frames` statistics.
    skip_bad_frames: bool = False
    # Real sources: a sample's frames lie within +-(frame_window * S) frames of a random anchor frame
    # (upstream's nearby sampling with expand_ratio 8), so frames of long videos overlap; 0: anywhere.
    frame_window: int = 8
    # Fraction of scenes held out for validation where a source has no official split (vkitti, folder).
    val_fraction: float = 0.05
    num_workers: int = 2
    seed: int = 0

    def validate(self) -> None:
        if self.source != "synthetic" and not self.root:
            raise ValueError(f"data.root is required for data.source={self.source!r}")
        _check_range("data.frames_range", self.frames_range, 1, 1024)
        _check_range("data.aspect_range", self.aspect_range, 0.05, 4.0)
        if not isinstance(self.frames_per_gpu, int) and self.frames_per_gpu != "auto":
            raise ValueError(f"data.frames_per_gpu={self.frames_per_gpu!r}: expected an int or 'auto'")
        if isinstance(self.frames_per_gpu, int) and self.frames_per_gpu < self.frames_range[1]:
            raise ValueError(
                f"data.frames_per_gpu={self.frames_per_gpu} is smaller than data.frames_range[1]="
                f"{self.frames_range[1]}: a batch of the largest scenes would hold zero scenes")
        if self.patch_size < 1:
            raise ValueError(f"data.patch_size={self.patch_size} must be >= 1")
        if self.image_width % self.patch_size:
            raise ValueError(f"data.image_width={self.image_width} must be a multiple of "
                             f"data.patch_size={self.patch_size}")
        if int(self.image_width * self.aspect_range[0] / self.patch_size) < 1:
            raise ValueError(f"data.aspect_range[0]={self.aspect_range[0]} gives an image height of 0 "
                             f"at data.image_width={self.image_width}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.frame_window < 0:
            raise ValueError(f"data.frame_window={self.frame_window} must be >= 0 (0: anywhere in the sequence)")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be >= 0")
        for section in (self.augment, self.synthetic, self.co3d, self.vkitti):
            section.validate()


def _check_range(name: str, value: list, lo: float, hi: float) -> None:
    """A [low, high] pair inside [lo, hi] with low <= high."""
    if len(value) != 2 or not (lo <= value[0] <= value[1] <= hi):
        raise ValueError(f"{name}={list(value)} must be [low, high] with {lo} <= low <= high <= {hi}")
