"""The real formats, read from small datasets written here exactly as upstream stores them.

The frames are rendered by the synthetic world, so what a loader returns can be checked against
exact geometry. JPEG files need Pillow (the `real-data` extra); without it the tests store PNG bytes
under the .jpg names (the readers identify images by content, as OpenCV does upstream).
"""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vggt_fsdp.data import DataConfig, DataError, build_dataloader, build_source
from vggt_fsdp.data.base import SampleSpec, build_sample, pick_frames
from vggt_fsdp.data.config import AugmentConfig, SyntheticConfig
from vggt_fsdp.data.png import encode_png
from vggt_fsdp.data.synthetic import depth_at, draw_cameras, make_scene, render
from vggt_fsdp.geometry import invert_extrinsics, project_points, transform_points

try:
    from PIL import Image
except ImportError:
    Image = None

SRC_HW = (48, 64)
FRAMES = 4


def _write_jpg(path: Path, image: torch.Tensor) -> None:
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    if Image is not None:
        Image.fromarray(array).save(path, format="JPEG", quality=95)
    else:
        path.write_bytes(encode_png(array))


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(array))


@pytest.fixture(scope="module")
def world():
    cfg = SyntheticConfig()
    scene = make_scene(11, 0, cfg)
    scene.open_top = True  # sky pixels: invalid depth for the loaders to mask
    extr, intr = draw_cameras(scene, np.random.default_rng(0), FRAMES, SRC_HW, cfg.fov_range_deg)
    views = [render(scene, e, k, SRC_HW) for e, k in zip(extr, intr)]
    return scene, extr, intr, views


def _image_tolerance() -> float:
    return 0.08 if Image is not None else 1 / 255 + 1e-6


# ----------------------------------------------------------------------------------------------------
# Co3Dv2


def _write_co3d(root: Path, world, min_frames: int = 1) -> Path:
    _, extr, intr, views = world
    entries = []
    for i, (image, depth, mask, _) in enumerate(views):
        rel = f"apple/110_13051_23361/images/frame{i + 1:06d}.jpg"
        _write_jpg(root / rel, image)
        bits = depth.numpy().astype(np.float16).view(np.uint16)
        _write_png(root / "apple/110_13051_23361/depths" / f"frame{i + 1:06d}.jpg.geometric.png", bits)
        written_mask = mask.numpy().copy()
        written_mask[:, :4] = False  # a band the MVS mask rejects although depth exists there
        _write_png(root / "apple/110_13051_23361/depth_masks" / f"frame{i + 1:06d}.png",
                   np.where(written_mask, 255, 0).astype(np.uint8))
        entries.append({"filepath": rel, "extri": extr[i].tolist(), "intri": intr[i].tolist()})
    anno = root / "annotations"
    anno.mkdir(exist_ok=True)
    for split in ("train", "test"):
        with gzip.open(anno / f"apple_{split}.jgz", "wt") as f:
            json.dump({"110_13051_23361": entries}, f)
    return anno


def _co3d_cfg(root: Path, anno: Path, **kw) -> DataConfig:
    cfg = DataConfig(source="co3d", root=str(root), frames_range=[2, FRAMES], frames_per_gpu=FRAMES,
                     image_width=56, num_workers=0, **kw)
    cfg.co3d.annotation_dir = str(anno)
    cfg.co3d.min_frames = 2
    return cfg


def test_co3d_frames_read_as_upstream_stores_them(tmp_path, world):
    anno = _write_co3d(tmp_path, world)
    _, extr, intr, views = world
    source = build_source(_co3d_cfg(tmp_path, anno), "train")
    assert len(source) == 1 and source.frame_counts == [FRAMES]
    frame = source.read_frame(0, 1)
    image, depth, mask, _ = views[1]
    assert (frame.image - image).abs().mean() < _image_tolerance()
    assert torch.equal(frame.extrinsics, extr[1]) and torch.equal(frame.intrinsics, intr[1])
    # float16 bits decoded; depth dropped outside the mask, at the mask band and above the 98th percentile
    keep = frame.mask
    assert torch.allclose(frame.depth[keep], depth[keep], rtol=1e-3)
    assert not keep[:, :4].any() and not (keep & ~mask).any()
    assert (keep.sum() < mask[:, 4:].sum()) and keep.float().mean() > 0.5
    assert (frame.depth[~keep] == 0).all()


def test_co3d_val_split_reads_test_annotations_and_short_sequences_are_left_out(tmp_path, world):
    anno = _write_co3d(tmp_path, world)
    cfg = _co3d_cfg(tmp_path, anno)
    assert len(build_source(cfg, "val")) == 1
    (anno / "apple_test.jgz").unlink()
    with pytest.raises(DataError, match=r"no \*_test.jgz files"):
        build_source(cfg, "val")
    cfg.co3d.categories = ["apple"]
    with pytest.raises(DataError, match="apple_test.jgz: file not found"):
        build_source(cfg, "val")
    cfg.co3d.min_frames = FRAMES + 1
    assert len(build_source(cfg, "train")) == 0


