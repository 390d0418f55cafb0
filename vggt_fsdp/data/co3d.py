"""Co3Dv2 in upstream VGGT's preprocessed layout, sampled as upstream trains on it.

    <annotation_dir>/<category>_<train|test>.jgz    gzipped JSON {sequence: [{"filepath": str,
                                                     "extri": 3x4 OpenCV camera-from-world,
                                                     "intri": 3x3 pixels}, ...]}
    <root>/<filepath>                               e.g. apple/110_13051_23361/images/frame000001.jpg
    <root>/.../depths/<frame>.jpg.geometric.png     16-bit PNG whose samples are float16 bit patterns
    <root>/.../depth_masks/<frame>.png              8-bit mask, valid where > 128

Depth outside the mask or above the map's 98th percentile is dropped, as upstream. The validation
split reads the `test` annotation files. By default only upstream's 41 "seen" training categories are
read (training/data/datasets/co3d.py at facebookresearch/vggt), and a sample's frames are drawn from
the whole sequence with replacement, as upstream's Co3dDataset.get_data does. Whether the
annotations put pixel centres at integers or half-integers is not settled (upstream trained with
integer centres, the default); `pixel_centre: half` reads them the other way.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from vggt_fsdp.data.base import DataError, RawFrame
from vggt_fsdp.data.config import DataConfig, SourceConfig
from vggt_fsdp.data.files import FileSceneSource
from vggt_fsdp.data.io import as_matrix, read_json, read_mask, read_rgb, read_uint16

ANNOTATION = "upstream's Co3D annotation: gzipped JSON {sequence: [{filepath, extri, intri}, ...]}"

SEEN_CATEGORIES = (
    "apple", "backpack", "banana", "baseballbat", "baseballglove", "bench", "bicycle", "bottle", "bowl",
    "broccoli", "cake", "car", "carrot", "cellphone", "chair", "cup", "donut", "hairdryer", "handbag",
    "hydrant", "keyboard", "laptop", "microwave", "motorcycle", "mouse", "orange", "parkingmeter", "pizza",
    "plant", "stopsign", "teddybear", "toaster", "toilet", "toybus", "toyplane", "toytrain", "toytruck",
    "tv", "umbrella", "vase", "wineglass",
)


class Co3dSource(FileSceneSource):
    DEFAULT_WINDOW = 0  # upstream: frames from the whole sequence
    DEFAULT_REPLACEMENT = True  # upstream: np.random.choice(..., replace=allow_duplicate_img=True)

    def __init__(self, cfg: SourceConfig, data: DataConfig, split: str, strict: bool = True):
        super().__init__(cfg, data, "the Co3D image root", strict)
        self.cfg = cfg.co3d
        self.anno_dir = Path(cfg.co3d.annotation_dir or cfg.root)
        self.split_name = "train" if split == "train" else "test"
        categories = self._categories(cfg.co3d.categories)
        self.scene_names, self.frame_counts, self._frames, self._files = [], [], [], []
        for category, sequences in self.load_scenes(categories, self._load_category):
            for sequence, frames in sequences:
                self.scene_names.append(f"{category}/{sequence}")
                self.frame_counts.append(len(frames))
                self._frames.append(frames)
                self._files.append(self._annotation(category))

    def _annotation(self, category: str) -> Path:
        return self.anno_dir / f"{category}_{self.split_name}.jgz"

    def _categories(self, chosen) -> list[str]:
        suffix = f"_{self.split_name}.jgz"
        if chosen == "all":
            found = sorted(p.name[: -len(suffix)] for p in self.anno_dir.glob(f"*{suffix}"))
            if not found:
                raise DataError(f"{self.anno_dir}: no *{suffix} files; expected {ANNOTATION}")
            return found
        if chosen != "seen":
            return list(chosen)  # named explicitly: each must exist (read errors name the missing file)
        present = [c for c in SEEN_CATEGORIES if self._annotation(c).is_file()]
        if not present:
            raise DataError(f"{self.anno_dir}: none of upstream's {len(SEEN_CATEGORIES)} seen Co3D categories has "
                            f"a <category>{suffix} file (co3d.categories: seen); expected {ANNOTATION}, or set "
                            "co3d.categories to 'all' or a list")
        absent = [c for c in SEEN_CATEGORIES if c not in present]
        if absent:
            logging.getLogger(__name__).warning(
                "Co3D source %r: %d of upstream's %d seen categories have no %s annotation in %s and are "
                "skipped: %s", self.label, len(absent), len(SEEN_CATEGORIES), self.split_name, self.anno_dir,
                ", ".join(absent))
        return present

    def _load_category(self, category: str) -> list[tuple[str, list]]:
        path = self._annotation(category)
        annotation = read_json(path, ANNOTATION, gzipped=True)
        if not isinstance(annotation, dict):
            raise DataError(f"{path}: top level is {type(annotation).__name__}; expected {ANNOTATION}")
        sequences = []
        for sequence, frames in annotation.items():
            if not isinstance(frames, list):
                raise DataError(f"{path}: sequence {sequence!r} is not a list; expected {ANNOTATION}")
            if len(frames) >= self.cfg.min_frames:  # as upstream: short sequences cannot fill a 24-frame sample
                sequences.append((sequence, frames))
        return sequences

    def read_frame(self, scene: int, frame: int) -> RawFrame:
        entry = self._frames[scene][frame]
        where = f"{self._files[scene]} [{self.scene_names[scene].split('/', 1)[1]!r}][{frame}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("filepath"), str):
            raise DataError(f"{where}: no 'filepath' string; expected {ANNOTATION}")
        rel = entry["filepath"]
        image = read_rgb(self.root / rel)
        depth_path = self.root / (rel.replace("/images", "/depths") + ".geometric.png")
        bits = read_uint16(depth_path, "a 16-bit PNG holding float16 depth bits")
        depth = torch.from_numpy(bits.view(np.float16).astype(np.float32))
        mask_path = self.root / rel.replace("/images", "/depth_masks").replace(".jpg", ".png")
        mask = read_mask(mask_path, self.cfg.mask_threshold)
        for path, shape in ((depth_path, depth.shape), (mask_path, mask.shape)):
            if tuple(shape) != tuple(image.shape[1:]):
                raise DataError(f"{path}: size {tuple(shape)} differs from its image's {tuple(image.shape[1:])}")
        depth = torch.where(mask & torch.isfinite(depth), depth, torch.zeros_like(depth))
        cut = float(np.percentile(depth.numpy(), self.cfg.depth_max_percentile))
        if cut > 0:
            depth = torch.where(depth > cut, torch.zeros_like(depth), depth)
        extrinsics = as_matrix(entry.get("extri"), (3, 4), f"{where} 'extri'")
        intrinsics = as_matrix(entry.get("intri"), (3, 3), f"{where} 'intri'")
        return RawFrame(image, depth, depth > 0, extrinsics, intrinsics, where=where, depth_file=str(depth_path))
