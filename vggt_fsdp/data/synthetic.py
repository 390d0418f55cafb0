"""The built-in synthetic world: procedural rooms ray-cast on the fly with exact ground truth.

A scene is a room (floor, four walls and, half of the time, a ceiling; an open top leaves pixels with no
surface, which exercises the masks) holding axis-aligned-on-the-floor boxes (rotated about the vertical)
and spheres. Surfaces carry a solid 3-D checker texture with a per-surface colour pair and a
sinusoidal tint, lit by a fixed directional light (Lambertian, so a point looks the same from every
camera). Everything about scene i is a pure function of (seed, i); the cameras of one sample are drawn
from the sample's own generator: an arc around the room's centre with varied heights, targets, rolls
and focal lengths.

The world is z-up with the floor at z = 0. Each ray is X = C + t * d with d = R^T K^-1 [u, v, 1], so
the hit parameter t is the camera-frame depth itself: depth, camera points and world points are exact.
Pixel (u, v) is rendered along the ray through image coordinate (u, v), the convention the toolkit's
unprojection uses (vggt_fsdp.geometry), and principal points sit at the image centre ((W - 1) / 2,
(H - 1) / 2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vggt_fsdp.data.augment import photometric_frames
from vggt_fsdp.data.base import SampleSpec
from vggt_fsdp.data.config import AugmentConfig, DataConfig, SourceConfig, SyntheticConfig
from vggt_fsdp.data.crop import plan_crop, plan_intrinsics
from vggt_fsdp.geometry import (
    invert_extrinsics, look_at_extrinsics, make_intrinsics, pixel_grid, project_points, unproject_depth,
)

_EPS = 1e-4


@dataclass
class Scene:
    room_lo: torch.Tensor  # (3,) inner corner of the room
    room_hi: torch.Tensor
    open_top: bool
    box_centre: torch.Tensor  # (K, 3)
    box_half: torch.Tensor  # (K, 3)
    box_rot: torch.Tensor  # (K, 3, 3) world-from-local
    sphere_centre: torch.Tensor  # (M, 3)
    sphere_radius: torch.Tensor  # (M,)
    # Per surface, in the order [6 room faces, K boxes, M spheres]:
    colour_a: torch.Tensor  # (P, 3)
    colour_b: torch.Tensor  # (P, 3)
    checker: torch.Tensor  # (P,) checker cell size in metres
    tint_freq: torch.Tensor  # (P, 3) spatial frequency of the sinusoidal tint
    light: torch.Tensor  # (3,) unit direction towards the light
    object_radius: float  # objects lie within this distance of the room's vertical axis


def make_scene(seed: int, index: int, cfg: SyntheticConfig) -> Scene:
    """Scene `index` of the world seeded by `seed` (numpy draws, so identical on every platform)."""
    rng = np.random.default_rng([seed, index, 0x5CE7E])
    half_x, half_y = rng.uniform(2.5, 5.0), rng.uniform(2.5, 5.0)
    height = rng.uniform(2.6, 4.0)
    object_radius = 0.35 * min(half_x, half_y)
    n_obj = int(rng.integers(cfg.objects_range[0], cfg.objects_range[1] + 1))
    n_box = int(rng.binomial(n_obj, 0.6))
    boxes = [_draw_box(rng, object_radius) for _ in range(n_box)]
    spheres = [_draw_sphere(rng, object_radius) for _ in range(n_obj - n_box)]
    n_surf = 6 + n_obj
    azimuth, elevation = rng.uniform(0, 2 * math.pi), rng.uniform(0.6, 1.3)
    light = [math.cos(azimuth) * math.cos(elevation), math.sin(azimuth) * math.cos(elevation), math.sin(elevation)]
    t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
    return Scene(
        room_lo=t([-half_x, -half_y, 0.0]),
        room_hi=t([half_x, half_y, height]),
        open_top=bool(rng.uniform() < 0.5),
        box_centre=t([b[0] for b in boxes]).reshape(-1, 3),
        box_half=t([b[1] for b in boxes]).reshape(-1, 3),
        box_rot=t([_yaw(b[2]) for b in boxes]).reshape(-1, 3, 3),
        sphere_centre=t([s[0] for s in spheres]).reshape(-1, 3),
        sphere_radius=t([s[1] for s in spheres]).reshape(-1),
        colour_a=t(rng.uniform(0.05, 1.0, (n_surf, 3))),
        colour_b=t(rng.uniform(0.05, 1.0, (n_surf, 3))),
        checker=t(rng.uniform(0.08, 0.6, n_surf)),
        tint_freq=t(rng.uniform(-6.0, 6.0, (n_surf, 3))),
        light=t(light),
        object_radius=object_radius,
    )


# Objects reach at most this far beyond `object_radius` (a box's half diagonal, a sphere's radius), so
# cameras farther than object_radius + _OBJECT_REACH + a margin are never inside one.
_OBJECT_HALF_MAX = 0.5
_OBJECT_REACH = _OBJECT_HALF_MAX * math.sqrt(2)


def _draw_box(rng: np.random.Generator, radius: float):
    half = rng.uniform(0.15, _OBJECT_HALF_MAX, 3)
    r, a = radius * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
    centre = [r * math.cos(a), r * math.sin(a), half[2] + (0.0 if rng.uniform() < 0.8 else rng.uniform(0, 1.0))]
    return centre, half, rng.uniform(0, math.pi)


def _draw_sphere(rng: np.random.Generator, radius: float):
    rad = rng.uniform(0.15, _OBJECT_HALF_MAX)
    r, a = radius * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
    return [r * math.cos(a), r * math.sin(a), rad + rng.uniform(0, 1.2)], rad


def _yaw(angle: float) -> list[list[float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]


# ----------------------------------------------------------------------------------------------------
# Cameras


def draw_cameras(scene: Scene, rng: np.random.Generator, num_frames: int, image_hw: tuple[int, int],
                 fov_range_deg: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, 3, 4) OpenCV extrinsics and (S, 3, 3) intrinsics for one sample of `scene`.

    Cameras sit on an arc around the room's vertical axis between the objects and the walls, so
    neighbouring frames overlap the way frames of a video do, and look at points near the objects.
    """
    hi = scene.room_hi.numpy()
    wall = min(hi[0], hi[1])
    near, far = scene.object_radius + _OBJECT_REACH + 0.25, wall - 0.25
    start, span = rng.uniform(0, 2 * math.pi), rng.uniform(math.radians(20), math.radians(200))
    angles = start + span * np.sort(rng.uniform(0, 1, num_frames))
    radii = np.clip(rng.uniform(near, far) + rng.uniform(-0.3, 0.3, num_frames), near, far)
    eye = np.stack([radii * np.cos(angles), radii * np.sin(angles),
                    rng.uniform(0.6, min(2.2, hi[2] - 0.3), num_frames)], -1)
    target = np.concatenate([rng.uniform(-0.6, 0.6, (num_frames, 2)) * scene.object_radius,
                             rng.uniform(0.2, 1.2, (num_frames, 1))], -1)
    roll = rng.uniform(-0.2, 0.2, num_frames)
    forward = target - eye
    forward /= np.linalg.norm(forward, axis=-1, keepdims=True)
    # Rolling the camera = tilting its "up" hint about the viewing direction.
    side = np.cross(forward, [0.0, 0.0, 1.0])
    side /= np.linalg.norm(side, axis=-1, keepdims=True)
    up = np.cos(roll)[:, None] * np.array([0.0, 0.0, 1.0]) + np.sin(roll)[:, None] * side
    extrinsics = look_at_extrinsics(torch.tensor(eye, dtype=torch.float32),
                                    torch.tensor(target, dtype=torch.float32),
                                    torch.tensor(up, dtype=torch.float32))
    height, width = image_hw
    fov = np.radians(rng.uniform(fov_range_deg[0], fov_range_deg[1], num_frames))
    fx = torch.tensor((width / 2) / np.tan(fov / 2), dtype=torch.float32)
    fy = fx * torch.tensor(rng.uniform(0.97, 1.03, num_frames), dtype=torch.float32)  # slight non-square pixels
    intrinsics = make_intrinsics(fx, fy, torch.full_like(fx, (width - 1) / 2), torch.full_like(fx, (height - 1) / 2))
    return extrinsics, intrinsics


