import math

import pytest
import torch

from vggt_fsdp.geometry import (
    compose_extrinsics, depth_to_points, extrinsics_intrinsics_to_pose_encoding, invert_extrinsics,
    look_at_extrinsics, make_intrinsics, pixel_grid, pose_encoding_to_extrinsics_intrinsics,
    project_points, quat_to_rotation, rotation_to_quat, to_integer_centres,
)


def _random_quats(n: int, gen: torch.Generator) -> torch.Tensor:
    q = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    return q / q.norm(dim=-1, keepdim=True)


def _random_cameras(n: int, hw: tuple[int, int], gen: torch.Generator):
    rot = quat_to_rotation(_random_quats(n, gen)).float()
    trans = torch.randn(n, 3, 1, generator=gen) * 3
    f = 0.5 * hw[1] / torch.tan(torch.empty(n).uniform_(0.3, 1.2, generator=gen))
    intr = make_intrinsics(f, f * 1.02, torch.full_like(f, (hw[1] - 1) / 2), torch.full_like(f, (hw[0] - 1) / 2))
    return torch.cat([rot, trans], -1), intr


def test_quaternion_matrix_round_trip_is_exact_and_standardised():
    gen = torch.Generator().manual_seed(0)
    q = _random_quats(2000, gen)
    # include the numerically hard cases: identity and half turns about each axis (w = 0)
    q = torch.cat([q, torch.eye(4, dtype=torch.float64)])
    back = rotation_to_quat(quat_to_rotation(q))
    assert (back[:, 3] >= 0).all()
    # q and -q are the same rotation; compare up to sign
    err = torch.minimum((back - q).abs().amax(-1), (back + q).abs().amax(-1))
    assert err.max() < 1e-10


