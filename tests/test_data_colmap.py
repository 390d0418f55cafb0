"""The colmap source: COLMAP models (text and binary) plus depth maps, written from synthetic scenes."""
import struct

import numpy as np
import pytest
import torch

from data_writers import half_pixel, render_world, write_colmap
from vggt_fsdp.data import DataConfig, DataError, build_source
from vggt_fsdp.data.colmap_model import model_files, read_cameras, read_images, read_points3d

HW = (24, 32)


@pytest.fixture(scope="module")
def world():
    return render_world(5, 3, HW, open_top=False)


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(source="colmap", root=str(root), val_fraction=0.0, **kw)


def test_text_and_binary_models_read_the_same(tmp_path, world):
    text = write_colmap(tmp_path / "t", world, binary=False)
    binary = write_colmap(tmp_path / "b", world, binary=True)
    models = []
    for folder in (text, binary):
        kind, cameras, images, points = model_files(folder / "sparse/0")
        models.append((kind, read_cameras(cameras), read_images(images), read_points3d(points)))
    (kind_t, cams_t, ims_t, pts_t), (kind_b, cams_b, ims_b, pts_b) = models
    assert (kind_t, kind_b) == ("txt", "bin")
    assert cams_t == cams_b and ims_t == ims_b and pts_t == pts_b
    assert [im.name for im in ims_t.values()] == ["frame_000.png", "frame_001.png", "frame_002.png"]
    assert cams_t[1].model == "PINHOLE" and (cams_t[1].width, cams_t[1].height) == (HW[1], HW[0])
    assert len(pts_t) == 50 and pts_t[1].image_ids == (1,) and pts_t[1].rgb == (128, 128, 128)
    # the points are surface points of frame 0, in world coordinates
    _, _, mask0, points0 = world.views[0]
    assert torch.allclose(torch.tensor(pts_t[1].xyz, dtype=torch.float64), points0[mask0][0].double(), atol=1e-6)


@pytest.mark.parametrize("binary", [False, True])
def test_frames_convert_colmap_poses_and_half_pixel_intrinsics(tmp_path, world, binary):
    write_colmap(tmp_path, world, binary=binary)
    source = build_source(_cfg(tmp_path), "train")
    assert source.scene_names == ["scene_a"] and source.frame_counts == [3] and source.pixel_centre == "half"
    for i in range(3):
        frame = source.load_frame(0, i)
        assert torch.allclose(frame.extrinsics, world.extrinsics[i], atol=1e-6)
        assert torch.allclose(frame.intrinsics, world.intrinsics[i], atol=1e-5)  # back to integer centres
        _, depth, mask, _ = world.views[i]
        assert torch.equal(frame.mask, mask) and torch.allclose(frame.depth[mask], depth[mask])


def test_simple_pinhole_and_a_root_that_is_itself_the_scene(tmp_path, world):
    square = world.intrinsics.clone()
    square[:, 1, 1] = square[:, 0, 0]  # SIMPLE_PINHOLE has one focal length
    folder = write_colmap(tmp_path, world, intrinsics=half_pixel(square), model="SIMPLE_PINHOLE", scene=".")
    source = build_source(_cfg(folder), "train")
    assert source.scene_names == ["."]
    assert torch.allclose(source.load_frame(0, 1).intrinsics, square[1], atol=1e-5)


@pytest.mark.parametrize("binary", [False, True])
def test_distorted_cameras_are_refused_with_the_fix(tmp_path, world, binary):
    write_colmap(tmp_path, world, binary=binary, model="OPENCV")
    with pytest.raises(DataError, match=r"cameras\.(bin|txt): camera 1 is OPENCV; only undistorted PINHOLE and "
                                        r"SIMPLE_PINHOLE cameras are read .*colmap image_undistorter"):
        build_source(_cfg(tmp_path), "train")


# (what is broken, how, the error's words)
BROKEN_MODELS = [
    ("truncated images.bin", lambda d: (d / "images.bin").write_bytes((d / "images.bin").read_bytes()[:-20]),
     r"images\.bin: truncated at byte"),
    ("trailing bytes", lambda d: (d / "cameras.bin").write_bytes((d / "cameras.bin").read_bytes() + b"\0\0"),
     r"cameras\.bin: 2 bytes after the last record"),
    ("unknown model id", lambda d: (d / "cameras.bin").write_bytes(
        (d / "cameras.bin").read_bytes()[:12] + struct.pack("<i", 99) + (d / "cameras.bin").read_bytes()[16:]),
     r"cameras\.bin: camera 1 has unknown model id 99"),
    ("image without camera", lambda d: (d / "cameras.bin").write_bytes(struct.pack("<Q", 0)),
     r"images\.bin: image 'frame_000.png' uses camera 1, which .*cameras\.bin does not define"),
]


