"""Geometry checks every real frame passes on read: impossible cameras and empty depth are refused.

Without these, a zero focal length trains on NaN losses, a rotation scaled by 3 or a singular one
and intrinsics written for another image size train on wrong points, and a depth map with no valid
value makes the scene scale meaningless. A failing frame raises a DataError naming its file, which
data.skip_bad_frames turns into a replaced, counted frame.
"""
from __future__ import annotations

import math

import torch

from vggt_fsdp.data.base import DataError, RawFrame

# |R R^T - I| and |det R - 1| above this: not a rotation. Rotations read from text files with six
# decimals are orthonormal to ~1e-6; a scaled or sheared matrix misses by far more.
ROTATION_TOLERANCE = 1e-3
# The principal point of a real camera sits near the image centre (within a few percent); farther than
# this fraction of the image's width (height) from it, the intrinsics were almost certainly written for
# another image size (those of a half-size image put it 25% away, of a 1.5x image 25% the other way).
MAX_PRINCIPAL_OFFSET = 0.2
# Horizontal and vertical fields of view outside this range (degrees) mean the focal length is not in
# pixels of this image (e.g. millimetres, or another resolution's pixels).
FOV_RANGE_DEG = (1.0, 179.0)


def check_frame(frame: RawFrame) -> None:
    """Raise a DataError naming the frame's file when its cameras or depth cannot be right.

    Intrinsics are expected in the toolkit's pixel convention (vggt_fsdp.geometry: integer centres).
    """
    height, width = frame.image.shape[-2:]
    check_extrinsics(frame.extrinsics, frame.where)
    check_intrinsics(frame.intrinsics, (height, width), frame.where)
    valid = frame.mask & (frame.depth > 0) & torch.isfinite(frame.depth)
    if not valid.any():
        raise DataError(f"{frame.depth_file}: no valid depth (every value zero, non-finite, masked out or "
                        "beyond the source's limit); a frame needs at least one")


def check_extrinsics(extrinsics: torch.Tensor, where: str) -> None:
    e = extrinsics.double()
    if not torch.isfinite(e).all():
        raise DataError(f"{where}: extrinsics hold non-finite values {e.tolist()}")
    rot = e[:, :3]
    error = float((rot @ rot.T - torch.eye(3, dtype=e.dtype)).abs().max())
    det = float(torch.linalg.det(rot))
    if error > ROTATION_TOLERANCE or abs(det - 1) > ROTATION_TOLERANCE:
        raise DataError(f"{where}: the extrinsics' 3x3 part is not a rotation (max |R R^T - I| = {error:.3g}, "
                        f"det {det:.4g}); expected OpenCV camera-from-world [R | t] with R orthonormal, det +1")


def check_intrinsics(intrinsics: torch.Tensor, image_hw: tuple[int, int], where: str) -> None:
    k = intrinsics.double()
    height, width = image_hw
    if not torch.isfinite(k).all():
        raise DataError(f"{where}: intrinsics hold non-finite values {k.tolist()}")
    fx, fy, cx, cy = float(k[0, 0]), float(k[1, 1]), float(k[0, 2]), float(k[1, 2])
    if fx <= 0 or fy <= 0:
        raise DataError(f"{where}: focal lengths fx={fx:g}, fy={fy:g}; both must be > 0 (pixels)")
    zeros = (k[1, 0], k[2, 0], k[2, 1])
    if any(float(z) != 0 for z in zeros) or abs(float(k[2, 2]) - 1) > 1e-6 or abs(float(k[0, 1])) > 1e-6 * fx:
        raise DataError(f"{where}: intrinsics {k.tolist()}; expected [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] "
                        "(no skew)")
    if not (-0.5 <= cx <= width - 0.5 and -0.5 <= cy <= height - 0.5):
        raise DataError(f"{where}: principal point ({cx:g}, {cy:g}) lies outside the {width}x{height} image: "
                        "intrinsics for another image size?")
    off_x, off_y = abs(cx - (width - 1) / 2) / width, abs(cy - (height - 1) / 2) / height
    if max(off_x, off_y) > MAX_PRINCIPAL_OFFSET:
        raise DataError(f"{where}: principal point ({cx:g}, {cy:g}) is {100 * max(off_x, off_y):.0f}% of the "
                        f"image from the centre of the {width}x{height} image (limit "
                        f"{100 * MAX_PRINCIPAL_OFFSET:.0f}%): intrinsics for another image size?")
    for axis, focal, size in (("horizontal", fx, width), ("vertical", fy, height)):
        fov = math.degrees(2 * math.atan(size / (2 * focal)))
        if not FOV_RANGE_DEG[0] <= fov <= FOV_RANGE_DEG[1]:
            raise DataError(f"{where}: focal length {focal:g} px gives a {fov:.3g} degree {axis} field of "
                            f"view on the {width}x{height} image (expected {FOV_RANGE_DEG[0]:g} to "
                            f"{FOV_RANGE_DEG[1]:g}): focal lengths not in this image's pixels?")
