"""Crop, resize and zoom as upstream, with intrinsics that describe the resampled pixels exactly."""
import math

import numpy as np
import pytest
import torch

from vggt_fsdp.data.config import AugmentConfig, SyntheticConfig
from vggt_fsdp.data.crop import CropBox, CropPlan, apply_plan, plan_crop, plan_intrinsics
from vggt_fsdp.data.synthetic import draw_cameras, make_scene, render
from vggt_fsdp.geometry import make_intrinsics

NO_AUG = None


@pytest.mark.parametrize("src_hw", [(12, 18), (36, 54), (60, 90)])  # scale 1, 1/3, 1/5 to (12, 18)
def test_resized_frame_equals_the_frame_rendered_with_the_planned_intrinsics(src_hw):
    """Shrinking by an odd integer factor puts every output pixel centre on a source pixel centre, so
    nearest-neighbour depth is exact: the resized depth equals a direct render with the planned
    intrinsics (integer pixel centres in both)."""
    cfg = SyntheticConfig()
    scene = make_scene(2, 1, cfg)
    out_hw = (12, 18)
    extr, intr = draw_cameras(scene, np.random.default_rng(1), 1, src_hw, cfg.fov_range_deg)
    image, depth, mask, _ = render(scene, extr[0], intr[0], src_hw)
    plan = plan_crop(np.random.default_rng(0), src_hw, (float(intr[0, 0, 2]), float(intr[0, 1, 2])), out_hw, 0, NO_AUG)
    assert plan.scale == pytest.approx(out_hw[0] / src_hw[0]) and plan.first == CropBox(0, 0, src_hw[1], src_hw[0])
    _, resized_depth, resized_mask = apply_plan(image, depth, mask, plan)
    _, direct_depth, direct_mask, _ = render(scene, extr[0], plan_intrinsics(intr[0], plan), out_hw)
    assert torch.equal(resized_mask, direct_mask)
    assert torch.allclose(resized_depth, direct_depth, rtol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_resampled_pixels_sit_where_the_planned_intrinsics_put_them(seed):
    """At any (non-integer) zoom, bilinear resampling of an image that holds its own coordinates
    returns, at output pixel (u, v), the source coordinate whose ray the planned intrinsics give
    (u, v): the intrinsics are exact, not rounded."""
    src_hw, out_hw = (20, 30), (28, 42)
    v, u = torch.meshgrid(torch.arange(src_hw[0], dtype=torch.float64), torch.arange(src_hw[1], dtype=torch.float64),
                          indexing="ij")
    coords = torch.stack([u, v, torch.zeros_like(u)]) / 100  # in [0, 1] for apply_plan's clamp
    k = make_intrinsics(*(torch.tensor(x, dtype=torch.float64) for x in (35.0, 35.0, 14.3, 9.1)))
    aug = AugmentConfig(crop_scale_range=[0.5, 0.9], zoom_max=0.3)
    plan = plan_crop(np.random.default_rng(seed), src_hw, (14.3, 9.1), out_hw, 4, aug)
    assert plan.scale > 1 and plan.scale != round(plan.scale)  # upsampling, so bilinear is exact inside
    out, _, _ = apply_plan(coords, torch.ones(src_hw, dtype=torch.float64), torch.ones(src_hw, dtype=torch.bool), plan)
    k_out = plan_intrinsics(k, plan)
    # the sampled source coordinate of each output pixel ...
    sampled_u, sampled_v = out[0] * 100, out[1] * 100
    # ... carries the ray the output intrinsics give that pixel
    ou, ov = torch.meshgrid(torch.arange(out_hw[0], dtype=torch.float64), torch.arange(out_hw[1], dtype=torch.float64),
                            indexing="ij")[::-1]
    inner = (sampled_u > 0) & (sampled_u < src_hw[1] - 1) & (sampled_v > 0) & (sampled_v < src_hw[0] - 1)
    assert inner.float().mean() > 0.8
    ray_out = torch.stack([(ou - k_out[0, 2]) / k_out[0, 0], (ov - k_out[1, 2]) / k_out[1, 1]])
    ray_src = torch.stack([(sampled_u - k[0, 2]) / k[0, 0], (sampled_v - k[1, 2]) / k[1, 1]])
    assert torch.allclose(ray_out[:, inner], ray_src[:, inner], atol=1e-9)


def test_plan_follows_upstream_margin_crop_scales_and_zoom():
    src_hw, out_hw, pp = (100, 200), (28, 56), (99.5, 49.5)  # principal point at the image centre
    plain = plan_crop(np.random.default_rng(0), src_hw, pp, out_hw, 4, None)
    # whole image, one scale so the target plus the 4 px margin is covered, then a centred crop
    assert plain.first == CropBox(0, 0, 200, 100) and plain.scale == pytest.approx(max(32 / 100, 60 / 200))
    assert plain.resized_hw() == (32, 64) and plain.second == CropBox(4, 2, 56, 28)
    half = plan_crop(np.random.default_rng(0), src_hw, pp, out_hw, 0, AugmentConfig(crop_scale_range=[0.5, 0.5],
                                                                                    zoom_max=0.0))
    assert half.first == CropBox(50, 25, 100, 50)  # both sides halved, centred on the principal point
    # upstream draws the height and width fractions separately; one draw as an option
    rng_draws = np.random.default_rng(3).uniform(0.6, 0.9, 2)
    aug = AugmentConfig(crop_scale_range=[0.6, 0.9], zoom_max=0.0)
    separate = plan_crop(np.random.default_rng(3), src_hw, pp, out_hw, 0, aug)
    assert (separate.first.height, separate.first.width) == pytest.approx(
        (2 * round(math.floor(100 * rng_draws[0]) / 2), 2 * round(math.floor(200 * rng_draws[1]) / 2)), abs=1)
    aug.crop_scale_per_axis = False
    joint = plan_crop(np.random.default_rng(3), src_hw, pp, out_hw, 0, aug)
    assert joint.first.height / 100 == pytest.approx(joint.first.width / 200, abs=0.011)
    zooms = [plan_crop(np.random.default_rng(s), src_hw, pp, out_hw, 4,
                       AugmentConfig(crop_scale_range=[1.0, 1.0], zoom_max=0.3)).scale / plain.scale for s in range(200)]
    # the height binds: (28 + 4 + 56 z) / (28 + 4), z ~ triangular(0, 0, 0.3)
    assert 1.0 <= min(zooms) and max(zooms) <= 1 + 0.3 * 56 / 32 + 1e-9
    assert np.median(zooms) < 1 + 0.3 * 56 / 32 / 2  # mode at 0: mostly small zooms


def test_focal_ratio_is_kept_exactly_and_the_principal_point_centred():
    k = make_intrinsics(*(torch.tensor(v) for v in (500.0, 500.0, 620.5, 187.5)))  # Virtual KITTI 2's camera
    for seed in range(20):
        plan = plan_crop(np.random.default_rng(seed), (375, 1242), (620.5, 187.5), (168, 518), 4, AugmentConfig())
        out = plan_intrinsics(k, plan)
        assert out[0, 0] == out[1, 1]  # upstream's per-axis rounding makes these differ by ~0.03%
        assert abs(out[0, 2] - (518 - 1) / 2) <= 0.5 + 1e-4 and abs(out[1, 2] - (168 - 1) / 2) <= 0.5 + 1e-4


def test_principal_point_outside_the_image_is_refused():
    with pytest.raises(ValueError, match=r"principal point \(300.0, 10.0\) lies outside the 200x100 image"):
        plan_crop(np.random.default_rng(0), (100, 200), (300.0, 10.0), (28, 56), 4, None)


def test_apply_plan_output_has_the_target_size():
    plan = CropPlan(CropBox(3, 2, 50, 40), 0.7, CropBox(1, 0, 33, 28))
    image, depth, mask = apply_plan(torch.rand(3, 60, 70), torch.rand(60, 70), torch.ones(60, 70, dtype=torch.bool), plan)
    assert image.shape == (3, 28, 33) and depth.shape == mask.shape == (28, 33) and plan.resized_hw() == (28, 35)
