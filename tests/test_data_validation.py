"""Impossible geometry is refused on read, for every file format (issue 14 item 5): named without
data.skip_bad_frames, replaced and counted per source with it. Adding a case is one line of a table."""
import json

import numpy as np
import pytest
import torch

from data_writers import half_pixel, render_world, write_co3d, write_colmap, write_folder, write_png, write_vkitti
from vggt_fsdp.data import DataConfig, DataError, build_dataloader, build_source
from vggt_fsdp.data.base import SampleSpec, build_sample

HW = (24, 32)
FRAMES = 4
SPEC = SampleSpec(index=0, num_frames=FRAMES, image_hw=(14, 28), seed=(1,), step=0, next_position=1)


@pytest.fixture(scope="module")
def world():
    return render_world(7, FRAMES, HW, open_top=False)


def _scaled(matrix: list, factor: float) -> list:
    return [[v * factor for v in row] for row in matrix]


def _rows(extr: list, rows: list) -> list:
    return [rows[i] + [extr[i][3]] for i in range(3)]


def _set_depth(folder, frame, values: np.ndarray) -> None:
    np.save(folder / frame["depth"], values.astype(np.float32))


# What is wrong with frame 1 of a folder scene, how it is written, and what the error says.
FOLDER_CASES = [
    ("zero focal length", lambda folder, f: f["intrinsics"][0].__setitem__(0, 0.0), r"focal lengths fx=0, fy="),
    ("negative focal length", lambda folder, f: f["intrinsics"][1].__setitem__(1, -f["intrinsics"][1][1]),
     r"focal lengths fx=.*, fy=-.*both must be > 0"),
    ("rotation scaled x3", lambda folder, f: f.__setitem__(
        "extrinsics", [[v * 3 for v in row[:3]] + [row[3]] for row in f["extrinsics"]]), r"is not a rotation"),
    ("singular rotation", lambda folder, f: f.__setitem__(
        "extrinsics", _rows(f["extrinsics"], [f["extrinsics"][0][:3], f["extrinsics"][0][:3], f["extrinsics"][2][:3]])),
     r"is not a rotation \(max \|R R\^T - I\| = .*det -?0\)"),
    ("reflection", lambda folder, f: f.__setitem__(
        "extrinsics", _rows(f["extrinsics"], [f["extrinsics"][1][:3], f["extrinsics"][0][:3], f["extrinsics"][2][:3]])),
     r"is not a rotation .*det -1"),
    ("intrinsics for a 3x image", lambda folder, f: f.__setitem__("intrinsics", _scaled(f["intrinsics"][:2], 3) + [[0, 0, 1]]),
     r"principal point \(.*\) lies outside the 32x24 image: intrinsics for another image size"),
    ("intrinsics for a 2x image", lambda folder, f: f.__setitem__("intrinsics", _scaled(f["intrinsics"][:2], 2) + [[0, 0, 1]]),
     r"% of the image from the centre of the 32x24 image .*intrinsics for another image size"),
    ("intrinsics for a half-size image", lambda folder, f: f.__setitem__(
        "intrinsics", _scaled(f["intrinsics"][:2], 0.5) + [[0, 0, 1]]),
     r"% of the image from the centre of the 32x24 image .*intrinsics for another image size"),
    ("focal length in millimetres", lambda folder, f: f.__setitem__(
        "intrinsics", [[0.004, 0, f["intrinsics"][0][2]], [0, 0.004, f["intrinsics"][1][2]], [0, 0, 1]]),
     r"degree horizontal field of view .*not in this image's pixels"),
    ("skew", lambda folder, f: f["intrinsics"][0].__setitem__(1, 5.0), r"\(no skew\)"),
    ("non-finite translation", lambda folder, f: f["extrinsics"][2].__setitem__(3, float("nan")),
     r"'extrinsics': got shape \[3, 4\]; expected a finite \[3, 4\] matrix"),
    ("no valid depth", lambda folder, f: _set_depth(folder, f, np.full(HW, np.nan)), r"0001\.npy: no valid depth"),
    ("all depths zero", lambda folder, f: _set_depth(folder, f, np.zeros(HW)), r"0001\.npy: no valid depth"),
]
CASE_IDS = [case[0] for case in FOLDER_CASES]


def _folder_with(tmp_path, world, damage) -> DataConfig:
    folder = write_folder(tmp_path, world, depth_kinds=("npy",))
    scene = json.loads((folder / "scene.json").read_text())
    damage(folder, scene["frames"][1])
    (folder / "scene.json").write_text(json.dumps(scene))
    return DataConfig(source="folder", root=str(tmp_path), val_fraction=0.0, frames_range=[FRAMES, FRAMES],
                      frames_per_gpu=2 * FRAMES, image_width=28, aspect_range=[0.5, 0.5], num_workers=0)


