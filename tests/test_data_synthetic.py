import numpy as np
import pytest
import torch

from vggt_fsdp.data import DataConfig, build_dataloader
from vggt_fsdp.data.base import SampleSpec, build_sample
from vggt_fsdp.data.config import AugmentConfig, SyntheticConfig
from vggt_fsdp.data.synthetic import SyntheticSource, depth_at, draw_cameras, make_scene, render
from vggt_fsdp.geometry import depth_to_points, project_points

HW = (42, 56)


def _views(seed: int, frames: int = 4):
    cfg = SyntheticConfig()
    scene = make_scene(seed, 7, cfg)
    extr, intr = draw_cameras(scene, np.random.default_rng(seed), frames, HW, cfg.fov_range_deg)
    renders = [render(scene, e, k, HW) for e, k in zip(extr, intr)]
    return scene, extr, intr, renders


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_depth_reprojects_exactly_between_views(seed):
    """Unproject view i's depth, project into view j: view j sees that depth there (1e-3 relative)
    wherever the point is visible, and never sees *behind* it (that would mean wrong geometry)."""
    scene, extr, intr, renders = _views(seed)
    checked = total = 0
    for i in range(len(extr)):
        depth_i, mask_i = renders[i][1], renders[i][2]
        world, _ = depth_to_points(depth_i, extr[i], intr[i])
        points = world[mask_i]
        for j in range(len(extr)):
            if i == j:
                continue
            uv, z = project_points(points, extr[j], intr[j])
            inside = (z > 1e-3) & (uv[:, 0] > 0) & (uv[:, 0] < HW[1]) & (uv[:, 1] > 0) & (uv[:, 1] < HW[0])
            seen = depth_at(scene, extr[j], intr[j], uv[inside])
            rel = (seen - z[inside]) / z[inside]
            # Seeing *beyond* a surface point would mean wrong geometry; only a ray grazing an object's
            # silhouette edge may slip past it by float error.
            assert (rel > 1e-3).float().mean() < 0.01, "view j sees beyond surface points of view i"
            visible = rel.abs() < 1e-3
            checked += int(visible.sum())
            total += len(rel)
    # the points that agree are the visible ones; occlusion explains the rest, never most of them
    assert checked > 500 and checked > 0.25 * total


def test_rendered_depth_matches_exact_depth_on_pixel_centres():
    scene, extr, intr, renders = _views(3, frames=2)
    # pixel (u, v) is centred at image coordinate (u, v): the convention the unprojection uses
    v, u = torch.meshgrid(torch.arange(HW[0]), torch.arange(HW[1]), indexing="ij")
    exact = depth_at(scene, extr[1], intr[1], torch.stack([u, v], -1).reshape(-1, 2).float()).reshape(HW)
    depth, mask = renders[1][1], renders[1][2]
    assert torch.equal(mask, torch.isfinite(exact))
    assert torch.allclose(depth[mask], exact[mask])


def test_cameras_are_proper_rotations_and_varied():
    _, extr, intr, renders = _views(4, frames=8)
    rot = extr[:, :, :3]
    assert torch.allclose(rot @ rot.transpose(-1, -2), torch.eye(3).expand(8, -1, -1), atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(8), atol=1e-5)
    assert intr[:, 0, 0].std() > 1.0  # focal lengths vary between frames
    centres = -(rot.transpose(-1, -2) @ extr[:, :, 3:])[..., 0]
    assert torch.cdist(centres, centres).max() > 0.5  # cameras move
    for image, depth, mask, _ in renders:
        assert image.min() >= 0 and image.max() <= 1 and image.std() > 0.02  # textured, not flat
        assert (depth[mask] > 0).all() and (depth[~mask] == 0).all()


def test_scenes_are_deterministic_and_distinct():
    cfg = SyntheticConfig()
    a, b, c = make_scene(0, 5, cfg), make_scene(0, 5, cfg), make_scene(0, 6, cfg)
    assert torch.equal(a.colour_a, b.colour_a) and torch.equal(a.room_hi, b.room_hi)
    assert not torch.equal(a.room_hi, c.room_hi)


def test_sample_is_normalised_as_upstream_and_geometry_consistent():
    cfg = DataConfig()
    source = SyntheticSource(cfg, cfg, "train")
    spec = SampleSpec(index=3, num_frames=3, image_hw=HW, seed=(0, 0, 0, 0, 0), step=0, next_position=1)
    sample = build_sample(source, spec, AugmentConfig())  # augmented: crop-zoomed intrinsics must stay exact
    extr, mask = sample["extrinsics"], sample["point_masks"]
    assert torch.allclose(extr[0], torch.cat([torch.eye(3), torch.zeros(3, 1)], -1), atol=1e-5)
    assert sample["world_points"][mask].norm(dim=-1).mean() == pytest.approx(1.0, rel=1e-3)
    world, cam = depth_to_points(sample["depths"], extr, sample["intrinsics"])
    assert torch.allclose(world[mask], sample["world_points"][mask], atol=1e-4)
    assert torch.allclose(cam, sample["cam_points"], atol=1e-5)
    # frame 0's camera points are its world points after normalisation
    assert torch.allclose(sample["cam_points"][0][mask[0]], sample["world_points"][0][mask[0]], atol=1e-4)