def test_co3d_batches_through_the_loader(tmp_path, world):
    anno = _write_co3d(tmp_path, world)
    batch = next(iter(build_dataloader(_co3d_cfg(tmp_path, anno))))
    s, (h, w) = batch["images"].shape[1], batch["images"].shape[-2:]
    assert batch["images"].shape[0] == FRAMES // s and w == 56 and h % 14 == 0
    assert batch["world_points"].shape[-4:] == (s, h, w, 3) and batch["point_masks"].any()
    assert torch.allclose(batch["extrinsics"][:, 0, :, :3], torch.eye(3).expand(len(batch["images"]), -1, -1), atol=1e-5)


def test_co3d_missing_or_malformed_files_name_the_path(tmp_path, world):
    anno = _write_co3d(tmp_path, world)
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
    anno = _write_co3d(tmp_path, world)
    (tmp_path / "apple/110_13051_23361/depth_masks/frame000003.png").unlink()
    spec = SampleSpec(index=0, num_frames=FRAMES, image_hw=(42, 56), seed=(0,), step=0, next_position=1)
    with pytest.raises(DataError, match="frame000003.png: file not found"):
        build_sample(build_source(_co3d_cfg(tmp_path, anno), "train"), spec, None)
    sample = build_sample(build_source(_co3d_cfg(tmp_path, anno, skip_bad_frames=True), "train"), spec, None)
    assert sample["skipped_frames"] >= 1 and sample["images"].shape[0] == FRAMES


# ----------------------------------------------------------------------------------------------------
# Virtual KITTI 2

_EXTR_HEADER = "frame cameraID r1,1 r1,2 r1,3 t1 r2,1 r2,2 r2,3 t2 r3,1 r3,2 r3,3 t3 0 0 0 1"
_INTR_HEADER = "frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]"


def _write_vkitti(root: Path, world) -> Path:
    _, extr, intr, views = world
    variation = root / "Scene01" / "clone"
    extr_rows, intr_rows = [_EXTR_HEADER], [_INTR_HEADER]
    for i, (image, depth, mask, _) in enumerate(views):
        for camera in (0, 1):  # both stereo cameras, as the files hold; only Camera_0 has images here
            m = torch.cat([extr[i], torch.tensor([[0.0, 0, 0, 1]])]).flatten().tolist()
            extr_rows.append(" ".join([str(i), str(camera)] + [repr(v) for v in m]))
            k = intr[i]
            intr_rows.append(" ".join([str(i), str(camera)] + [repr(float(v)) for v in (k[0, 0], k[1, 1], k[0, 2], k[1, 2])]))
        _write_jpg(variation / "frames/rgb/Camera_0" / f"rgb_{i:05d}.jpg", image)
        sky = ~mask.numpy()
        sky[:3] = True  # the files' sky value (655.35 m) in a band, whether or not the view sees the sky
        cm = np.where(sky, 65535, np.round(depth.numpy() * 100)).astype(np.uint16)
        _write_png(variation / "frames/depth/Camera_0" / f"depth_{i:05d}.png", cm)
    (variation / "extrinsic.txt").write_text("\n".join(extr_rows) + "\n")
    (variation / "intrinsic.txt").write_text("\n".join(intr_rows) + "\n")
    return variation


def _vkitti_cfg(root: Path) -> DataConfig:
    return DataConfig(source="vkitti", root=str(root), frames_range=[2, FRAMES], frames_per_gpu=FRAMES,
                      image_width=56, num_workers=0, val_fraction=0.0)


def test_vkitti_frames_read_as_upstream_stores_them(tmp_path, world):
    _write_vkitti(tmp_path, world)
    _, extr, intr, views = world
    source = build_source(_vkitti_cfg(tmp_path), "train")
    assert source.scene_names == ["Scene01/clone/frames/rgb/Camera_0"] and source.frame_counts == [FRAMES]
    frame = source.read_frame(0, 2)
    image, depth, mask, _ = views[2]
    assert (frame.image - image).abs().mean() < _image_tolerance()
    assert torch.allclose(frame.extrinsics, extr[2]) and torch.allclose(frame.intrinsics, intr[2])
    mask = mask.clone()
    mask[:3] = False
    assert torch.equal(frame.mask, mask)  # the sky (> 80 m) is invalid
    assert torch.allclose(frame.depth[mask], depth[mask], atol=0.0051)  # centimetre quantisation
    batch = next(iter(build_dataloader(_vkitti_cfg(tmp_path))))
    assert batch["point_masks"].any() and torch.isfinite(batch["world_points"]).all()


def test_vkitti_malformed_camera_file_names_the_line(tmp_path, world):
    variation = _write_vkitti(tmp_path, world)
    lines = (variation / "extrinsic.txt").read_text().splitlines()
    lines[3] = "2 0 1 2 3"
    (variation / "extrinsic.txt").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"extrinsic.txt:4: '2 0 1 2 3'; expected 18 numbers"):
        build_source(_vkitti_cfg(tmp_path), "train")


