import numpy as np
import torch

from vggt_fsdp.data.augment import photometric, photometric_frames
from vggt_fsdp.data.config import AugmentConfig


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
