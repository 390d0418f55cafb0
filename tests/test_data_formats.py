"""The real formats, read from small datasets written here exactly as upstream stores them.

The frames are rendered by the synthetic world (tests/data_writers.py), so what a loader returns can
be checked against exact geometry.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_writers import half_pixel, image_tolerance, render_world, write_co3d, write_colmap, write_folder, write_png, write_vkitti
from vggt_fsdp.data import DataConfig, DataError, build_dataloader, build_source
from vggt_fsdp.data.base import SampleSpec, build_sample, pick_frames
from vggt_fsdp.data.config import AugmentConfig
from vggt_fsdp.data.synthetic import camera_rays, cast, depth_at
from vggt_fsdp.geometry import invert_extrinsics, pixel_grid, project_points, transform_points

SRC_HW = (48, 64)
FRAMES = 4


@pytest.fixture(scope="module")
def world():
    return render_world(11, FRAMES, SRC_HW)


# ----------------------------------------------------------------------------------------------------
# Co3Dv2


def _co3d_cfg(root: Path, anno: Path, **kw) -> DataConfig:
    cfg = DataConfig(source="co3d", root=str(root), frames_range=[2, FRAMES], frames_per_gpu=FRAMES,
                     image_width=56, num_workers=0, **kw)
    cfg.co3d.annotation_dir = str(anno)
    cfg.co3d.min_frames = 2
    return cfg


def test_co3d_frames_read_as_upstream_stores_them(tmp_path, world):
    anno = write_co3d(tmp_path, world)
    extr, intr, views = world.extrinsics, world.intrinsics, world.views
    source = build_source(_co3d_cfg(tmp_path, anno), "train")
    assert len(source) == 1 and source.frame_counts == [FRAMES]
    frame = source.read_frame(0, 1)
    image, depth, mask, _ = views[1]
    assert (frame.image - image).abs().mean() < image_tolerance()
    assert torch.equal(frame.extrinsics, extr[1]) and torch.equal(frame.intrinsics, intr[1])
    # float16 bits decoded; depth dropped outside the mask, at the mask band and above the 98th percentile
    keep = frame.mask
    assert torch.allclose(frame.depth[keep], depth[keep], rtol=1e-3)
    assert not keep[:, :4].any() and not (keep & ~mask).any()
    assert (keep.sum() < mask[:, 4:].sum()) and keep.float().mean() > 0.5
    assert (frame.depth[~keep] == 0).all()


def test_co3d_val_split_reads_test_annotations_and_short_sequences_are_left_out(tmp_path, world):
    anno = write_co3d(tmp_path, world)
    cfg = _co3d_cfg(tmp_path, anno)
    assert len(build_source(cfg, "val")) == 1
    (anno / "apple_test.jgz").unlink()
    with pytest.raises(DataError, match=r"none of upstream's 41 seen Co3D categories has a <category>_test.jgz"):
        build_source(cfg, "val")
    cfg.co3d.categories = "all"
    with pytest.raises(DataError, match=r"no \*_test.jgz files"):
        build_source(cfg, "val")
    cfg.co3d.categories = ["apple"]
    with pytest.raises(DataError, match="apple_test.jgz: file not found"):
        build_source(cfg, "val")
    cfg.co3d.min_frames = FRAMES + 1
    assert len(build_source(cfg, "train")) == 0


def test_co3d_batches_through_the_loader(tmp_path, world):
    anno = write_co3d(tmp_path, world)
    batch = next(iter(build_dataloader(_co3d_cfg(tmp_path, anno))))
    s, (h, w) = batch["images"].shape[1], batch["images"].shape[-2:]
    assert batch["images"].shape[0] == FRAMES // s and w == 56 and h % 14 == 0
    assert batch["world_points"].shape[-4:] == (s, h, w, 3) and batch["point_masks"].any()
    assert torch.allclose(batch["extrinsics"][:, 0, :, :3], torch.eye(3).expand(len(batch["images"]), -1, -1), atol=1e-5)


def test_co3d_missing_or_malformed_files_name_the_path(tmp_path, world):
    anno = write_co3d(tmp_path, world)
    depth = tmp_path / "apple/110_13051_23361/depths/frame000002.jpg.geometric.png"
    depth.unlink()
    source = build_source(_co3d_cfg(tmp_path, anno), "train")
    with pytest.raises(DataError, match=r"frame000002\.jpg\.geometric\.png: file not found; expected a 16-bit PNG"):
        source.read_frame(0, 1)
    depth.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="frame000002.jpg.geometric.png"):
        source.read_frame(0, 1)
    (anno / "apple_train.jgz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="apple_train.jgz: malformed"):
        build_source(_co3d_cfg(tmp_path, anno), "train")


def test_bad_frames_raise_by_default_and_are_skipped_and_counted_when_allowed(tmp_path, world):
    anno = write_co3d(tmp_path, world)
    (tmp_path / "apple/110_13051_23361/depth_masks/frame000003.png").unlink()
    spec = SampleSpec(index=0, num_frames=FRAMES, image_hw=(42, 56), seed=(0,), step=0, next_position=1)
    with pytest.raises(DataError, match="frame000003.png: file not found"):
        build_sample(build_source(_co3d_cfg(tmp_path, anno), "train"), spec, None)
    sample = build_sample(build_source(_co3d_cfg(tmp_path, anno, skip_bad_frames=True), "train"), spec, None)
    assert sample["skipped_frames"] >= 1 and sample["images"].shape[0] == FRAMES


# ----------------------------------------------------------------------------------------------------
# Virtual KITTI 2

def _vkitti_cfg(root: Path) -> DataConfig:
    return DataConfig(source="vkitti", root=str(root), frames_range=[2, FRAMES], frames_per_gpu=FRAMES,
                      image_width=56, num_workers=0, val_fraction=0.0)


def test_vkitti_frames_read_as_upstream_stores_them(tmp_path, world):
    write_vkitti(tmp_path, world)
    extr, intr, views = world.extrinsics, world.intrinsics, world.views
    source = build_source(_vkitti_cfg(tmp_path), "train")
    assert source.scene_names == ["Scene01/clone/frames/rgb/Camera_0"] and source.frame_counts == [FRAMES]
    frame = source.read_frame(0, 2)
    image, depth, mask, _ = views[2]
    assert (frame.image - image).abs().mean() < image_tolerance()
    assert torch.allclose(frame.extrinsics, extr[2]) and torch.allclose(frame.intrinsics, intr[2])
    mask = mask.clone()
    mask[:3] = False
    assert torch.equal(frame.mask, mask)  # the sky (> 80 m) is invalid
    assert torch.allclose(frame.depth[mask], depth[mask], atol=0.0051)  # centimetre quantisation
    batch = next(iter(build_dataloader(_vkitti_cfg(tmp_path))))
    assert batch["point_masks"].any() and torch.isfinite(batch["world_points"]).all()


def test_vkitti_malformed_camera_file_names_the_line(tmp_path, world):
    variation = write_vkitti(tmp_path, world)
    lines = (variation / "extrinsic.txt").read_text().splitlines()
    lines[3] = "2 0 1 2 3"
    (variation / "extrinsic.txt").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"extrinsic.txt:4: '2 0 1 2 3'; expected 18 numbers"):
        build_source(_vkitti_cfg(tmp_path), "train")


# ----------------------------------------------------------------------------------------------------
# Generic scene folder


def _folder_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(source="folder", root=str(root), frames_range=[2, FRAMES], frames_per_gpu=FRAMES,
                      image_width=56, num_workers=0, val_fraction=0.0, **kw)


def test_folder_format_reads_png_and_npy_depth(tmp_path, world):
    write_folder(tmp_path, world)
    extr, intr, views = world.extrinsics, world.intrinsics, world.views
    source = build_source(_folder_cfg(tmp_path), "train")
    for i in (0, 1):
        frame = source.read_frame(0, i)
        image, depth, mask, _ = views[i]
        assert (frame.image - image).abs().max() <= 1 / 255 + 1e-6
        assert torch.equal(frame.mask, mask)
        assert torch.allclose(frame.depth[mask], depth[mask], atol=6e-4)
        assert torch.equal(frame.extrinsics, extr[i])


def test_folder_missing_key_is_reported_with_the_frame(tmp_path, world):
    scene = write_folder(tmp_path, world)
    data = json.loads((scene / "scene.json").read_text())
    del data["frames"][2]["intrinsics"]
    (scene / "scene.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"scene.json frames\[2\]: missing 'intrinsics'"):
        build_source(_folder_cfg(tmp_path), "train").read_frame(0, 2)


def test_real_data_crop_and_resize_keep_geometry_exact(tmp_path, world):
    """Through the real-data path (crop-zoom about the principal point, resize, nearest depth), the
    loaded points still lie on the scene's surfaces as every written camera sees them."""
    scene, extr, intr = world.scene, world.extrinsics, world.intrinsics
    write_folder(tmp_path, world)
    source = build_source(_folder_cfg(tmp_path), "train")
    spec = SampleSpec(index=0, num_frames=FRAMES, image_hw=(28, 42), seed=(3,), step=0, next_position=1)
    aug = AugmentConfig(crop_scale_range=[0.6, 0.8], zoom_max=0.3, color_jitter_prob=0.0, grayscale_prob=0.0)
    sample = build_sample(source, spec, aug)
    # the frames' order is the first draw of the sample's generator
    ids = pick_frames(np.random.default_rng(list(spec.seed)), FRAMES, FRAMES, source.frame_window, source.replace)
    assert sorted(ids) == list(range(FRAMES))  # the folder format's default: distinct frames
    extr, intr = extr[ids], intr[ids]
    assert not torch.allclose(sample["intrinsics"][0, 0, 0] / 42, intr[0, 0, 0] / SRC_HW[1])  # zoomed
    to_world = invert_extrinsics(extr[0])  # undo the first-camera re-expression (after the scale)
    checked = on_surface = beyond = 0
    for i in range(FRAMES):
        mask = sample["point_masks"][i]
        points = transform_points(to_world, sample["world_points"][i][mask] * sample["scene_scale"])
        for j in range(FRAMES):
            uv, z = project_points(points, extr[j], intr[j])
            inside = (uv[:, 0] > 0) & (uv[:, 0] < SRC_HW[1]) & (uv[:, 1] > 0) & (uv[:, 1] < SRC_HW[0]) & (z > 0)
            rel = (depth_at(scene, extr[j], intr[j], uv[inside]) - z[inside]) / z[inside]
            checked += len(rel)
            on_surface += int((rel.abs() < 2e-2).sum())  # nearest-neighbour depth resampling: within 2%
            beyond += int((rel > 2e-2).sum())  # a view seeing past a loaded point: wrong geometry
    assert checked > 1000 and on_surface > 0.3 * checked and beyond < 0.05 * checked


