"""Small datasets written in each on-disk format from scenes of the synthetic world (known geometry),
for the data tests. JPEG files need Pillow (the `real-data` extra); without it PNG bytes are stored
under the .jpg names (the readers identify images by content, as OpenCV does upstream).

`intrinsics` passed to a writer are stored as given: pass `half_pixel(intr)` to write a dataset in
the half-pixel-centre convention.
"""
from __future__ import annotations

import gzip
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vggt_fsdp.data.config import SyntheticConfig
from vggt_fsdp.data.png import encode_png
from vggt_fsdp.data.synthetic import Scene, draw_cameras, make_scene, render
from vggt_fsdp.geometry import rotation_to_quat

try:
    from PIL import Image
except ImportError:
    Image = None


@dataclass
class World:
    scene: Scene
    extrinsics: torch.Tensor  # (S, 3, 4)
    intrinsics: torch.Tensor  # (S, 3, 3), integer pixel centres (the renderer's convention)
    views: list  # per frame: image (3, H, W), depth (H, W), mask (H, W), world points (H, W, 3)


def render_world(seed: int, frames: int, hw: tuple[int, int], open_top: bool = True) -> World:
    cfg = SyntheticConfig()
    scene = make_scene(seed, 0, cfg)
    scene.open_top = open_top  # sky pixels: invalid depth for the loaders to mask
    extr, intr = draw_cameras(scene, np.random.default_rng(seed), frames, hw, cfg.fov_range_deg)
    return World(scene, extr, intr, [render(scene, e, k, hw) for e, k in zip(extr, intr)])


def half_pixel(intrinsics: torch.Tensor) -> torch.Tensor:
    """The same cameras written with pixel (u, v) centred at (u + 0.5, v + 0.5)."""
    out = intrinsics.clone()
    out[..., 0, 2] += 0.5
    out[..., 1, 2] += 0.5
    return out


def image_tolerance() -> float:
    """Mean absolute difference allowed between a written .jpg and its image."""
    return 0.08 if Image is not None else 1 / 255 + 1e-6


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(array))