def test_tracks_start_at_queries_and_visible_tracks_land_on_the_surface():
    cfg = DataConfig()
    cfg.synthetic.num_track_queries = 32
    source = SyntheticSource(cfg, cfg, "train")
    spec = SampleSpec(index=1, num_frames=4, image_hw=HW, seed=(1,), step=0, next_position=1)
    sample = build_sample(source, spec, None)
    tracks, vis = sample["tracks"], sample["track_vis_mask"]
    assert tracks.shape == (4, 32, 2) and vis.shape == (4, 32)
    assert vis[0].all() and torch.equal(tracks[0], tracks[0].round())  # queries are pixel centres
    assert vis[1:].any() and not vis[1:].all()
    world0 = sample["world_points"][0][tracks[0, :, 1].long(), tracks[0, :, 0].long()]  # (N, 3)
    uv, z = project_points(world0[None].expand(4, -1, -1), sample["extrinsics"], sample["intrinsics"])
    assert torch.allclose(uv[vis], tracks[vis], atol=1e-3)  # tracks are image coordinates (integer centres)


def test_photometric_augmentation_changes_colours_not_geometry():
    cfg = DataConfig()
    source = SyntheticSource(cfg, cfg, "train")
    spec = SampleSpec(index=2, num_frames=2, image_hw=HW, seed=(9,), step=0, next_position=1)
    aug = AugmentConfig(color_jitter_prob=1.0, crop_scale_range=[1.0, 1.0], zoom_max=0.0)
    plain = build_sample(source, spec, AugmentConfig(color_jitter_prob=0.0, grayscale_prob=0.0,
                                                     crop_scale_range=[1.0, 1.0], zoom_max=0.0))
    jittered = build_sample(source, spec, aug)
    assert not torch.allclose(plain["images"], jittered["images"], atol=1e-2)
    assert torch.allclose(plain["depths"], jittered["depths"])
    gray = build_sample(source, spec, AugmentConfig(color_jitter_prob=0.0, grayscale_prob=1.0,
                                                    crop_scale_range=[1.0, 1.0], zoom_max=0.0))
    assert torch.allclose(gray["images"][:, 0], gray["images"][:, 1])


def test_loader_batches_have_upstream_keys_shapes_and_types():
    cfg = DataConfig(frames_range=[2, 5], frames_per_gpu=10, image_width=56, num_workers=0)
    batch = next(iter(build_dataloader(cfg)))
    b, s = batch["images"].shape[:2]
    h, w = batch["images"].shape[-2:]
    assert b == 10 // s and w == 56 and h % 14 == 0
    expected = {
        "images": (b, s, 3, h, w), "depths": (b, s, h, w), "extrinsics": (b, s, 3, 4),
        "intrinsics": (b, s, 3, 3), "world_points": (b, s, h, w, 3), "cam_points": (b, s, h, w, 3),
        "point_masks": (b, s, h, w), "tracks": (b, s, 64, 2), "track_vis_mask": (b, s, 64),
        "query_points": (b, 64, 2), "skipped_frames": (b,), "scene_scale": (b,), "source_index": (b,),
    }
    assert {k: tuple(v.shape) for k, v in batch.items()} == expected
    assert batch["point_masks"].dtype == torch.bool and batch["images"].dtype == torch.float32
    assert 0 <= batch["images"].min() and batch["images"].max() <= 1


def test_shading_normals_are_unit_and_face_the_camera():
    from vggt_fsdp.data.synthetic import camera_rays, cast
    from vggt_fsdp.geometry import pixel_grid

    scene, extr, intr, _ = _views(5, frames=1)
    centre, dirs = camera_rays(extr[0], intr[0], pixel_grid(*HW).reshape(-1, 2))
    hits = cast(scene, centre, dirs, normals=True)
    hit = torch.isfinite(hits.t)
    assert torch.allclose(hits.normal[hit].norm(dim=-1), torch.ones(int(hit.sum())), atol=1e-4)
    assert ((hits.normal[hit] * dirs[hit]).sum(-1) < 0).all()
    assert len(hits.surface[hit].unique()) > 3  # walls, floor and objects are all in view