def test_without_pillow_png_still_decodes_and_jpeg_names_the_extra(tmp_path, monkeypatch):
    from vggt_fsdp.data import io as data_io

    monkeypatch.setattr(data_io, "_pillow", lambda: None)
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3)).astype(np.uint8)
    write_png(tmp_path / "a.png", rgb)
    assert torch.equal(data_io.read_rgb(tmp_path / "a.png"), torch.from_numpy(rgb).permute(2, 0, 1) / 255.0)
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    with pytest.raises(DataError, match=r"b.jpg: decoding JPEG needs Pillow.*vggt-fsdp\[real-data\]"):
        data_io.read_rgb(tmp_path / "b.jpg")


def test_frames_are_picked_near_an_anchor_as_upstream():
    rng = np.random.default_rng(0)
    # upstream's nearby sampling: [a - 8 S, a + 8 S), with replacement (duplicates allowed)
    draws = [pick_frames(rng, 1000, 5, window=8, replace=True) for _ in range(400)]
    assert all(ids[0] - 40 <= i < ids[0] + 40 for ids in draws for i in ids)
    assert any(len(set(ids)) < 5 for ids in draws) and any(i == ids[0] for ids in draws for i in ids[1:])
    # the toolkit's former choice, kept as an option: distinct frames other than the anchor
    distinct = [pick_frames(rng, 1000, 5, window=8, replace=False) for _ in range(50)]
    assert all(len(set(ids)) == 5 and all(abs(i - ids[0]) <= 40 for i in ids) for ids in distinct)
    # Co3D as upstream: the whole sequence
    spread = [pick_frames(rng, 1000, 5, window=0) for _ in range(20)]
    assert max(max(ids) - min(ids) for ids in spread) > 400
    short = pick_frames(rng, 3, 5, window=8, replace=False)  # fewer frames than asked: repeats
    assert len(short) == 5 and set(short) <= {0, 1, 2}


