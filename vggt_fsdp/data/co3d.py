"""Co3Dv2 in upstream VGGT's preprocessed layout.

    <annotation_dir>/<category>_<train|test>.jgz    gzipped JSON {sequence: [{"filepath": str,
                                                     "extri": 3x4 OpenCV camera-from-world,
                                                     "intri": 3x3 pixels}, ...]}
    <root>/<filepath>                               e.g. apple/110_13051_23361/images/frame000001.jpg
    <root>/.../depths/<frame>.jpg.geometric.png     16-bit PNG whose samples are float16 bit patterns
    <root>/.../depth_masks/<frame>.png              8-bit mask, valid where > 128

Depth outside the mask or above the map's 98th percentile is dropped, as upstream. The validation
split reads the `test` annotation files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vggt_fsdp.data.base import DataError, FileSceneSource, RawFrame
from vggt_fsdp.data.config import DataConfig
from vggt_fsdp.data.io import as_matrix, read_json, read_mask, read_rgb, read_uint16

ANNOTATION = "upstream's Co3D annotation: gzipped JSON {sequence: [{filepath, extri, intri}, ...]}"


class Co3dSource(FileSceneSource):
    def __init__(self, cfg: DataConfig, split: str):
        super().__init__(cfg, "the Co3D image root")
        self.cfg = cfg.co3d
        anno_dir = Path(cfg.co3d.annotation_dir or cfg.root)
        split_name = "train" if split == "train" else "test"
        categories = cfg.co3d.categories
        if categories is None:
            suffix = f"_{split_name}.jgz"
            categories = sorted(p.name[: -len(suffix)] for p in anno_dir.glob(f"*{suffix}"))
            if not categories:
                raise DataError(f"{anno_dir}: no *{suffix} files; expected {ANNOTATION}")
        self.scene_names, self.frame_counts, self._frames, self._files = [], [], [], []
        for category in categories:
            path = anno_dir / f"{category}_{split_name}.jgz"
            annotation = read_json(path, ANNOTATION, gzipped=True)
            if not isinstance(annotation, dict):
                raise DataError(f"{path}: top level is {type(annotation).__name__}; expected {ANNOTATION}")
            for sequence, frames in annotation.items():
                if not isinstance(frames, list):
                    raise DataError(f"{path}: sequence {sequence!r} is not a list; expected {ANNOTATION}")
                if len(frames) < self.cfg.min_frames:
                    continue  # as upstream: short sequences cannot fill a 24-frame sample
                self.scene_names.append(f"{category}/{sequence}")
                self.frame_counts.append(len(frames))
                self._frames.append(frames)
                self._files.append(path)

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
        return RawFrame(image, depth, depth > 0, extrinsics, intrinsics)
