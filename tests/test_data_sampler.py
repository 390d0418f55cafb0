import dataclasses

import pytest
import torch

from vggt_fsdp.data import DataConfig, build_dataloader
from vggt_fsdp.data.sampler import DynamicBatchSampler, image_hw_for


def _sampler(rank=0, world=2, num_scenes=50, **kw):
    cfg = DataConfig(**kw)
    return DynamicBatchSampler(num_scenes, cfg, 48, rank, world)


def test_every_rank_gets_the_same_shapes_and_different_scenes():
    r0, r1 = _sampler(rank=0), _sampler(rank=1)
    for step in range(20):
        a, b = r0.shape_at(step), r1.shape_at(step)
        assert a == b
        assert 2 <= a.num_frames <= 24 and a.scenes_per_rank == 48 // a.num_frames
        assert a.image_hw[1] == 518 and a.image_hw[0] % 14 == 0
        assert 518 * 0.33 - 14 < a.image_hw[0] <= 518
    specs0, specs1 = r0.specs_at(3, 100), r1.specs_at(3, 100)
    assert {s.index for s in specs0}.isdisjoint({s.index for s in specs1})
    assert {s.seed for s in specs0}.isdisjoint({s.seed for s in specs1})
    assert len({r0.shape_at(s).num_frames for s in range(50)}) > 5  # S really varies


def test_height_rule_matches_upstream():
    assert image_hw_for(1.0, 518, 14) == (518, 518)
    assert image_hw_for(0.33, 518, 14) == (168, 518)  # floor(170.94 / 14) * 14
    assert image_hw_for(0.01, 518, 14) == (14, 518)


def test_each_epoch_visits_every_scene_once_across_ranks():
    samplers = [_sampler(rank=r, num_scenes=30, frames_range=[4, 4]) for r in range(2)]  # 12 scenes a rank
    seen = []
    for step in range(5):  # 5 steps x 2 ranks x 12 scenes = 120 = 4 epochs of 30
        for s in samplers:
            seen += [spec.index for spec in s.specs_at(step, step * 24)]
    epochs = [seen[i:i + 30] for i in range(0, 120, 30)]
    assert all(sorted(e) == list(range(30)) for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    it = iter(samplers[0])
    next(it), next(it)
    assert samplers[0].state_dict() == {"step": 2, "position": 48}


def test_sampler_is_deterministic_given_seed_rank_step():
    a = [next(iter(_sampler(rank=1, seed=5))) for _ in range(2)]
    assert a[0] == a[1]
    assert next(iter(_sampler(rank=1, seed=6))) != a[0]


@pytest.mark.parametrize("group", [1, 2, 3])
def test_a_context_group_draws_the_same_scenes_on_each_rank_with_frames_a_multiple_of_its_size(group):
    """Ranks r of a group of N get the sampler of group r // N: same scenes, same seeds, and rank i of the
    group builds the i-th contiguous share of each scene's frames; scene lengths are multiples of N, and
    N = 1 draws exactly what the sampler drew before groups existed (whole scenes)."""
    cfg = DataConfig(frames_range=[2, 12], frames_per_gpu=12)
    samplers = [DynamicBatchSampler(40, cfg, 12, rank // group, 6 // group, context_parallel=group,
                                    context_rank=rank % group) for rank in range(6)]
    plain = DynamicBatchSampler(40, cfg, 12, 0, 6)
    for step in range(20):
        specs = [s.specs_at(step, 0) for s in samplers]
        frames = specs[0][0].num_frames
        for rank in range(6):
            whole = [dataclasses.replace(spec, frames=None) for spec in specs[rank]]
            assert whole == [dataclasses.replace(spec, frames=None) for spec in specs[rank - rank % group]]
            share, i = frames // group, rank % group
            assert {spec.frames for spec in specs[rank]} == {None if group == 1 else (i * share, (i + 1) * share)}
        assert frames % group == 0 and 2 <= frames <= 12
        assert len(specs[0]) == 12 * group // frames
        if group == 1:
            assert specs[0] == plain.specs_at(step, 0)


def test_bad_budgets_are_rejected_with_the_field_name():
    cfg = DataConfig(frames_per_gpu=10)  # frames_range [2, 24]
    with pytest.raises(ValueError, match="data.frames_per_gpu=10 is smaller"):
        cfg.check_frame_budget()
    # A context group of 3 GPUs holds 30 frames of a scene, but only multiples of 3 fit a group.
    cfg.check_frame_budget(3)
    with pytest.raises(ValueError, match="data.frames_per_gpu=10 x parallel.context_parallel=2 is smaller"):
        cfg.check_frame_budget(2)
    with pytest.raises(ValueError, match="holds no multiple of parallel.context_parallel=4"):
        DataConfig(frames_range=[5, 7], frames_per_gpu=8).check_frame_budget(4)
    with pytest.raises(ValueError, match="auto"):
        build_dataloader(DataConfig(frames_per_gpu="auto"))
    with pytest.raises(ValueError, match="data.root"):
        DataConfig(source="co3d").validate()


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_resumes_mid_epoch_from_its_state(workers):
    cfg = DataConfig(frames_range=[2, 3], frames_per_gpu=6, image_width=28, aspect_range=[0.5, 1.0],
                     num_workers=workers)
    cfg.synthetic.num_track_queries = 4
    loader = build_dataloader(cfg, rank=1, world_size=2)
    it = iter(loader)
    first = next(it)
    state = loader.state_dict()  # workers have prefetched further; the state must not count that
    second = next(it)
    next(it)  # one more: the state follows consumption
    del it
    resumed = build_dataloader(cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    again = next(iter(resumed))
    for key in second:
        assert torch.equal(again[key], second[key]), key
    assert not torch.equal(first["images"][:, :1, :, :14, :14], second["images"][:, :1, :, :14, :14])
    assert loader.state_dict()["step"] == 3


@pytest.mark.parametrize("override, field_name", [
    ({"co3d": {"min_frames": 0}}, "data.co3d.min_frames"),
    ({"vkitti": {"max_depth": -1.0}}, "data.vkitti.max_depth"),
    ({"augment": {"crop_scale_range": [0.9, 0.5]}}, "data.augment.crop_scale_range"),
    ({"synthetic": {"num_scenes": 0}}, "data.synthetic.num_scenes"),
    ({"frame_window": -1}, "data.frame_window"),
])
def test_nested_settings_are_validated_with_their_dotted_name(override, field_name):
    cfg = DataConfig()
    for key, value in override.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                setattr(getattr(cfg, key), sub, v)
        else:
            setattr(cfg, key, value)
    with pytest.raises(ValueError, match=field_name):
        cfg.validate()


def test_state_at_is_the_state_after_iterating_that_many_steps():
    sampler = _sampler(rank=1)
    states = [sampler.state_dict()]
    for _, _ in zip(range(6), sampler):
        states.append(sampler.state_dict())
    assert [_sampler(rank=1).state_at(step) for step in range(7)] == states
    assert states[-1]["position"] > 0