@pytest.mark.parametrize("name, damage, message", BROKEN_MODELS, ids=[case[0] for case in BROKEN_MODELS])
def test_broken_binary_models_name_the_file(tmp_path, world, name, damage, message):
    folder = write_colmap(tmp_path, world, binary=True)
    damage(folder / "sparse/0")
    with pytest.raises(DataError, match=message):
        build_source(_cfg(tmp_path), "train")


def test_malformed_text_lines_and_missing_files_are_named(tmp_path, world):
    folder = write_colmap(tmp_path, world, binary=False)
    cameras = folder / "sparse/0/cameras.txt"
    lines = cameras.read_text().splitlines()
    cameras.write_text("\n".join(lines[:2] + ["1 PINHOLE 32 24 100.0"] + lines[3:]) + "\n")
    with pytest.raises(DataError, match=r"cameras.txt:3: PINHOLE takes 4 parameters, got 1"):
        build_source(_cfg(tmp_path), "train")
    cameras.write_text("\n".join(lines) + "\n")
    (folder / "depths/frame_001.npy").unlink()
    with pytest.raises(DataError, match=r"frame_001\.npy: file not found"):
        build_source(_cfg(tmp_path), "train").load_frame(0, 1)


def test_image_size_must_match_its_camera(tmp_path, world):
    folder = write_colmap(tmp_path, world, binary=False)
    cameras = folder / "sparse/0/cameras.txt"
    cameras.write_text(cameras.read_text().replace(f"PINHOLE {HW[1]} {HW[0]}", f"PINHOLE {2 * HW[1]} {2 * HW[0]}"))
    with pytest.raises(DataError, match=r"frame_000.png: 32x24 pixels but its camera 1 is 64x48: intrinsics for "
                                        r"another image size"):
        build_source(_cfg(tmp_path), "train").load_frame(0, 0)


def test_depth_path_patterns_and_png_scale(tmp_path, world):
    write_colmap(tmp_path, world, depth_kind="png")
    cfg = _cfg(tmp_path)
    cfg.colmap.depth_path, cfg.colmap.depth_scale = "depths/{stem}.png", 0.001
    frame = build_source(cfg, "train").load_frame(0, 2)
    _, depth, mask, _ = world.views[2]
    assert (frame.depth[mask] - depth[mask]).abs().max() <= 0.0005 + 1e-6  # millimetres
    cfg.colmap.depth_path = "depths/{name}.npy"  # frame_002.png.npy: not written
    with pytest.raises(DataError, match=r"depths/frame_002\.png\.npy: file not found"):
        build_source(cfg, "train").load_frame(0, 2)


@pytest.mark.parametrize("key, value, message", [
    ("depth_path", "depths/all.npy", r"data.colmap.depth_path='depths/all.npy' names no image"),
    ("depth_path", "depths/{stem}.exr", r"must end in .npy, .pfm or .png"),
    ("depth_path", "{scene}/{stem}.npy", r"KeyError\('scene'\); only \{name\} and \{stem\} may appear"),
    ("depth_scale", 0.0, r"data.colmap.depth_scale=0.0 must be > 0"),
])
def test_colmap_settings_are_checked_at_load(key, value, message):
    cfg = DataConfig(source="colmap", root="x")
    setattr(cfg.colmap, key, value)
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_an_empty_root_says_what_a_scene_needs(tmp_path):
    with pytest.raises(DataError, match=r"no <scene>/sparse/0/cameras.bin or cameras.txt"):
        build_source(_cfg(tmp_path), "train")


def test_write_then_read_preserves_depth_maps_exactly_in_pfm(tmp_path, world):
    write_colmap(tmp_path, world, depth_kind="pfm")
    cfg = _cfg(tmp_path)
    cfg.colmap.depth_path = "depths/{stem}.pfm"
    frame = build_source(cfg, "train").load_frame(0, 0)
    _, depth, mask, _ = world.views[0]
    assert torch.equal(frame.depth, torch.where(mask, depth, torch.zeros_like(depth)))
    assert np.isfinite(frame.depth.numpy()).all()
