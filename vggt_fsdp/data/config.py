"""The `data:` section of a recipe.

Plain typed dataclasses, no YAML code: `vggt_fsdp.recipe` loads, type-checks and overrides them and
then calls `validate()` for the cross-field checks that types cannot express.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Literal, Union

Source = Literal["synthetic", "co3d", "vkitti", "folder", "colmap"]


@dataclass
class AugmentConfig:
    """Crop, zoom and photometric augmentation of training batches, upstream's values by default
    (training/data/base_dataset.py and dataset_util.py at facebookresearch/vggt)."""

    enabled: bool = True
    color_jitter_prob: float = 0.9  # chance a frame gets colour jitter at all
    brightness: float = 0.5  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.5
    saturation: float = 0.5
    hue: float = 0.1  # shift drawn from [-h, h] of a full turn
    grayscale_prob: float = 0.05
    # With this probability all frames of a scene share one colour-jitter draw (upstream's "cojitter").
    cojitter_prob: float = 0.3
    # Each frame keeps a principal-point-centred window whose height and width are these fractions of
    # the image's, drawn uniformly and capped at 1 (upstream's augs.scales): a random crop.
    crop_scale_range: list[float] = field(default_factory=lambda: [0.8, 1.2])
    # Upstream draws the height and width fractions separately; false: one draw for both sides.
    crop_scale_per_axis: bool = True
    # Random zoom: the resize target grows by z * max(height, width) pixels before the centre crop,
    # z ~ triangular(0, mode 0, max zoom_max) (upstream's rescale_aug: 0.3); 0 disables it.
    zoom_max: float = 0.3

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
        if not 0.0 <= self.zoom_max <= 4.0:
            raise ValueError(f"data.augment.zoom_max={self.zoom_max} must be in [0, 4] (0: no zoom)")


@dataclass
class SyntheticConfig:
    """The built-in procedural world (source: synthetic); scene i is a pure function of (seed, i)."""

    num_scenes: int = 10000  # scenes per epoch of the train split
    num_val_scenes: int = 64
    objects_range: list[int] = field(default_factory=lambda: [3, 8])  # boxes and spheres per room
    fov_range_deg: list[float] = field(default_factory=lambda: [40.0, 90.0])  # horizontal field of view
    num_track_queries: int = 64  # query points per scene with ground-truth tracks (0: no tracks)

    def validate(self, where: str = "data.synthetic") -> None:
        if self.num_scenes < 1 or self.num_val_scenes < 0:
            raise ValueError(f"{where}.num_scenes={self.num_scenes} must be >= 1 and "
                             f"num_val_scenes={self.num_val_scenes} >= 0")
        _check_range(f"{where}.objects_range", self.objects_range, 0, 64)
        _check_range(f"{where}.fov_range_deg", self.fov_range_deg, 10.0, 150.0)
        if self.num_track_queries < 0:
            raise ValueError(f"{where}.num_track_queries={self.num_track_queries} must be >= 0")


@dataclass
class Co3dConfig:
    """source: co3d. Layout as upstream: images under root/<category>/<sequence>/images/, annotations
    `{category}_{train|test}.jgz` in annotation_dir."""

    annotation_dir: Union[str, None] = None  # None: the source's root
    # "seen": upstream's 41 training ("seen") categories (vggt_fsdp.data.co3d.SEEN_CATEGORIES), those
    # without an annotation file skipped with a notice; "all": every category with an annotation file;
    # or a list of names, each of which must have one.
    categories: Union[Literal["seen", "all"], list[str]] = "seen"
    min_frames: int = 24  # sequences with fewer annotated frames are left out, as upstream
    depth_max_percentile: float = 98.0  # depths above this percentile of a map are dropped, as upstream
    mask_threshold: int = 128  # depth-mask pixels above this value are valid, as upstream

    def validate(self, where: str = "data.co3d") -> None:
        if self.min_frames < 1:
            raise ValueError(f"{where}.min_frames={self.min_frames} must be >= 1")
        if not 0 < self.depth_max_percentile <= 100:
            raise ValueError(f"{where}.depth_max_percentile={self.depth_max_percentile} must be in (0, 100]")
        if not 0 <= self.mask_threshold < 255:
            raise ValueError(f"{where}.mask_threshold={self.mask_threshold} must be in [0, 255)")
        if isinstance(self.categories, list) and not self.categories:
            raise ValueError(f"{where}.categories is empty; give names, 'seen' or 'all'")


@dataclass
class VKittiConfig:
    """source: vkitti (Virtual KITTI 2). Layout as upstream: root/<Scene>/<variation>/frames/rgb/Camera_<k>/."""

    max_depth: float = 80.0  # metres; farther depth (sky) is invalid, as upstream

    def validate(self, where: str = "data.vkitti") -> None:
        if self.max_depth <= 0:
            raise ValueError(f"{where}.max_depth={self.max_depth} must be > 0")


@dataclass
class ColmapConfig:
    """source: colmap. Each scene is a folder of root holding a COLMAP model (text or binary), its
    images and one depth map per image (see vggt_fsdp/data/colmap.py); root itself may be the scene."""

    model_dir: str = "sparse/0"  # cameras/images/points3D .txt or .bin, relative to the scene folder
    image_dir: str = "images"  # image names in the model are relative to this
    # Depth map of an image: {name} is the image's name in the model, {stem} that name without its
    # extension. The extension picks the reader: .npy (float, metres), .pfm, or .png (16-bit, times
    # depth_scale). 0 or non-finite = unknown.
    depth_path: str = "depths/{stem}.npy"
    depth_scale: float = 1.0  # metres per unit of a 16-bit PNG depth map (e.g. 0.001 for millimetres)

    def validate(self, where: str = "data.colmap") -> None:
        if "{name}" not in self.depth_path and "{stem}" not in self.depth_path:
            raise ValueError(f"{where}.depth_path={self.depth_path!r} names no image: use {{name}} or {{stem}}")
        try:
            self.depth_path.format(name="image.jpg", stem="image")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"{where}.depth_path={self.depth_path!r}: {err!r}; only {{name}} and {{stem}} "
                             "may appear in braces") from None
        if not self.depth_path.endswith((".npy", ".pfm", ".png")):
            raise ValueError(f"{where}.depth_path={self.depth_path!r} must end in .npy, .pfm or .png")
        if not self.depth_scale > 0:
            raise ValueError(f"{where}.depth_scale={self.depth_scale} must be > 0")


@dataclass
class SourceConfig:
    """One data source: its format, where it lives, how its files are read and how its frames are
    drawn. The top level of `data:` is the single source of a recipe without `data.sources`; each
    entry of `data.sources` is one source of a mixture."""

    source: Source = "synthetic"
    root: Union[str, None] = None  # dataset folder; required for every source but synthetic
    name: Union[str, None] = None  # label in metrics.jsonl and reports; None: the `source` value
    # Samples of this source per epoch, as upstream's len_train (a mixture draws each source's
    # share from these lengths); None: its number of scenes, each visited once per epoch.
    epoch_length: Union[int, None] = None
    # data.sources only, instead of epoch_length: the source's share of a mixture's samples; the
    # epoch holds as many samples as all sources have scenes, split by these weights.
    weight: Union[float, None] = None
    # Where the source's intrinsics put the centre of pixel (u, v): "integer" at (u, v) (upstream's
    # training code, Virtual KITTI 2), "half" at (u + 0.5, v + 0.5); converted on read to the toolkit's
    # integer centres (see vggt_fsdp/geometry.py). None: the format's (colmap: half; others: integer).
    pixel_centre: Union[Literal["integer", "half"], None] = None
    # Real formats: a sample's frames lie in [a - w S, a + w S) around a random anchor frame a
    # (upstream's nearby sampling, expand_ratio 8) for frame_window w > 0, anywhere for 0.
    # None: the format's choice (co3d 0 and vkitti 8 as upstream; folder 8; colmap 0).
    frame_window: Union[int, None] = None
    # Whether a sample may repeat frames (upstream's allow_duplicate_img); false: distinct frames
    # while the range holds enough. None: the format's choice (co3d, vkitti: true as upstream;
    # folder, colmap: false).
    frame_replacement: Union[bool, None] = None
    # Fraction of scenes held out for validation where a source has no official split (vkitti, folder, colmap).
    val_fraction: float = 0.05
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    co3d: Co3dConfig = field(default_factory=Co3dConfig)
    vkitti: VKittiConfig = field(default_factory=VKittiConfig)
    colmap: ColmapConfig = field(default_factory=ColmapConfig)

    @property
    def label(self) -> str:
        return self.name or self.source

    def validate_source(self, where: str = "data") -> None:
        if self.source != "synthetic" and not self.root:
            raise ValueError(f"{where}.root is required for {where}.source={self.source!r}")
        if self.source == "synthetic":
            for key in ("root", "pixel_centre", "frame_window", "frame_replacement"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{where}.{key} does not apply to {where}.source='synthetic' (it renders "
                                     "its own scenes); remove it or choose a file source")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"{where}.name={self.name!r}: use letters, digits, '_', '-' and '.' "
                             "(it names metrics keys and preview files)")
        if self.epoch_length is not None and self.epoch_length < 1:
            raise ValueError(f"{where}.epoch_length={self.epoch_length} must be >= 1 (or null: its scene count)")
        if self.weight is not None and not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"{where}.weight={self.weight} must be a finite number > 0")
        if self.frame_window is not None and self.frame_window < 0:
            raise ValueError(f"{where}.frame_window={self.frame_window} must be >= 0 (0: anywhere in the sequence)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"{where}.val_fraction={self.val_fraction} must be in [0, 1)")
        self.synthetic.validate(f"{where}.synthetic")
        self.co3d.validate(f"{where}.co3d")
        self.vkitti.validate(f"{where}.vkitti")
        self.colmap.validate(f"{where}.colmap")


_SOURCE_FIELDS = [f.name for f in fields(SourceConfig)]


@dataclass
class DataConfig(SourceConfig):
    """The `data:` section: the source(s) (SourceConfig's fields at this level, or `sources`) and
    what all sources share: batch shapes, augmentation, bad-frame handling, loader workers."""

    # A mixture: several sources, each an entry with SourceConfig's keys. Empty: the single source
    # described by this section's own SourceConfig keys (source, root, co3d, ...).
    sources: list[SourceConfig] = field(default_factory=list)
    # Frames per scene S, drawn uniformly per batch from [lo, hi] (inclusive) as upstream.
    frames_range: list[int] = field(default_factory=lambda: [2, 24])
    # Frame budget per GPU and step: batch = floor(frames_per_gpu / S) scenes. "auto": the memory
    # planner picks it before training starts.
    frames_per_gpu: Union[int, Literal["auto"]] = 48
    aspect_range: list[float] = field(default_factory=lambda: [0.33, 1.0])  # height / width
    image_width: int = 518
    patch_size: int = 14  # heights are floor(width * aspect / patch_size) * patch_size
    # Real formats: frames are resized to this many pixels beyond the target size, then centre-cropped
    # to it (upstream's safe_bound, 4); applies to validation batches too.
    resize_margin: int = 4
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # A frame whose files are missing or malformed, or whose geometry is impossible (see
    # vggt_fsdp/data/checks.py), raises by default; with this set it is replaced by another frame of
    # its scene and counted per source (the loader's data_counts(), metrics.jsonl's "data").
    skip_bad_frames: bool = False
    num_workers: int = 2
    seed: int = 0

    def source_configs(self) -> list[SourceConfig]:
        """The sources this section describes: `sources`, or itself as the single source."""
        return list(self.sources) if self.sources else [self]

    def check_frame_budget(self, context_parallel: int = 1) -> None:
        """The largest scene must fit the frames of the GPUs holding it (a context group of
        `context_parallel`), and a context group needs scene lengths it can split evenly. Checked by the
        recipe, which knows parallel.context_parallel, and again by the sampler."""
        group = context_parallel
        if isinstance(self.frames_per_gpu, int) and self.frames_per_gpu * group < self.frames_range[1]:
            held = f"data.frames_per_gpu={self.frames_per_gpu}" + (f" x parallel.context_parallel={group}"
                                                                     if group > 1 else "")
            raise ValueError(f"{held} is smaller than data.frames_range[1]={self.frames_range[1]}: a batch of "
                             "the largest scenes would hold zero scenes")
        low, high = self.frames_range
        if group > 1 and high // group * group < low:
            raise ValueError(f"data.frames_range={self.frames_range} holds no multiple of "
                             f"parallel.context_parallel={group}: scenes split over {group} ranks have a "
                             f"multiple of {group} frames; widen the range")

    def validate(self) -> None:
        if self.sources:
            defaults = SourceConfig()
            for name in _SOURCE_FIELDS:
                if getattr(self, name) != getattr(defaults, name):
                    raise ValueError(f"data.{name} is set but data.sources lists the sources: move it into "
                                     "the entries of data.sources (each takes source, root, co3d, ...)")
            names: dict[str, int] = {}
            for i, entry in enumerate(self.sources):
                entry.validate_source(f"data.sources[{i}]")
                if entry.label in names:
                    raise ValueError(f"data.sources[{i}]: name {entry.label!r} is already data.sources"
                                     f"[{names[entry.label]}]'s; give each entry a distinct `name`")
                names[entry.label] = i
            weighted = [entry.weight is not None for entry in self.sources]
            if any(weighted) and not all(weighted):
                raise ValueError(f"data.sources[{weighted.index(False)}] has no weight but data.sources"
                                 f"[{weighted.index(True)}] has one: weight every entry, or none "
                                 "(epoch_length per entry)")
            if any(e.weight is not None and e.epoch_length is not None for e in self.sources):
                raise ValueError("a data.sources entry sets both weight and epoch_length: choose one")
        else:
            self.validate_source("data")
            if self.weight is not None:
                raise ValueError("data.weight only applies to entries of data.sources (a mixture)")
        _check_range("data.frames_range", self.frames_range, 1, 1024)
        _check_range("data.aspect_range", self.aspect_range, 0.05, 4.0)
        if not isinstance(self.frames_per_gpu, int) and self.frames_per_gpu != "auto":
            raise ValueError(f"data.frames_per_gpu={self.frames_per_gpu!r}: expected an int or 'auto'")
        if self.patch_size < 1:
            raise ValueError(f"data.patch_size={self.patch_size} must be >= 1")
        if self.image_width < self.patch_size or self.image_width % self.patch_size:
            raise ValueError(f"data.image_width={self.image_width} must be a positive multiple of "
                             f"data.patch_size={self.patch_size}")
        if int(self.image_width * self.aspect_range[0] / self.patch_size) < 1:
            raise ValueError(f"data.aspect_range[0]={self.aspect_range[0]} gives an image height of 0 "
                             f"at data.image_width={self.image_width}")
        if self.resize_margin < 0:
            raise ValueError(f"data.resize_margin={self.resize_margin} must be >= 0")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be >= 0")
        self.augment.validate()


def _check_range(name: str, value: list, lo: float, hi: float) -> None:
    """A [low, high] pair inside [lo, hi] with low <= high."""
    if len(value) != 2 or not (lo <= value[0] <= value[1] <= hi):
        raise ValueError(f"{name}={list(value)} must be [low, high] with {lo} <= low <= high <= {hi}")
