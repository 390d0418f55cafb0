"""The generic scene-folder format: what any pipeline can write to train on its own data.

    <root>/<scene>/scene.json
    {
      "depth_scale": 0.001,            # optional (default 1): metres per unit of 16-bit depth PNGs
      "frames": [
        {
          "image": "images/0000.png",  # PNG, or JPEG with the `real-data` extra (Pillow)
          "depth": "depth/0000.png",   # 16-bit PNG (times depth_scale), or .npy / .pfm float (H, W)
                                       # metres; 0 or non-finite = unknown
          "mask": "masks/0000.png",    # optional 8-bit PNG, valid where > 127
          "extrinsics": [[r11, r12, r13, t1], [r21, r22, r23, t2], [r31, r32, r33, t3]],
                                       # OpenCV camera-from-world, 3x4 (a 4x4 is accepted)
          "intrinsics": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]   # pixels; pixel (u, v) centred at
                                       # (u, v) (the source's pixel_centre: half for (u + 0.5, v + 0.5))
        }, ...
      ]
    }

Paths are relative to the scene folder. Every folder of root holding a scene.json is a scene; scenes
are split train/val by a hash of their name (data.val_fraction).
"""
from __future__ import annotations

import torch

from vggt_fsdp.data.base import DataError, RawFrame
from vggt_fsdp.data.config import DataConfig, SourceConfig
from vggt_fsdp.data.files import FileSceneSource
from vggt_fsdp.data.io import as_matrix, read_depth_file, read_json, read_mask, read_rgb

SCENE_FILE = "scene.json"
SCENE_FORMAT = "a scene.json as documented in vggt_fsdp/data/folder.py ({frames: [{image, depth, extrinsics, intrinsics}]})"


class FolderSource(FileSceneSource):
    def __init__(self, cfg: SourceConfig, data: DataConfig, split: str, strict: bool = True):
        super().__init__(cfg, data, f"folders with a {SCENE_FILE}", strict)
        names = sorted(p.parent.name for p in self.root.glob(f"*/{SCENE_FILE}"))
        if not names:
            raise DataError(f"{self.root}: no <scene>/{SCENE_FILE}; expected {SCENE_FORMAT}")
        self._scenes = self.load_split(names, split, cfg.val_fraction, self._load)
        self.frame_counts = [len(scene["frames"]) for scene in self._scenes]

    def _load(self, name: str) -> dict:
        path = self.root / name / SCENE_FILE
        scene = read_json(path, SCENE_FORMAT)
        frames = scene.get("frames") if isinstance(scene, dict) else None
        if not isinstance(frames, list) or not frames:
            raise DataError(f"{path}: no non-empty 'frames' list; expected {SCENE_FORMAT}")
        scale = scene.get("depth_scale", 1.0)
        if not isinstance(scale, (int, float)) or scale <= 0:
            raise DataError(f"{path}: depth_scale={scale!r}; expected a positive number")
        return scene

    def read_frame(self, scene: int, frame: int) -> RawFrame:
        folder = self.root / self.scene_names[scene]
        entry = self._scenes[scene]["frames"][frame]
        where = f"{folder / SCENE_FILE} frames[{frame}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: not an object; expected {SCENE_FORMAT}")
        for key in ("image", "depth", "extrinsics", "intrinsics"):
            if key not in entry:
                raise DataError(f"{where}: missing {key!r}; expected {SCENE_FORMAT}")
        image = read_rgb(folder / entry["image"])
        depth_path = folder / entry["depth"]
        depth = read_depth_file(depth_path, self._scenes[scene].get("depth_scale", 1.0))
        mask = read_mask(folder / entry["mask"], 127) if entry.get("mask") else torch.ones_like(depth, dtype=torch.bool)
        for what, shape in (("depth", depth.shape), ("mask", mask.shape)):
            if tuple(shape) != tuple(image.shape[1:]):
                raise DataError(f"{where}: {what} size {tuple(shape)} differs from the image's {tuple(image.shape[1:])}")
        valid = mask & torch.isfinite(depth) & (depth > 0)
        depth = torch.where(valid, depth, torch.zeros_like(depth))
        extr = entry["extrinsics"]
        rows = 4 if isinstance(extr, list) and len(extr) == 4 else 3
        extrinsics = as_matrix(extr, (rows, 4), f"{where} 'extrinsics'")[:3]
        intrinsics = as_matrix(entry["intrinsics"], (3, 3), f"{where} 'intrinsics'")
        return RawFrame(image, depth, valid, extrinsics, intrinsics, where=where, depth_file=str(depth_path))