def test_quat_to_rotation_gives_proper_rotations_even_unnormalised():
    gen = torch.Generator().manual_seed(1)
    q = _random_quats(100, gen) * torch.rand(100, 1, generator=gen, dtype=torch.float64).add(0.1) * 5
    rot = quat_to_rotation(q)
    eye = torch.eye(3, dtype=torch.float64).expand_as(rot)
    assert torch.allclose(rot @ rot.transpose(-1, -2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(100, dtype=torch.float64), atol=1e-12)
    # XYZW order: a quarter turn about z with w last maps x to y
    quarter_z = torch.tensor([0.0, 0.0, math.sin(math.pi / 4), math.cos(math.pi / 4)], dtype=torch.float64)
    assert torch.allclose(quat_to_rotation(quarter_z) @ torch.tensor([1.0, 0, 0], dtype=torch.float64),
                          torch.tensor([0.0, 1, 0], dtype=torch.float64), atol=1e-12)


def test_pose_encoding_round_trip_to_1e_5():
    gen = torch.Generator().manual_seed(2)
    hw = (294, 518)
    extr, intr = _random_cameras(64, hw, gen)
    enc = extrinsics_intrinsics_to_pose_encoding(extr.view(8, 8, 3, 4), intr.view(8, 8, 3, 3), hw)
    assert enc.shape == (8, 8, 9)
    extr2, intr2 = pose_encoding_to_extrinsics_intrinsics(enc, hw)
    assert torch.allclose(extr2.view(64, 3, 4), extr, atol=1e-5)
    # focal lengths round-trip relative to their size; the principal point is the image centre,
    # ((W - 1) / 2, (H - 1) / 2) with integer pixel centres
    assert torch.allclose(intr2.view(64, 3, 3), intr, rtol=1e-5, atol=1e-5)
    enc2 = extrinsics_intrinsics_to_pose_encoding(extr2, intr2, hw)
    assert torch.allclose(enc2, enc, atol=1e-5)


def test_pose_encoding_layout_matches_upstream():
    hw = (100, 200)
    extr = torch.cat([torch.eye(3), torch.tensor([[1.0], [2.0], [3.0]])], -1)[None]
    intr = make_intrinsics(torch.tensor([100.0]), torch.tensor([50.0]), torch.tensor([100.0]), torch.tensor([50.0]))
    enc = extrinsics_intrinsics_to_pose_encoding(extr, intr, hw)[0]
    expected = [1, 2, 3, 0, 0, 0, 1, 2 * math.atan(50 / 50), 2 * math.atan(100 / 100)]
    assert torch.allclose(enc, torch.tensor(expected), atol=1e-6)


def test_rotation_to_quat_gradient_is_finite_at_hard_rotations():
    rots = quat_to_rotation(torch.cat([torch.eye(4), torch.tensor([[0.6, 0.8, 0.0, 0.0]])])).requires_grad_()
    rotation_to_quat(rots).sum().backward()
    assert torch.isfinite(rots.grad).all()


def test_unproject_then_project_returns_the_pixel_grid_and_depth():
    gen = torch.Generator().manual_seed(3)
    hw = (6, 9)
    extr, intr = _random_cameras(2, hw, gen)
    depth = torch.rand(2, *hw, generator=gen) * 5 + 0.5
    world, cam = depth_to_points(depth, extr, intr)
    assert torch.allclose(cam[..., 2], depth)
    uv, z = project_points(world, extr, intr)
    assert torch.allclose(uv, pixel_grid(*hw).expand(2, -1, -1, -1), atol=1e-3)
    assert torch.allclose(z, depth, rtol=1e-5)


def test_invert_and_compose_extrinsics():
    gen = torch.Generator().manual_seed(4)
    extr, _ = _random_cameras(5, (10, 10), gen)
    ident = compose_extrinsics(extr, invert_extrinsics(extr))
    expected = torch.cat([torch.eye(3), torch.zeros(3, 1)], -1).expand(5, -1, -1)
    assert torch.allclose(ident, expected, atol=1e-5)


def test_look_at_centres_the_target_with_up_upward():
    eye = torch.tensor([[3.0, 0.0, 1.0]])
    target = torch.tensor([[0.0, 0.0, 1.0]])
    extr = look_at_extrinsics(eye, target, torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(torch.linalg.det(extr[..., :3]), torch.ones(1), atol=1e-6)
    intr = make_intrinsics(*(torch.tensor([v]) for v in (100.0, 100.0, 50.0, 40.0)))
    uv, z = project_points(torch.cat([target, target + torch.tensor([[0.0, 0.0, 0.5]])]).view(1, 2, 3), extr, intr)
    assert torch.allclose(uv[0, 0], torch.tensor([50.0, 40.0]), atol=1e-4) and z[0, 0] == pytest.approx(3.0)
    assert uv[0, 1, 1] < 40.0  # a point above the target appears higher in the image (smaller v)


def test_pixel_centres_are_at_integers_as_upstream_training_code_unprojects():
    # upstream's dataset_util.depth_to_cam_coords_points: x_cam = (u - cx) * depth / fx for column u
    intr = make_intrinsics(*(torch.tensor(v) for v in (10.0, 20.0, 2.0, 1.0)))
    _, cam = depth_to_points(torch.full((2, 4), 3.0), torch.cat([torch.eye(3), torch.zeros(3, 1)], -1), intr)
    assert cam[0, 0].tolist() == pytest.approx([(0 - 2.0) * 3 / 10, (0 - 1.0) * 3 / 20, 3.0])
    assert cam[1, 3].tolist() == pytest.approx([(3 - 2.0) * 3 / 10, (1 - 1.0) * 3 / 20, 3.0])
    assert pixel_grid(2, 3)[1, 2].tolist() == [2.0, 1.0]


def test_half_pixel_intrinsics_convert_to_the_same_rays():
    """A camera written with half-pixel centres (COLMAP's convention) and the same camera in the
    toolkit's convention give pixel (u, v) the same ray."""
    half = make_intrinsics(*(torch.tensor(v) for v in (50.0, 60.0, 16.0, 12.0)))  # centre of a 32x24 image
    integer = to_integer_centres(half, "half")
    assert integer[0, 2] == 15.5 and integer[1, 2] == 11.5 and torch.equal(integer[:2, :2], half[:2, :2])
    u, v = 7, 3
    ray_half = ((u + 0.5 - half[0, 2]) / half[0, 0], (v + 0.5 - half[1, 2]) / half[1, 1])
    _, cam = depth_to_points(torch.ones(24, 32), torch.cat([torch.eye(3), torch.zeros(3, 1)], -1), integer)
    assert cam[v, u, :2].tolist() == pytest.approx([float(r) for r in ray_half])
    assert torch.equal(to_integer_centres(half, "integer"), half)
    with pytest.raises(ValueError, match="pixel_centre='corner'"):
        to_integer_centres(half, "corner")
