"""Camera geometry shared by the data pipeline and the losses.

Conventions (the same as upstream VGGT's training data code):
- extrinsics (..., 3, 4) are OpenCV camera-from-world [R | t]: x_cam = R @ x_world + t, with the camera
  looking down +z, x to the right and y down.
- intrinsics (..., 3, 3) are in pixels, and pixel (column u, row v) is centred at image coordinate
  (u, v) ("integer centres"): a depth sample at pixel (u, v) unprojects to x = (u - cx) d / fx,
  y = (v - cy) d / fy, as upstream's training data code does (dataset_util.depth_to_cam_coords_points)
  and as Virtual KITTI 2's intrinsics are written (cx = (1242 - 1) / 2). The image spans
  [-0.5, W - 0.5] x [-0.5, H - 0.5] and its centre is ((W - 1) / 2, (H - 1) / 2). Data whose
  intrinsics put pixel centres at (u + 0.5, v + 0.5) (COLMAP's, for one) is converted on read
  (`to_integer_centres`, a data source's `pixel_centre: half`), so every batch is in this one
  convention. Resizing by s maps a coordinate x to (x + 0.5) s - 0.5.
- depth is the camera-frame z of the surface point, not the distance along the ray.
- Quaternions are XYZW (scalar last) and standardised to w >= 0.
- The pose encoding "absT_quaR_FoV" is [t (3), quaternion (4), fov_h, fov_w] with
  fov_h = 2 atan(H / (2 fy)) and fov_w = 2 atan(W / (2 fx)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

POSE_ENCODING_DIM = 9


def quat_to_rotation(quat: torch.Tensor) -> torch.Tensor:
    """XYZW quaternions (..., 4), any nonzero norm, to rotation matrices (..., 3, 3)."""
    x, y, z, w = quat.unbind(-1)
    s = 2.0 / (quat * quat).sum(-1)  # dividing by the squared norm makes unnormalised inputs valid
    rows = (
        1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
        s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
        s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y),
    )
    return torch.stack(rows, -1).reshape(quat.shape[:-1] + (3, 3))


def rotation_to_quat(rot: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) to XYZW unit quaternions with w >= 0.

    Each of the four components can be recovered from the diagonal alone; the other three then follow
    from off-diagonal sums or differences divided by it. Dividing by the largest one is the
    well-conditioned choice (Shepperd's method), so all four candidates are built and the best picked.
    """
    m = rot.reshape(rot.shape[:-2] + (9,)).unbind(-1)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m
    # 4 * component^2 for w, x, y, z
    four_sq = torch.stack([
        1 + m00 + m11 + m22,
        1 + m00 - m11 - m22,
        1 - m00 + m11 - m22,
        1 - m00 - m11 + m22,
    ], -1)
    # Row k holds 4 * q_k * (w, x, y, z); dividing by 4 * q_k = 2 * sqrt(four_sq_k) gives the quaternion.
    products = torch.stack([
        torch.stack([four_sq[..., 0], m21 - m12, m02 - m20, m10 - m01], -1),
        torch.stack([m21 - m12, four_sq[..., 1], m10 + m01, m02 + m20], -1),
        torch.stack([m02 - m20, m10 + m01, four_sq[..., 2], m12 + m21], -1),
        torch.stack([m10 - m01, m02 + m20, m12 + m21, four_sq[..., 3]], -1),
    ], -2)
    best = four_sq.argmax(-1)
    chosen = torch.gather(products, -2, best[..., None, None].expand(best.shape + (1, 4))).squeeze(-2)
    # clamp keeps the unchosen branches of the graph finite; the chosen one is >= 1 always.
    denom = 2.0 * torch.gather(four_sq, -1, best[..., None]).clamp_min(1e-12).sqrt()
    wxyz = chosen / denom
    xyzw = torch.cat([wxyz[..., 1:], wxyz[..., :1]], -1)
    return torch.where(xyzw[..., 3:] < 0, -xyzw, xyzw)