# ----------------------------------------------------------------------------------------------------
# Ray casting


@dataclass
class Hits:
    t: torch.Tensor  # (N,) ray parameter of the first hit (the depth for camera rays), inf on a miss
    surface: torch.Tensor  # (N,) index of the surface hit: [6 room faces, K boxes, M spheres]
    normal: torch.Tensor | None  # (N, 3) unit normals facing the ray, when asked for


def cast(scene: Scene, origin: torch.Tensor, dirs: torch.Tensor, normals: bool = False) -> Hits:
    """First hit of rays origin + t * dirs (origin (3,) inside the room, dirs (N, 3), not normalised).

    Each primitive kind reports its nearest hit and the normal there (known from the slab or face that
    was crossed, so no per-ray matrix work); the nearest kind wins.
    """
    kinds = [_room_exit(scene, origin, dirs)]
    offsets = [0]
    if len(scene.box_centre):
        kinds.append(_box_entry(scene, origin, dirs))
        offsets.append(6)
    if len(scene.sphere_radius):
        kinds.append(_sphere_entry(scene, origin, dirs))
        offsets.append(6 + len(scene.box_centre))
    t_all = torch.stack([k[0] for k in kinds])
    t, which = t_all.min(0)
    surface = torch.stack([k[1] + off for k, off in zip(kinds, offsets)]).gather(0, which[None])[0]
    if not normals:
        return Hits(t, surface, None)
    points = origin + torch.nan_to_num(t, posinf=0.0)[:, None] * dirs
    normal = kinds[0][2](points)
    for i, kind in enumerate(kinds[1:], start=1):
        normal = torch.where((which == i)[:, None], kind[2](points), normal)
    return Hits(t, surface, normal)