def write_jpg(path: Path, image: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if Image is not None:
        Image.fromarray(to_uint8(image)).save(path, format="JPEG", quality=95)
    else:
        path.write_bytes(encode_png(to_uint8(image)))


def write_pfm(path: Path, depth: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = depth.shape
    path.write_bytes(f"Pf\n{width} {height}\n-1.0\n".encode() + depth[::-1].astype("<f4").tobytes())


# ---------------------------------------------------------------------------------------------- Co3D
CO3D_SEQUENCE = "110_13051_23361"


def write_co3d(root: Path, world: World, intrinsics: torch.Tensor | None = None, category: str = "apple",
               mask_band: bool = True) -> Path:
    """Upstream's Co3D layout; returns the annotation folder. With mask_band the depth masks reject a
    4-pixel band at the left although depth exists there."""
    intrinsics = world.intrinsics if intrinsics is None else intrinsics
    entries = []
    for i, (image, depth, mask, _) in enumerate(world.views):
        rel = f"{category}/{CO3D_SEQUENCE}/images/frame{i + 1:06d}.jpg"
        write_jpg(root / rel, image)
        bits = depth.numpy().astype(np.float16).view(np.uint16)
        write_png(root / f"{category}/{CO3D_SEQUENCE}/depths/frame{i + 1:06d}.jpg.geometric.png", bits)
        written_mask = mask.numpy().copy()
        if mask_band:
            written_mask[:, :4] = False
        write_png(root / f"{category}/{CO3D_SEQUENCE}/depth_masks/frame{i + 1:06d}.png",
                  np.where(written_mask, 255, 0).astype(np.uint8))
        entries.append({"filepath": rel, "extri": world.extrinsics[i].tolist(), "intri": intrinsics[i].tolist()})
    anno = root / "annotations"
    anno.mkdir(exist_ok=True)
    for split in ("train", "test"):
        with gzip.open(anno / f"{category}_{split}.jgz", "wt") as f:
            json.dump({CO3D_SEQUENCE: entries}, f)
    return anno


# ---------------------------------------------------------------------------------------------- VKitti2
EXTR_HEADER = "frame cameraID r1,1 r1,2 r1,3 t1 r2,1 r2,2 r2,3 t2 r3,1 r3,2 r3,3 t3 0 0 0 1"
INTR_HEADER = "frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]"


def write_vkitti(root: Path, world: World, intrinsics: torch.Tensor | None = None, sky_band: bool = True) -> Path:
    """The released Virtual KITTI 2 layout (Scene01/clone, Camera_0 images); returns the variation
    folder. With sky_band the top 3 rows hold the sky value (655.35 m) whatever the view sees."""
    intrinsics = world.intrinsics if intrinsics is None else intrinsics
    variation = root / "Scene01" / "clone"
    extr_rows, intr_rows = [EXTR_HEADER], [INTR_HEADER]
    for i, (image, depth, mask, _) in enumerate(world.views):
        for camera in (0, 1):  # both stereo cameras, as the files hold; only Camera_0 has images here
            m = torch.cat([world.extrinsics[i], torch.tensor([[0.0, 0, 0, 1]])]).flatten().tolist()
            extr_rows.append(" ".join([str(i), str(camera)] + [repr(v) for v in m]))
            k = intrinsics[i]
            intr_rows.append(" ".join([str(i), str(camera)] + [repr(float(v)) for v in (k[0, 0], k[1, 1], k[0, 2], k[1, 2])]))
        write_jpg(variation / "frames/rgb/Camera_0" / f"rgb_{i:05d}.jpg", image)
        sky = ~mask.numpy()
        if sky_band:
            sky[:3] = True
        cm = np.where(sky, 65535, np.round(depth.numpy() * 100)).astype(np.uint16)
        write_png(variation / "frames/depth/Camera_0" / f"depth_{i:05d}.png", cm)
    (variation / "extrinsic.txt").write_text("\n".join(extr_rows) + "\n")
    (variation / "intrinsic.txt").write_text("\n".join(intr_rows) + "\n")
    return variation


# ---------------------------------------------------------------------------------------------- folder
def write_folder(root: Path, world: World, intrinsics: torch.Tensor | None = None, scene: str = "my_scene",
                 depth_kinds: tuple[str, ...] = ("png", "npy")) -> Path:
    """The generic scene-folder format; frame i's depth is depth_kinds[i % len]: "png" (16-bit,
    millimetres), "npy" (float32 metres, NaN where unknown) or "pfm". Returns the scene folder."""
    intrinsics = world.intrinsics if intrinsics is None else intrinsics
    folder = root / scene
    frames = []
    for i, (image, depth, mask, _) in enumerate(world.views):
        write_png(folder / f"images/{i:04d}.png", to_uint8(image))
        kind = depth_kinds[i % len(depth_kinds)]
        metres = np.where(mask.numpy(), depth.numpy(), np.nan).astype(np.float32)
        depth_file = f"depth/{i:04d}.{kind}"
        (folder / "depth").mkdir(parents=True, exist_ok=True)
        if kind == "npy":
            np.save(folder / depth_file, metres)
        elif kind == "pfm":
            write_pfm(folder / depth_file, metres)
        else:
            write_png(folder / depth_file, np.round(depth.numpy() * 1000).astype(np.uint16))  # mm
        frames.append({"image": f"images/{i:04d}.png", "depth": depth_file,
                       "extrinsics": world.extrinsics[i].tolist(), "intrinsics": intrinsics[i].tolist()})
    (folder / "scene.json").write_text(json.dumps({"depth_scale": 0.001, "frames": frames}))
    return folder


# ---------------------------------------------------------------------------------------------- COLMAP
def write_colmap(root: Path, world: World, intrinsics: torch.Tensor | None = None, binary: bool = False,
                 depth_kind: str = "npy", scene: str = "scene_a", model: str = "PINHOLE",
                 points: int = 50) -> Path:
    """A COLMAP scene: sparse/0 (text or binary) with one camera per image, images/<name>.png and
    depths/<stem>.<depth_kind> ("npy", "pfm" or "png": 16-bit millimetres); points3D holds `points`
    surface points of frame 0. Returns the scene folder. Default intrinsics: COLMAP's half-pixel
    centres."""
    intrinsics = half_pixel(world.intrinsics) if intrinsics is None else intrinsics
    folder = root / scene
    cameras, images = [], []
    for i, (image, depth, mask, _) in enumerate(world.views):
        name = f"frame_{i:03d}.png"
        write_png(folder / "images" / name, to_uint8(image))
        metres = np.where(mask.numpy(), depth.numpy(), 0).astype(np.float32)
        path = folder / "depths" / f"frame_{i:03d}.{depth_kind}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if depth_kind == "npy":
            np.save(path, metres)
        elif depth_kind == "pfm":
            write_pfm(path, metres)
        else:
            write_png(path, np.round(metres * 1000).astype(np.uint16))
        k = intrinsics[i].double()
        height, width = depth.shape
        params = {"PINHOLE": (k[0, 0], k[1, 1], k[0, 2], k[1, 2]), "SIMPLE_PINHOLE": (k[0, 0], k[0, 2], k[1, 2]),
                  "OPENCV": (k[0, 0], k[1, 1], k[0, 2], k[1, 2], 0.0, 0.0, 0.0, 0.0)}[model]
        cameras.append((i + 1, model, width, height, [float(p) for p in params]))
        x, y, z, w = rotation_to_quat(world.extrinsics[i, :, :3].double()).tolist()
        images.append((i + 1, (w, x, y, z), world.extrinsics[i, :, 3].double().tolist(), i + 1, name))
    _, _, mask0, points0 = world.views[0]
    surface = points0[mask0][:: max(1, int(mask0.sum()) // points)][:points].double().tolist()
    point_rows = [(j + 1, xyz, (128, 128, 128), 0.5, [1]) for j, xyz in enumerate(surface)]
    (_write_model_bin if binary else _write_model_txt)(folder / "sparse/0", cameras, images, point_rows)
    return folder


_MODEL_IDS = {"SIMPLE_PINHOLE": 0, "PINHOLE": 1, "OPENCV": 4}


def _write_model_txt(model_dir: Path, cameras, images, points) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Camera list with one line of data per camera:", "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]"]
    lines += [" ".join([str(c), m, str(w), str(h)] + [repr(p) for p in params]) for c, m, w, h, params in cameras]
    (model_dir / "cameras.txt").write_text("\n".join(lines) + "\n")
    lines = ["# Image list with two lines of data per image:",
             "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME", "#   POINTS2D[] as (X, Y, POINT3D_ID)"]
    for image_id, q, t, camera_id, name in images:
        lines.append(" ".join([str(image_id)] + [repr(v) for v in (*q, *t)] + [str(camera_id), name]))
        lines.append("12.5 3.25 -1 4.0 5.0 1")  # two 2-D points, one of them observing point 1
    (model_dir / "images.txt").write_text("\n".join(lines) + "\n")
    lines = ["# 3D point list with one line of data per point:",
             "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)"]
    for point_id, xyz, rgb, error, track in points:
        lines.append(" ".join([str(point_id)] + [repr(v) for v in xyz] + [str(v) for v in rgb] + [repr(error)]
                              + [f"{image_id} 1" for image_id in track]))
    (model_dir / "points3D.txt").write_text("\n".join(lines) + "\n")


def _write_model_bin(model_dir: Path, cameras, images, points) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    out = struct.pack("<Q", len(cameras))
    for camera_id, model, width, height, params in cameras:
        out += struct.pack("<iiQQ", camera_id, _MODEL_IDS[model], width, height) + struct.pack(f"<{len(params)}d", *params)
    (model_dir / "cameras.bin").write_bytes(out)
    out = struct.pack("<Q", len(images))
    for image_id, q, t, camera_id, name in images:
        out += struct.pack("<idddddddi", image_id, *q, *t, camera_id) + name.encode() + b"\0"
        out += struct.pack("<Q", 2) + struct.pack("<ddq", 12.5, 3.25, -1) + struct.pack("<ddq", 4.0, 5.0, 1)
    (model_dir / "images.bin").write_bytes(out)
    out = struct.pack("<Q", len(points))
    for point_id, xyz, rgb, error, track in points:
        out += struct.pack("<QdddBBBd", point_id, *xyz, *rgb, error) + struct.pack("<Q", len(track))
        out += b"".join(struct.pack("<ii", image_id, 1) for image_id in track)
    (model_dir / "points3D.bin").write_bytes(out)