@pytest.mark.parametrize("name, damage, message", FOLDER_CASES, ids=CASE_IDS)
def test_impossible_geometry_names_the_file(tmp_path, world, name, damage, message):
    cfg = _folder_with(tmp_path, world, damage)
    source = build_source(cfg, "train")
    for frame in (0, 2, 3):
        source.load_frame(0, frame)  # the intact frames pass
    with pytest.raises(DataError, match=message) as err:
        source.load_frame(0, 1)
    assert "scene.json frames[1]" in str(err.value) or "0001.npy" in str(err.value)
    with pytest.raises(DataError, match=message):
        build_sample(source, SPEC, None)  # a sample of all four frames meets it


@pytest.mark.parametrize("name, damage, message", FOLDER_CASES, ids=CASE_IDS)
def test_impossible_geometry_is_skipped_and_counted_per_source(tmp_path, world, name, damage, message):
    cfg = _folder_with(tmp_path, world, damage)
    cfg.skip_bad_frames = True
    loader = build_dataloader(cfg)
    batches = [batch for _, batch in zip(range(2), loader)]
    # every sample draws all four distinct frames, so each meets frame 1 once and replaces it
    counted = sum(int(batch["skipped_frames"].sum()) for batch in batches)
    assert counted >= 2 * 2 and loader.data_counts()["skipped_frames"] == {"folder": counted}
    assert loader.data_counts()["frames"] == {"folder": 2 * 2 * FRAMES}
    for batch in batches:
        assert torch.isfinite(batch["world_points"]).all() and batch["point_masks"].any()
        assert (batch["scene_scale"] > 1e-3).all()


def test_a_scene_with_no_valid_depth_at_all_is_refused(tmp_path, world):
    def no_depth_anywhere(folder, frame):
        scene = json.loads((folder / "scene.json").read_text())
        for f in scene["frames"]:
            np.save(folder / f["depth"], np.zeros(HW, np.float32))

    cfg = _folder_with(tmp_path, world, no_depth_anywhere)
    with pytest.raises(DataError, match=r"\d{4}\.npy: no valid depth"):
        build_sample(build_source(cfg, "train"), SPEC, None)
    cfg.skip_bad_frames = True  # nothing to replace the frames with: still refused, with the last file named
    with pytest.raises(DataError, match=r"4 frames in a row failed to load .*\.npy: no valid depth"):
        build_sample(build_source(cfg, "train"), SPEC, None)


# Every file format checks what it reads: frame 1 written with a zero focal length or a rotation x3.
def _bad_intrinsics(world, pixel_half=False):
    k = world.intrinsics.clone()
    k[1, 0, 0] = 0.0
    return half_pixel(k) if pixel_half else k


FORMATS = [
    ("co3d", lambda root, world: write_co3d(root, world, _bad_intrinsics(world)), r"apple_train\.jgz \['110_13051_23361'\]\[1\]"),
    ("vkitti", lambda root, world: write_vkitti(root, world, _bad_intrinsics(world)),
     r"Scene01/clone/\{extrinsic,intrinsic\}\.txt camera 0 frame 1 \(rgb_00001\.jpg\)"),
    ("folder", lambda root, world: write_folder(root, world, _bad_intrinsics(world)), r"scene\.json frames\[1\]"),
    ("colmap", lambda root, world: write_colmap(root, world, _bad_intrinsics(world, True)),
     r"images\.txt image 2 \(frame_001\.png\)"),
]


@pytest.mark.parametrize("fmt, write, where", FORMATS, ids=[case[0] for case in FORMATS])
def test_every_format_refuses_a_zero_focal_length_naming_the_frame(tmp_path, world, fmt, write, where):
    write(tmp_path, world)
    cfg = DataConfig(source=fmt, root=str(tmp_path), val_fraction=0.0)
    cfg.co3d.annotation_dir, cfg.co3d.min_frames = str(tmp_path / "annotations"), 1
    source = build_source(cfg, "train")
    source.load_frame(0, 0)
    with pytest.raises(DataError, match=where + r": focal lengths fx=0"):
        source.load_frame(0, 1)


@pytest.mark.parametrize("fmt", ["co3d", "vkitti"])
def test_every_format_refuses_a_scaled_rotation(tmp_path, world, fmt):
    scaled = render_world(7, FRAMES, HW, open_top=False)
    scaled.extrinsics = scaled.extrinsics.clone()
    scaled.extrinsics[2, :, :3] *= 3
    {"co3d": write_co3d, "vkitti": write_vkitti}[fmt](tmp_path, scaled)
    cfg = DataConfig(source=fmt, root=str(tmp_path), val_fraction=0.0)
    cfg.co3d.annotation_dir, cfg.co3d.min_frames = str(tmp_path / "annotations"), 1
    with pytest.raises(DataError, match=r"is not a rotation"):
        build_source(cfg, "train").load_frame(0, 2)


def test_a_corrupt_depth_png_in_a_folder_scene_names_the_file(tmp_path, world):
    folder = write_folder(tmp_path, world, depth_kinds=("png",))
    (folder / "depth/0002.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    write_png(tmp_path / "unused.png", np.zeros((2, 2), np.uint8))
    source = build_source(DataConfig(source="folder", root=str(tmp_path), val_fraction=0.0), "train")
    with pytest.raises(DataError, match=r"depth/0002\.png"):
        source.load_frame(0, 2)