def _room_exit(scene: Scene, origin: torch.Tensor, dirs: torch.Tensor):
    """Where a ray from inside leaves the room's box; face id = 2 * axis + (direction > 0)."""
    t_lo = (scene.room_lo - origin) / dirs
    t_hi = (scene.room_hi - origin) / dirs
    t_exit = torch.where(dirs > 0, t_hi, t_lo)
    t_exit = torch.where(dirs == 0, torch.full_like(t_exit, float("inf")), t_exit)
    t, axis = t_exit.min(-1)
    positive = dirs.gather(-1, axis[:, None])[:, 0] > 0
    face = 2 * axis + positive.long()
    if scene.open_top:
        t = torch.where(face == 5, torch.full_like(t, float("inf")), t)
    # the wall faces the room's inside: against the ray's direction along the crossed axis
    normal = lambda _: F.one_hot(axis, 3).to(dirs) * torch.where(positive, -1.0, 1.0)[:, None]  # noqa: E731
    return t, face, normal


def _box_entry(scene: Scene, origin: torch.Tensor, dirs: torch.Tensor):
    """Slab test in each box's frame: nearest entry (N,), which box (N,) and its normals.

    Works axis by axis on (K, N) planes: reductions over a trailing dimension of 3 are slow.
    """
    rot_t = scene.box_rot.transpose(-1, -2)  # local-from-world
    o = torch.einsum("kij,kj->ik", rot_t, origin - scene.box_centre)[..., None]  # (3, K, 1)
    d = torch.einsum("kij,nj->ikn", rot_t, dirs)  # (3, K, N)
    half = scene.box_half.T[..., None]  # (3, K, 1)
    t_near = t_far = axis = None
    for a in range(3):
        inv = 1.0 / d[a]
        t1, t2 = (-half[a] - o[a]) * inv, (half[a] - o[a]) * inv
        near, far = torch.minimum(t1, t2), torch.maximum(t1, t2)
        if a == 0:
            t_near, t_far, axis = near, far, torch.zeros_like(near, dtype=torch.long)
        else:
            later = near > t_near  # the entry slab's axis gives the normal
            axis = torch.where(later, a, axis)
            t_near, t_far = torch.maximum(t_near, near), torch.minimum(t_far, far)
    hit = (t_near <= t_far) & (t_near > _EPS)
    t, box = torch.where(hit, t_near, torch.full_like(t_near, float("inf"))).min(0)

    def normal(_):
        a = axis.gather(0, box[None])[0]
        d_along = d.gather(1, box[None, None].expand(3, 1, -1))[:, 0].T.gather(-1, a[:, None])
        # a box's world normal is its rotation's column for the crossed axis, pointing against the ray
        return scene.box_rot.transpose(-1, -2)[box, a] * -torch.sign(d_along)

    return t, box, normal


def _sphere_entry(scene: Scene, origin: torch.Tensor, dirs: torch.Tensor):
    oc = origin - scene.sphere_centre  # (M, 3)
    a = (dirs * dirs).sum(-1)[None]  # (1, N)
    b = (dirs @ oc.T).T  # (M, N)
    c = (oc * oc).sum(-1)[:, None] - scene.sphere_radius[:, None] ** 2
    disc = b * b - a * c
    t_all = (-b - disc.clamp_min(0).sqrt()) / a
    hit = (disc >= 0) & (t_all > _EPS)
    t, sphere = torch.where(hit, t_all, torch.full_like(t_all, float("inf"))).min(0)
    normal = lambda points: (points - scene.sphere_centre[sphere]) / scene.sphere_radius[sphere, None]  # noqa: E731
    return t, sphere, normal