@pytest.mark.parametrize("source, window, replace", [("co3d", 0, True), ("vkitti", 8, True), ("folder", 8, False),
                                                     ("colmap", 0, False)])
def test_each_format_samples_frames_as_documented(tmp_path, world, source, window, replace):
    write = {"co3d": write_co3d, "vkitti": write_vkitti, "folder": write_folder, "colmap": write_colmap}[source]
    write(tmp_path, world)
    cfg = DataConfig(source=source, root=str(tmp_path), val_fraction=0.0)
    cfg.co3d.annotation_dir, cfg.co3d.min_frames = str(tmp_path / "annotations"), 1
    loaded = build_source(cfg, "train")
    assert (loaded.frame_window, loaded.replace) == (window, replace)
    cfg.frame_window, cfg.frame_replacement = 3, not replace
    loaded = build_source(cfg, "train")
    assert (loaded.frame_window, loaded.replace) == (3, not replace)


def test_co3d_reads_upstreams_seen_categories_unless_told(tmp_path, world, caplog):
    write_co3d(tmp_path, world, category="apple")
    write_co3d(tmp_path, world, category="kite")  # one of Co3D's unseen categories
    cfg = DataConfig(source="co3d", root=str(tmp_path))
    cfg.co3d.annotation_dir, cfg.co3d.min_frames = str(tmp_path / "annotations"), 1
    with caplog.at_level("WARNING"):
        assert [n.split("/")[0] for n in build_source(cfg, "train").scene_names] == ["apple"]
    assert "40 of upstream's 41 seen categories have no train annotation" in caplog.text and "wineglass" in caplog.text
    cfg.co3d.categories = "all"
    assert [n.split("/")[0] for n in build_source(cfg, "train").scene_names] == ["apple", "kite"]
    cfg.co3d.categories = ["kite"]
    assert [n.split("/")[0] for n in build_source(cfg, "train").scene_names] == ["kite"]