def extrinsics_intrinsics_to_pose_encoding(
    extrinsics: torch.Tensor, intrinsics: torch.Tensor, image_hw: tuple[int, int]
) -> torch.Tensor:
    """(..., 3, 4) extrinsics and (..., 3, 3) intrinsics to the (..., 9) absT_quaR_FoV encoding, in
    float32 whatever the input dtype (the camera head predicts it in float32)."""
    height, width = image_hw
    quat = rotation_to_quat(extrinsics[..., :3, :3])
    fov_h = 2 * torch.atan((height / 2) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((width / 2) / intrinsics[..., 0, 0])
    return torch.cat([extrinsics[..., :3, 3], quat, fov_h[..., None], fov_w[..., None]], -1).float()


def pose_encoding_to_extrinsics_intrinsics(
    encoding: torch.Tensor, image_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `extrinsics_intrinsics_to_pose_encoding`; the principal point is the image centre,
    ((W - 1) / 2, (H - 1) / 2) in this module's convention (upstream's decoder writes (W / 2, H / 2),
    which is the centre only with half-pixel centres; the encoding itself holds no principal point)."""
    if encoding.shape[-1] != POSE_ENCODING_DIM:
        raise ValueError(f"pose encoding has {encoding.shape[-1]} channels, expected {POSE_ENCODING_DIM}")
    height, width = image_hw
    rot = quat_to_rotation(encoding[..., 3:7])
    extrinsics = torch.cat([rot, encoding[..., :3, None]], -1)
    fy = (height / 2) / torch.tan(encoding[..., 7] / 2)
    fx = (width / 2) / torch.tan(encoding[..., 8] / 2)
    intrinsics = make_intrinsics(fx, fy, torch.full_like(fx, (width - 1) / 2), torch.full_like(fy, (height - 1) / 2))
    return extrinsics, intrinsics


def make_intrinsics(fx: torch.Tensor, fy: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    rows = (fx, zero, cx, zero, fy, cy, zero, zero, one)
    return torch.stack(rows, -1).reshape(fx.shape + (3, 3))


def invert_extrinsics(extrinsics: torch.Tensor) -> torch.Tensor:
    """Camera-from-world [R | t] (..., 3, 4) to world-from-camera [R^T | -R^T t]."""
    rot_t = extrinsics[..., :3, :3].transpose(-1, -2)
    trans = -(rot_t @ extrinsics[..., :3, 3:])
    return torch.cat([rot_t, trans], -1)


def compose_extrinsics(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a after b, both (..., 3, 4) rigid transforms: x -> a(b(x))."""
    rot = a[..., :3, :3] @ b[..., :3, :3]
    trans = a[..., :3, :3] @ b[..., :3, 3:] + a[..., :3, 3:]
    return torch.cat([rot, trans], -1)


def transform_points(transform: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply (..., 3, 4) to points (..., *, 3) where * are any number of spatial dims."""
    batch = transform.shape[:-2]
    flat = points.reshape(batch + (-1, 3))  # one batched matmul instead of a 3x3 product per point
    out = flat @ transform[..., :3, :3].transpose(-1, -2) + transform[..., None, :3, 3]
    return out.reshape(points.shape)


def pixel_grid(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H, W, 2) image coordinates (x, y) of the pixel centres: (column, row), integer centres."""
    v, u = torch.meshgrid(torch.arange(height, device=device, dtype=dtype),
                          torch.arange(width, device=device, dtype=dtype), indexing="ij")
    return torch.stack([u, v], -1)


PIXEL_CENTRES = ("integer", "half")


def to_integer_centres(intrinsics: torch.Tensor, pixel_centre: str) -> torch.Tensor:
    """Intrinsics written for `pixel_centre` ("integer": pixel (u, v) at (u, v); "half": at (u + 0.5,
    v + 0.5)) expressed in this module's integer-centre convention: the principal point moves by -0.5."""
    if pixel_centre not in PIXEL_CENTRES:
        raise ValueError(f"pixel_centre={pixel_centre!r}; valid: {', '.join(PIXEL_CENTRES)}")
    if pixel_centre == "integer":
        return intrinsics
    out = intrinsics.clone()
    out[..., 0, 2] -= 0.5
    out[..., 1, 2] -= 0.5
    return out


def unproject_depth(depth: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Depth (..., H, W) and intrinsics (..., 3, 3) to camera-frame points (..., H, W, 3)."""
    height, width = depth.shape[-2:]
    uv = pixel_grid(height, width, depth.device, depth.dtype)
    shape = intrinsics.shape[:-2] + (1, 1)
    fx, fy = intrinsics[..., 0, 0].reshape(shape), intrinsics[..., 1, 1].reshape(shape)
    cx, cy = intrinsics[..., 0, 2].reshape(shape), intrinsics[..., 1, 2].reshape(shape)
    x = (uv[..., 0] - cx) / fx * depth
    y = (uv[..., 1] - cy) / fy * depth
    return torch.stack([x, y, depth], -1)


def depth_to_points(
    depth: torch.Tensor, extrinsics: torch.Tensor, intrinsics: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth maps (..., H, W) to (world points, camera points), each (..., H, W, 3)."""
    cam_points = unproject_depth(depth, intrinsics)
    world_points = transform_points(invert_extrinsics(extrinsics), cam_points)
    return world_points, cam_points


def project_points(
    points: torch.Tensor, extrinsics: torch.Tensor, intrinsics: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """World points (..., *, 3) to image coordinates (..., *, 2) and camera-frame depth (..., *).

    Points at or behind the camera get non-finite pixel coordinates; callers mask with depth > 0.
    """
    cam = transform_points(extrinsics, points)
    extra = points.dim() - extrinsics.dim() + 1
    k = intrinsics.reshape(intrinsics.shape[:-2] + (1,) * extra + (3, 3))
    z = cam[..., 2]
    u = k[..., 0, 0] * cam[..., 0] / z + k[..., 0, 2]
    v = k[..., 1, 1] * cam[..., 1] / z + k[..., 1, 2]
    return torch.stack([u, v], -1), z


def look_at_extrinsics(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """OpenCV camera-from-world (..., 3, 4) for cameras at `eye` looking at `target`.

    `up` is the world direction that should appear upward in the image (image y points down).
    """
    forward = F.normalize(target - eye, dim=-1)
    right = F.normalize(torch.cross(forward, up.expand_as(forward), dim=-1), dim=-1)
    down = torch.cross(forward, right, dim=-1)
    rot = torch.stack([right, down, forward], -2)  # rows: camera axes in world coordinates
    trans = -(rot @ eye[..., None])
    return torch.cat([rot, trans], -1)