def _shade(scene: Scene, points: torch.Tensor, hits: Hits) -> torch.Tensor:
    """Colour (N, 3): solid checker between two colours, a sinusoidal tint, Lambertian light."""
    # One gather of a per-surface table: [colour_a (3), colour_b - colour_a (3), 1 / checker (1),
    # tint_freq (3), phase (1)]; gathers of (N, k) rows dominate shading time otherwise.
    table = torch.cat([scene.colour_a, scene.colour_b - scene.colour_a, 1.0 / scene.checker[:, None],
                       scene.tint_freq, torch.arange(len(scene.checker), dtype=torch.float32)[:, None]], 1)
    row = table[hits.surface.clamp(0, len(table) - 1)]
    cell = torch.floor(points * row[:, 6:7]).sum(-1, keepdim=True)
    odd = cell - 2 * torch.floor(cell / 2)  # 0 or 1
    albedo = torch.addcmul(row[:, 0:3], row[:, 3:6], odd)
    tint = torch.sin((points * row[:, 7:10]).sum(-1, keepdim=True) + row[:, 10:11]).mul_(0.2).add_(0.8)
    # Normals face the ray, which for closed objects seen from outside and walls seen from inside is
    # the geometric normal: the shading of a point is the same from every view.
    light = (hits.normal @ scene.light).clamp_min_(0).mul_(0.65).add_(0.35)[:, None]
    colour = (albedo * tint * light).clamp_(0, 1)
    sky = torch.tensor([0.55, 0.7, 0.95])
    return torch.where(torch.isfinite(hits.t)[:, None], colour, sky)


def camera_rays(extrinsics: torch.Tensor, intrinsics: torch.Tensor, uv: torch.Tensor):
    """Camera centre (3,) and world ray directions (N, 3) through pixel positions uv (N, 2), scaled so
    the hit parameter is the camera-frame depth."""
    k = intrinsics
    d_cam = torch.stack([(uv[:, 0] - k[0, 2]) / k[0, 0], (uv[:, 1] - k[1, 2]) / k[1, 1],
                         torch.ones(len(uv))], -1)
    cam_to_world = invert_extrinsics(extrinsics)
    return cam_to_world[:, 3], d_cam @ cam_to_world[:, :3].T


