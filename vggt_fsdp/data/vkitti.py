"""Virtual KITTI 2 in its released layout, read as upstream VGGT does.

    <root>/<Scene>/<variation>/extrinsic.txt     header line, then "frame cameraID" + 16 numbers: the
                                                 row-major 4x4 camera-from-world matrix
    <root>/<Scene>/<variation>/intrinsic.txt     header line, then "frame cameraID fx fy cx cy"
    <root>/<Scene>/<variation>/frames/rgb/Camera_<k>/rgb_%05d.jpg
    <root>/<Scene>/<variation>/frames/depth/Camera_<k>/depth_%05d.png   16-bit, centimetres

A sequence is one camera of one variation (upstream's `*/*/*/rgb/*`; `<root>/sequence_list.txt`, if
present, lists them instead). Depth beyond vkitti.max_depth (80 m: the sky) is invalid. Scenes are
split train/val by a hash of their name (data.val_fraction), since the dataset has no official split.
A sample's frames are drawn with replacement from [a - 8 S, a + 8 S) around a random anchor a, as
upstream's VKittiDataset (get_nearby, expand_ratio 8). The intrinsics put pixel centres at integers
(cx = 620.5 = (1242 - 1) / 2), the toolkit's convention.
"""
from __future__ import annotations

from pathlib import Path

import torch

from vggt_fsdp.data.base import DataError, RawFrame
from vggt_fsdp.data.config import DataConfig, SourceConfig
from vggt_fsdp.data.files import FileSceneSource
from vggt_fsdp.data.io import read_bytes, read_rgb, read_uint16


class VKittiSource(FileSceneSource):
    DEFAULT_WINDOW = 8  # upstream: get_nearby with expand_ratio 8
    DEFAULT_REPLACEMENT = True  # upstream: get_nearby_ids draws with replacement

    def __init__(self, cfg: SourceConfig, data: DataConfig, split: str, strict: bool = True):
        super().__init__(cfg, data, "the Virtual KITTI 2 root", strict)
        self.max_depth = cfg.vkitti.max_depth
        listed = self.root / "sequence_list.txt"
        if listed.exists():
            names = [line.strip() for line in read_bytes(listed, "sequence names").decode().splitlines() if line.strip()]
        else:
            names = sorted(p.relative_to(self.root).as_posix() for p in self.root.glob("*/*/*/rgb/*") if p.is_dir())
        if not names:
            raise DataError(f"{self.root}: no <Scene>/<variation>/frames/rgb/Camera_<k> folders; "
                            "expected the Virtual KITTI 2 layout")
        self._cameras = self.load_split(names, split, cfg.val_fraction, self._load_cameras)
        self.frame_counts = [len(frames) for frames, _, _ in self._cameras]

    def _load_cameras(self, name: str):
        """(frame numbers, {frame: 3x4 extrinsics}, {frame: 3x3 intrinsics}) of one camera sequence."""
        if not name[-1].isdigit():
            raise DataError(f"{self.root / name}: sequence folder must end in its camera id (Camera_<k>)")
        camera = int(name[-1])
        variation = self.root / "/".join(name.split("/")[:2])
        extr = _table(variation / "extrinsic.txt", 18, camera, "frame cameraID and a row-major 4x4 matrix")
        intr = _table(variation / "intrinsic.txt", 6, camera, "frame cameraID fx fy cx cy")
        frames = sorted(extr)
        missing = [f for f in frames if f not in intr]
        if missing:
            raise DataError(f"{variation / 'intrinsic.txt'}: no row for camera {camera}, frame {missing[0]}")
        extrinsics = {f: torch.tensor(extr[f], dtype=torch.float32).reshape(4, 4)[:3] for f in frames}
        intrinsics = {}
        for f in frames:
            fx, fy, cx, cy = intr[f]
            intrinsics[f] = torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float32)
        return frames, extrinsics, intrinsics

    def read_frame(self, scene: int, frame: int) -> RawFrame:
        name = self.scene_names[scene]
        frames, extrinsics, intrinsics = self._cameras[scene]
        number = frames[frame]
        image_path = self.root / name / f"rgb_{number:05d}.jpg"
        image = read_rgb(image_path)
        depth_path = self.root / name.replace("/rgb", "/depth") / f"depth_{number:05d}.png"
        depth = torch.from_numpy(read_uint16(depth_path, "a 16-bit depth PNG in centimetres").astype("float32")) / 100
        if tuple(depth.shape) != tuple(image.shape[1:]):
            raise DataError(f"{depth_path}: size {tuple(depth.shape)} differs from its image's {tuple(image.shape[1:])}")
        valid = (depth > 0) & (depth <= self.max_depth)
        depth = torch.where(valid, depth, torch.zeros_like(depth))
        variation = self.root / "/".join(name.split("/")[:2])
        where = f"{variation}/{{extrinsic,intrinsic}}.txt camera {name[-1]} frame {number} ({image_path.name})"
        return RawFrame(image, depth, valid, extrinsics[number], intrinsics[number], where=where,
                        depth_file=str(depth_path))


def _table(path: Path, columns: int, camera: int, what: str) -> dict[int, list[float]]:
    """Rows of a whitespace table after its header, for one camera: {frame: the values after the ids}."""
    lines = read_bytes(path, f"a header line, then rows of {what}").decode().splitlines()[1:]
    rows = {}
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        try:
            values = [float(v) for v in line.split()]
        except ValueError:
            values = []
        if len(values) != columns:
            raise DataError(f"{path}:{number}: {line.strip()!r}; expected {columns} numbers: {what}")
        if int(values[1]) == camera:
            rows[int(values[0])] = values[2:]
    if not rows:
        raise DataError(f"{path}: no rows for camera {camera}; expected rows of {what}")
    return rows
