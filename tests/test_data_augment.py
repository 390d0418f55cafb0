import numpy as np
import pytest
import torch

from vggt_fsdp.data.augment import (
    CropBox, crop_intrinsics, crop_resize, draw_crop, photometric, photometric_frames, rounded_box,
)
from vggt_fsdp.data.config import AugmentConfig, SyntheticConfig
from vggt_fsdp.data.synthetic import draw_cameras, make_scene, render


@pytest.mark.parametrize("factor", [1, 3])
def test_crop_resize_and_crop_intrinsics_describe_the_same_image(factor):
    """Cropping a rendered frame and resizing by an odd integer factor (whose output pixel centres
    fall on source pixel centres) equals rendering directly with the cropped intrinsics."""
    cfg = SyntheticConfig()
    scene = make_scene(2, 1, cfg)
    src_hw, out_hw = (60, 90), (12, 18)
    extr, intr = draw_cameras(scene, np.random.default_rng(1), 1, src_hw, cfg.fov_range_deg)
    image, depth, mask, _ = render(scene, extr[0], intr[0], src_hw)
    box = CropBox(7, 5, out_hw[1] * factor, out_hw[0] * factor)
    _, cropped_depth, cropped_mask = crop_resize(image, depth, mask, box, out_hw)
    _, direct_depth, direct_mask, _ = render(scene, extr[0], crop_intrinsics(intr[0], box, out_hw), out_hw)
    assert torch.equal(cropped_mask, direct_mask)
    assert torch.allclose(cropped_depth, direct_depth, rtol=1e-5)


def test_draw_crop_keeps_the_principal_point_centred_and_zooms():
    rng = np.random.default_rng(0)
    cfg = AugmentConfig(crop_scale_range=[0.5, 0.5])
    full = draw_crop(rng, (100, 200), (50, 50), (120.0, 40.0), None)
    # the largest square centred on (120, 40) is limited by the top edge: 80 x 80
    assert (full.width, full.height) == (80.0, 80.0) and (full.x0, full.y0) == (80.0, 0.0)
    zoomed = draw_crop(rng, (100, 200), (50, 50), (120.0, 40.0), cfg)
    assert zoomed.width == pytest.approx(40.0) and zoomed.x0 + zoomed.width / 2 == pytest.approx(120.0)
    k = torch.tensor([[100.0, 0, 120], [0, 100, 40], [0, 0, 1]])
    out = crop_intrinsics(k, zoomed, (50, 50))
    assert out[0, 2] == pytest.approx(25.0) and out[1, 2] == pytest.approx(25.0)  # centred
    assert out[0, 0] == pytest.approx(100 * 50 / 40)
    assert rounded_box(CropBox(1.4, 2.6, 10.2, 3.3)) == CropBox(1, 3, 11, 3)
    # upstream's scales above 1 mean "no crop" (capped), never a window larger than the image
    wide = draw_crop(rng, (100, 200), (50, 50), (120.0, 40.0), AugmentConfig(crop_scale_range=[1.1, 1.2]))
    assert wide == full


def test_photometric_is_deterministic_in_range_and_off_when_disabled():
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = AugmentConfig(color_jitter_prob=1.0, grayscale_prob=0.0)
    a = photometric(image, np.random.default_rng(5), cfg)
    b = photometric(image, np.random.default_rng(5), cfg)
    assert torch.equal(a, b) and 0 <= a.min() and a.max() <= 1 and not torch.allclose(a, image)
    assert torch.equal(photometric(image, np.random.default_rng(5), AugmentConfig(enabled=False)), image)


def test_cojitter_gives_every_frame_of_a_scene_the_same_colours():
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    shared = photometric_frames([image] * 3, np.random.default_rng(1), AugmentConfig(cojitter_prob=1.0))
    assert torch.equal(shared[0], shared[1]) and torch.equal(shared[1], shared[2])
    apart = photometric_frames([image] * 3, np.random.default_rng(1),
                               AugmentConfig(cojitter_prob=0.0, color_jitter_prob=1.0))
    assert not torch.equal(apart[0], apart[1])