def test_hold_out_split_is_disjoint_complete_and_stable():
    from vggt_fsdp.data.base import split_by_name

    names = [f"Scene{i:02d}/clone/frames/rgb/Camera_{i % 2}" for i in range(200)]
    train, val = split_by_name(names, "train", 0.1), split_by_name(names, "val", 0.1)
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(names)
    assert 5 < len(val) < 40  # about 10%
    assert split_by_name(names[::-1], "val", 0.1) == val[::-1]  # by name, not position
    assert split_by_name(names, "val", 0.0) == []


@pytest.mark.parametrize("source,expected", [("co3d", "Co3D"), ("vkitti", "Virtual KITTI 2"), ("folder", "scene.json"),
                                             ("colmap", "COLMAP model")])
def test_a_missing_root_names_the_path_and_what_the_source_expects(tmp_path, source, expected):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"{missing}: the root of data source '{source}' is not a directory; "
                                        f"expected .*{expected}"):
        build_source(DataConfig(source=source, root=str(missing)), "train")


# ----------------------------------------------------------------------------------------------------
# Every format, both pixel conventions: world points come back within the storage's quantisation

ROUND_TRIP_HW = (42, 63)  # 3x (14, 21): shrinking by an odd factor keeps nearest-neighbour depth exact

# (format, writer options, reader options, depth tolerance: metres, or a fraction of the depth)
STORAGES = [
    ("co3d", {}, {}, ("relative", 2 ** -11)),  # float16 bits in a PNG
    ("vkitti", {}, {}, ("metres", 0.005 + 1e-5)),  # 16-bit centimetres
    ("folder", {"depth_kinds": ("png", "npy", "pfm")}, {}, ("metres", 0.0005 + 1e-5)),  # mm PNG, float files
    ("colmap", {"binary": False, "depth_kind": "npy"}, {}, ("metres", 1e-5)),
    ("colmap", {"binary": True, "depth_kind": "pfm"}, {"depth_path": "depths/{stem}.pfm"}, ("metres", 1e-5)),
    ("colmap", {"binary": True, "depth_kind": "png"}, {"depth_path": "depths/{stem}.png", "depth_scale": 0.001},
     ("metres", 0.0005 + 1e-5)),
]


def _write_format(fmt: str, root: Path, world, intrinsics: torch.Tensor, **kw) -> None:
    {"co3d": write_co3d, "vkitti": write_vkitti, "folder": write_folder, "colmap": write_colmap}[fmt](
        root, world, intrinsics, **kw)


def _read_sample(fmt: str, root: Path, convention: str, out_hw, **reader) -> tuple[dict, list[int], object]:
    cfg = DataConfig(source=fmt, root=str(root), pixel_centre=convention, resize_margin=0, val_fraction=0.0)
    cfg.co3d.annotation_dir, cfg.co3d.min_frames = str(root / "annotations"), 1
    for key, value in reader.items():
        setattr(cfg.colmap, key, value)
    source = build_source(cfg, "train")
    spec = SampleSpec(index=0, num_frames=3, image_hw=out_hw, seed=(5,), step=0, next_position=1)
    sample = build_sample(source, spec, None)
    ids = pick_frames(np.random.default_rng([5]), 3, 3, source.frame_window, source.replace)
    return sample, ids, source