# ----------------------------------------------------------------------------------------------------
# Generic scene folder


def _write_folder(root: Path, world) -> Path:
    _, extr, intr, views = world
    scene = root / "my_scene"
    frames = []
    for i, (image, depth, mask, _) in enumerate(views):
        _write_png(scene / f"images/{i:04d}.png", (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        if i % 2:
            np.save(scene / f"{i:04d}.npy", np.where(mask.numpy(), depth.numpy(), np.nan).astype(np.float32))
            depth_file = f"{i:04d}.npy"
        else:
            _write_png(scene / f"depth/{i:04d}.png", np.round(depth.numpy() * 1000).astype(np.uint16))  # mm
            depth_file = f"depth/{i:04d}.png"
        frames.append({"image": f"images/{i:04d}.png", "depth": depth_file,
                       "extrinsics": extr[i].tolist(), "intrinsics": intr[i].tolist()})
    (scene / "scene.json").write_text(json.dumps({"depth_scale": 0.001, "frames": frames}))
    return scene


def _folder_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(source="folder", root=str(root), frames_range=[2, FRAMES], frames_per_gpu=FRAMES,
                      image_width=56, num_workers=0, val_fraction=0.0, **kw)


def test_folder_format_reads_png_and_npy_depth(tmp_path, world):
    _write_folder(tmp_path, world)
    _, extr, intr, views = world
    source = build_source(_folder_cfg(tmp_path), "train")
    for i in (0, 1):
        frame = source.read_frame(0, i)
        image, depth, mask, _ = views[i]
        assert (frame.image - image).abs().max() <= 1 / 255 + 1e-6
        assert torch.equal(frame.mask, mask)
        assert torch.allclose(frame.depth[mask], depth[mask], atol=6e-4)
        assert torch.equal(frame.extrinsics, extr[i])


def test_folder_missing_key_is_reported_with_the_frame(tmp_path, world):
    scene = _write_folder(tmp_path, world)
    data = json.loads((scene / "scene.json").read_text())
    del data["frames"][2]["intrinsics"]
    (scene / "scene.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"scene.json frames\[2\]: missing 'intrinsics'"):
        build_source(_folder_cfg(tmp_path), "train").read_frame(0, 2)


def test_real_data_crop_and_resize_keep_geometry_exact(tmp_path, world):
    """Through the real-data path (crop-zoom about the principal point, resize, nearest depth), the
    loaded points still lie on the scene's surfaces as every written camera sees them."""
    scene, extr, intr, _ = world
    _write_folder(tmp_path, world)
    source = build_source(_folder_cfg(tmp_path), "train")
    spec = SampleSpec(index=0, num_frames=FRAMES, image_hw=(28, 42), seed=(3,), step=0, next_position=1)
    aug = AugmentConfig(crop_scale_range=[0.6, 0.8], color_jitter_prob=0.0, grayscale_prob=0.0)
    sample = build_sample(source, spec, aug)
    # the frames' order is the first draw of the sample's generator
    ids = pick_frames(np.random.default_rng(list(spec.seed)), FRAMES, FRAMES, source.frame_window)
    assert sorted(ids) == list(range(FRAMES))
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
    _write_png(tmp_path / "a.png", rgb)
    assert torch.equal(data_io.read_rgb(tmp_path / "a.png"), torch.from_numpy(rgb).permute(2, 0, 1) / 255.0)
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    with pytest.raises(DataError, match=r"b.jpg: decoding JPEG needs Pillow.*vggt-fsdp\[real-data\]"):
        data_io.read_rgb(tmp_path / "b.jpg")


def test_frames_are_picked_near_an_anchor_as_upstream():
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = pick_frames(rng, 1000, 5, window=8)
        assert all(abs(i - ids[0]) <= 40 for i in ids) and len(set(ids)) == 5
    spread = [pick_frames(rng, 1000, 5, window=0) for _ in range(20)]
    assert max(max(ids) - min(ids) for ids in spread) > 400
    short = pick_frames(rng, 3, 5, window=8)  # fewer frames than asked: repeats, as upstream
    assert len(short) == 5 and set(short) <= {0, 1, 2}


def test_hold_out_split_is_disjoint_complete_and_stable():
    from vggt_fsdp.data.base import split_by_name

    names = [f"Scene{i:02d}/clone/frames/rgb/Camera_{i % 2}" for i in range(200)]
    train, val = split_by_name(names, "train", 0.1), split_by_name(names, "val", 0.1)
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(names)
    assert 5 < len(val) < 40  # about 10%
    assert split_by_name(names[::-1], "val", 0.1) == val[::-1]  # by name, not position
    assert split_by_name(names, "val", 0.0) == []


@pytest.mark.parametrize("source,expected", [("co3d", "Co3D"), ("vkitti", "Virtual KITTI 2"), ("folder", "scene.json")])
def test_a_missing_root_names_the_path_and_what_the_source_expects(tmp_path, source, expected):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"{missing}: data.root is not a directory; expected .*{expected}"):
        build_source(DataConfig(source=source, root=str(missing)), "train")
