"""COLMAP scenes: a sparse model plus one depth map per image (DL3DV, MegaDepth, BlendedMVS, ETH3D
and ScanNet++ exports come this way).

    <root>/<scene>/<colmap.model_dir>/cameras.{bin,txt}, images.{bin,txt}, points3D.{bin,txt}
    <root>/<scene>/<colmap.image_dir>/<image name>
    <root>/<scene>/<colmap.depth_path with {name} / {stem} of the image name>   .npy, .pfm or 16-bit .png

Every folder of root holding a model is a scene (root itself may be the only one); scenes are split
train/val by a hash of their name (data.val_fraction). A scene's frames are its registered images in
name order. Cameras must be undistorted PINHOLE or SIMPLE_PINHOLE (`colmap image_undistorter` writes
them); any other model is refused, since the toolkit's unprojection has no distortion terms. COLMAP
puts pixel centres at half-integers, so `pixel_centre` defaults to "half" here (converted on read).
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

import torch

from vggt_fsdp.data.base import DataError, RawFrame
from vggt_fsdp.data.colmap_model import Camera, Image, model_files, read_cameras, read_images, read_points3d
from vggt_fsdp.data.config import DataConfig, SourceConfig
from vggt_fsdp.data.files import FileSceneSource
from vggt_fsdp.data.io import read_depth_file, read_rgb
from vggt_fsdp.geometry import make_intrinsics, quat_to_rotation

SUPPORTED_MODELS = ("PINHOLE", "SIMPLE_PINHOLE")


class ColmapSource(FileSceneSource):
    DEFAULT_WINDOW = 0  # an image collection: any images of the scene
    DEFAULT_REPLACEMENT = False
    DEFAULT_PIXEL_CENTRE = "half"  # COLMAP's convention

    def __init__(self, cfg: SourceConfig, data: DataConfig, split: str, strict: bool = True):
        super().__init__(cfg, data, f"scene folders holding a COLMAP model in {cfg.colmap.model_dir}/", strict)
        self.cfg = cfg.colmap
        if model_files(self.root / self.cfg.model_dir) is not None:
            names = ["."]
        else:
            names = sorted(p.name for p in self.root.iterdir()
                           if p.is_dir() and model_files(p / self.cfg.model_dir) is not None)
        if not names:
            raise DataError(f"{self.root}: no <scene>/{self.cfg.model_dir}/cameras.bin or cameras.txt; expected "
                            "scene folders holding a COLMAP model (data.colmap.model_dir)")
        self._scenes = self.load_split(names, split, cfg.val_fraction, self._load)
        self.frame_counts = [len(images) for _, images, _ in self._scenes]
        self._points: tuple[int, dict[int, torch.Tensor] | None] | None = None  # one scene's, see observed_points

    def _load(self, name: str) -> tuple[dict[int, Camera], list[Image], Path]:
        """(cameras, registered images in name order, the model's cameras file) of one scene."""
        _, cameras_file, images_file, _ = model_files(self.root / name / self.cfg.model_dir)
        cameras, images = read_cameras(cameras_file), read_images(images_file)
        ordered = sorted(images.values(), key=lambda image: image.name)
        if not ordered:
            raise DataError(f"{images_file}: no registered images")
        for image in ordered:
            camera = cameras.get(image.camera_id)
            if camera is None:
                raise DataError(f"{images_file}: image {image.name!r} uses camera {image.camera_id}, which "
                                f"{cameras_file} does not define")
            if camera.model not in SUPPORTED_MODELS:
                raise DataError(f"{cameras_file}: camera {camera.id} is {camera.model}; only undistorted "
                                f"{' and '.join(SUPPORTED_MODELS)} cameras are read (distortion is not modelled): "
                                "undistort the model first, e.g. `colmap image_undistorter --image_path IMAGES "
                                "--input_path SPARSE --output_path OUT`")
        return cameras, ordered, images_file

    def read_frame(self, scene: int, frame: int) -> RawFrame:
        folder = self.root / self.scene_names[scene]
        cameras, images, images_file = self._scenes[scene]
        image = images[frame]
        camera = cameras[image.camera_id]
        where = f"{images_file} image {image.id} ({image.name})"
        pixels = read_rgb(folder / self.cfg.image_dir / image.name)
        if tuple(pixels.shape[1:]) != (camera.height, camera.width):
            raise DataError(f"{folder / self.cfg.image_dir / image.name}: {pixels.shape[2]}x{pixels.shape[1]} "
                            f"pixels but its camera {camera.id} is {camera.width}x{camera.height}: intrinsics "
                            "for another image size")
        stem = str(PurePosixPath(image.name).with_suffix(""))
        depth_path = folder / self.cfg.depth_path.format(name=image.name, stem=stem)
        depth = read_depth_file(depth_path, self.cfg.depth_scale)
        if tuple(depth.shape) != tuple(pixels.shape[1:]):
            raise DataError(f"{depth_path}: size {tuple(depth.shape)} differs from its image's {tuple(pixels.shape[1:])}")
        valid = torch.isfinite(depth) & (depth > 0)
        depth = torch.where(valid, depth, torch.zeros_like(depth))
        qw, qx, qy, qz = image.qvec
        rotation = quat_to_rotation(torch.tensor([qx, qy, qz, qw], dtype=torch.float64))
        extrinsics = torch.cat([rotation, torch.tensor(image.tvec, dtype=torch.float64)[:, None]], -1)
        return RawFrame(pixels, depth, valid, extrinsics.float(), _intrinsics(camera), where=where,
                        depth_file=str(depth_path))


    def observed_points(self, scene: int, frame: int) -> torch.Tensor | None:
        """World points (N, 3) of the model's points3D that the frame's image observes, or None when
        the model has no points3D file: `data check` compares the depth maps with them. Only the
        latest scene's points are kept (the check reads scene by scene)."""
        if self._points is None or self._points[0] != scene:
            *_, points_file = model_files(self.root / self.scene_names[scene] / self.cfg.model_dir)
            table = None
            if points_file.is_file():
                by_image: dict[int, list] = {}
                for point in read_points3d(points_file).values():
                    for image_id in set(point.image_ids):
                        by_image.setdefault(image_id, []).append(point.xyz)
                table = {k: torch.tensor(v, dtype=torch.float64) for k, v in by_image.items()}
            self._points = (scene, table)
        table = self._points[1]
        if table is None:
            return None
        return table.get(self._scenes[scene][1][frame].id, torch.zeros(0, 3, dtype=torch.float64))


def _intrinsics(camera: Camera) -> torch.Tensor:
    if camera.model == "SIMPLE_PINHOLE":
        f, cx, cy = camera.params
        fx = fy = f
    else:
        fx, fy, cx, cy = camera.params
    values = [torch.tensor(v, dtype=torch.float64) for v in (fx, fy, cx, cy)]
    return make_intrinsics(*values).float()