def _depth_errors(world, sample, ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per valid pixel: |loaded depth - exact depth along the pixel's ray|, the exact depth, and
    |loaded world point - exact surface point|; exact = ray-cast with the sample's own intrinsics."""
    out_hw = tuple(sample["depths"].shape[-2:])
    to_world = invert_extrinsics(world.extrinsics[ids[0]])  # undo the first-camera re-expression
    depth_err, depth_true, point_err = [], [], []
    for i, fid in enumerate(ids):
        centre, dirs = camera_rays(world.extrinsics[fid], sample["intrinsics"][i], pixel_grid(*out_hw).reshape(-1, 2))
        t = cast(world.scene, centre, dirs).t.reshape(out_hw)
        mask = sample["point_masks"][i]
        exact_points = (centre + t.reshape(-1, 1) * dirs).reshape(*out_hw, 3)[mask]
        loaded_points = transform_points(to_world, sample["world_points"][i][mask] * sample["scene_scale"])
        depth_err.append((sample["depths"][i][mask] * sample["scene_scale"] - t[mask]).abs())
        depth_true.append(t[mask])
        point_err.append((loaded_points - exact_points).norm(dim=-1) / dirs.reshape(*out_hw, 3)[mask].norm(dim=-1))
    return torch.cat(depth_err), torch.cat(depth_true), torch.cat(point_err)


@pytest.mark.parametrize("out_hw", [ROUND_TRIP_HW, (14, 21)], ids=["full-size", "shrunk-3x"])
@pytest.mark.parametrize("convention", ["integer", "half"])
@pytest.mark.parametrize("fmt, writer, reader, tolerance", STORAGES,
                         ids=["co3d", "vkitti", "folder", "colmap-txt-npy", "colmap-bin-pfm", "colmap-bin-png"])
def test_world_points_come_back_within_the_storage_quantisation(tmp_path, fmt, writer, reader, tolerance,
                                                                convention, out_hw):
    """A scene with known geometry written in each format, in either pixel convention (the source's
    pixel_centre says which), read back through crop and resize: every valid pixel's depth is the
    exact depth along its ray, and its world point the exact surface point, up to how the format
    stores depth; the intrinsics are the written camera's, scaled exactly."""
    world = render_world(3, 3, ROUND_TRIP_HW, open_top=False)
    written = world.intrinsics if convention == "integer" else half_pixel(world.intrinsics)
    _write_format(fmt, tmp_path, world, written, **writer)
    sample, ids, _ = _read_sample(fmt, tmp_path, convention, out_hw, **reader)
    s = out_hw[0] / ROUND_TRIP_HW[0]
    expected = world.intrinsics[ids].clone().double()
    expected[:, :2, :2] *= s
    expected[:, :2, 2] = (expected[:, :2, 2] + 0.5) * s - 0.5  # integer centres: x -> (x + 0.5) s - 0.5
    assert torch.allclose(sample["intrinsics"].double(), expected, atol=1e-4)
    depth_err, depth_true, point_err = _depth_errors(world, sample, ids)
    kind, tol = tolerance
    allowed = tol * depth_true if kind == "relative" else torch.full_like(depth_true, tol)
    assert len(depth_err) > 0.5 * 3 * out_hw[0] * out_hw[1]
    assert (depth_err <= allowed * 1.01 + 1e-5).all(), float((depth_err - allowed).max())
    assert (point_err <= allowed * 1.01 + 1e-4).all(), float((point_err - allowed).max())


@pytest.mark.parametrize("fmt", ["folder", "colmap"])
def test_reading_half_pixel_data_as_integer_centres_misplaces_the_points(tmp_path, fmt):
    """The check above can fail: the same half-pixel files read with the wrong convention put every
    point half a pixel off, far beyond the storage's quantisation."""
    world = render_world(3, 3, ROUND_TRIP_HW, open_top=False)
    _write_format(fmt, tmp_path, world, half_pixel(world.intrinsics), **({"depth_kinds": ("npy",)} if fmt == "folder" else {}))
    sample, ids, source = _read_sample(fmt, tmp_path, "integer", ROUND_TRIP_HW)
    depth_err, depth_true, _ = _depth_errors(world, sample, ids)
    assert torch.allclose(source.load_frame(0, 0).intrinsics[:2, 2], world.intrinsics[0, :2, 2] + 0.5)
    assert (depth_err / depth_true).max() > 1e-2