def depth_at(scene: Scene, extrinsics: torch.Tensor, intrinsics: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Exact depth (N,) seen at arbitrary (sub-)pixel positions uv (N, 2); inf where nothing is hit."""
    centre, dirs = camera_rays(extrinsics, intrinsics, uv)
    return cast(scene, centre, dirs).t


# Rays are cast in blocks so that the per-ray temporaries of a block stay in the CPU cache instead of
# streaming through memory as one pass over a whole 518 x 518 image would.
_RAY_BLOCK = 32768


def render(scene: Scene, extrinsics: torch.Tensor, intrinsics: torch.Tensor, image_hw: tuple[int, int]):
    """One view: image (3, H, W) in [0, 1], depth (H, W) (0 where nothing is hit), mask (H, W) and
    world points (H, W, 3) (the camera centre where nothing is hit)."""
    height, width = image_hw
    centre, dirs = camera_rays(extrinsics, intrinsics, pixel_grid(height, width).reshape(-1, 2))
    colours, depths = [], []
    for block in dirs.split(_RAY_BLOCK):
        hits = cast(scene, centre, block, normals=True)
        depth = torch.where(torch.isfinite(hits.t), hits.t, torch.zeros_like(hits.t))
        colours.append(_shade(scene, centre + depth[:, None] * block, hits))
        depths.append(depth)
    depth = torch.cat(depths)
    points = centre + depth[:, None] * dirs
    image = torch.cat(colours).T.reshape(3, height, width).contiguous()
    return image, depth.reshape(height, width), (depth > 0).reshape(height, width), points.reshape(height, width, 3)


def track_queries(scene: Scene, extrinsics: torch.Tensor, intrinsics: torch.Tensor, world_points: torch.Tensor,
                  mask: torch.Tensor, num: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Ground-truth tracks of `num` surface points seen at random valid pixels of frame 0.

    tracks (S, N, 2) are the points' projections in every frame in image coordinates (column, row;
    the centre of pixel (u, v) is (u, v), as vggt_fsdp.geometry and the track head's feature sampling
    have it); track_vis_mask (S, N) is true where a
    point is in front of the camera, inside the image and not occluded (a ray cast towards it from that
    camera reaches it first), which is exact rather than a depth-map comparison.
    """
    height, width = mask.shape[-2:]
    valid = mask[0].flatten().nonzero()[:, 0]
    if len(valid) == 0:  # a frame looking only at the sky: no queries can be defined
        pick = torch.zeros(num, dtype=torch.long)
    else:
        pick = valid[torch.as_tensor(rng.integers(0, len(valid), num))]
    points = world_points[0].reshape(-1, 3)[pick]  # (N, 3)
    uv, z = project_points(points[None].expand(len(extrinsics), -1, -1), extrinsics, intrinsics)
    inside = ((z > _EPS) & (uv[..., 0] >= -0.5) & (uv[..., 0] < width - 0.5)
              & (uv[..., 1] >= -0.5) & (uv[..., 1] < height - 0.5))
    centres = invert_extrinsics(extrinsics)[:, :, 3]
    visible = torch.zeros_like(inside)
    for s in range(len(extrinsics)):
        visible[s] = cast(scene, centres[s], points - centres[s]).t > 1 - 1e-3
    vis = inside & visible & (len(valid) > 0)
    uv = torch.where(torch.isfinite(uv), uv, torch.zeros_like(uv))
    # Frame 0's track is the query pixel by definition; reprojection would only add float noise.
    uv[0] = torch.stack([pick % width, pick // width], -1).to(uv)
    return {"tracks": uv, "track_vis_mask": vis}


# ----------------------------------------------------------------------------------------------------
# The source


class SyntheticSource:
    """Scenes of the procedural world; val scenes are indices past the train ones, so never shared."""

    def __init__(self, cfg: SourceConfig, data: DataConfig, split: str):
        self.cfg, self.seed, self.margin = cfg.synthetic, data.seed, data.resize_margin
        self.label = cfg.label
        self.offset = 0 if split == "train" else cfg.synthetic.num_scenes
        self.length = cfg.synthetic.num_scenes if split == "train" else cfg.synthetic.num_val_scenes

    def __len__(self) -> int:
        return self.length

    def scene(self, spec: SampleSpec, rng: np.random.Generator, augment: AugmentConfig | None) -> dict[str, torch.Tensor]:
        scene = make_scene(self.seed, self.offset + spec.index, self.cfg)
        hw, count = spec.image_hw, spec.num_frames
        extrinsics, intrinsics = draw_cameras(scene, rng, count, hw, self.cfg.fov_range_deg)  # every frame's
        positions = list(spec.positions())  # this rank's share of the scene: only these frames are rendered
        frame_rngs = [spec.frame_rng(j) for j in positions]
        # The real formats' crop, resize and zoom without resampling: the drawn cameras render a frame
        # of the target size, planned like a real one, and the planned intrinsics render the result.
        centre = ((hw[1] - 1) / 2, (hw[0] - 1) / 2)
        extrinsics = extrinsics[positions]
        intrinsics = torch.stack([plan_intrinsics(intrinsics[j], plan_crop(frame_rng, hw, centre, hw, self.margin,
                                                                           augment))
                                  for j, frame_rng in zip(positions, frame_rngs)])
        images, depths, masks, points = zip(*(render(scene, e, k, hw) for e, k in zip(extrinsics, intrinsics)))
        out = {
            "images": photometric_frames(list(images), rng, augment, frame_rngs),
            "depths": torch.stack(depths),
            "point_masks": torch.stack(masks),
            "extrinsics": extrinsics,
            "intrinsics": intrinsics,
        }
        # the rays' hit points are the world points; camera points follow from depth alone
        out["world_points"] = torch.where(out["point_masks"][..., None], torch.stack(points), 0.0)
        out["cam_points"] = unproject_depth(out["depths"], intrinsics)
        # Tracks start at frame 0's pixels; a share of a scene (context parallelism, which refuses the
        # track head) has none.
        if self.cfg.num_track_queries and spec.frames is None:
            out.update(track_queries(scene, extrinsics, intrinsics, out["world_points"], out["point_masks"],
                                     self.cfg.num_track_queries, rng))
        return out
