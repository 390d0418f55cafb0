"""Reading COLMAP sparse models: cameras, images and points3D, text (.txt) or binary (.bin).

Formats as COLMAP documents them (https://colmap.github.io/format.html): text files hold one record
per line after `#` comments (an image takes two lines, the second its 2-D points); binary files are
little-endian, a uint64 record count followed by the records. Image poses are world-to-camera:
quaternion (qw, qx, qy, qz) and translation, the camera looking down +z with x right and y down
(OpenCV's axes). 2-D observations are skipped: training needs only the poses.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from vggt_fsdp.data.base import DataError
from vggt_fsdp.data.io import read_bytes

# COLMAP's camera models: id -> (name, number of parameters)
CAMERA_MODELS = {
    0: ("SIMPLE_PINHOLE", 3), 1: ("PINHOLE", 4), 2: ("SIMPLE_RADIAL", 4), 3: ("RADIAL", 5),
    4: ("OPENCV", 8), 5: ("OPENCV_FISHEYE", 8), 6: ("FULL_OPENCV", 12), 7: ("FOV", 5),
    8: ("SIMPLE_RADIAL_FISHEYE", 4), 9: ("RADIAL_FISHEYE", 5), 10: ("THIN_PRISM_FISHEYE", 12),
    11: ("RAD_TAN_THIN_PRISM_FISHEYE", 16),
}
_PARAMS_BY_NAME = {name: count for name, count in CAMERA_MODELS.values()}


@dataclass(frozen=True)
class Camera:
    id: int
    model: str
    width: int
    height: int
    params: tuple[float, ...]


@dataclass(frozen=True)
class Image:
    id: int
    qvec: tuple[float, float, float, float]  # (qw, qx, qy, qz), world-to-camera rotation
    tvec: tuple[float, float, float]  # world-to-camera translation
    camera_id: int
    name: str


@dataclass(frozen=True)
class Point3D:
    id: int
    xyz: tuple[float, float, float]
    rgb: tuple[int, int, int]
    error: float
    image_ids: tuple[int, ...]  # the images that observe the point


def model_files(model_dir: Path) -> tuple[str, Path, Path, Path] | None:
    """("bin" | "txt", cameras, images, points3D) of a model folder (binary when cameras.bin exists),
    or None when it holds no model."""
    for ext in ("bin", "txt"):
        cameras = model_dir / f"cameras.{ext}"
        if cameras.is_file():
            return ext, cameras, model_dir / f"images.{ext}", model_dir / f"points3D.{ext}"
    return None


def read_cameras(path: Path) -> dict[int, Camera]:
    return _read_cameras_bin(path) if path.suffix == ".bin" else _read_cameras_txt(path)


def read_images(path: Path) -> dict[int, Image]:
    return _read_images_bin(path) if path.suffix == ".bin" else _read_images_txt(path)


def read_points3d(path: Path) -> dict[int, Point3D]:
    return _read_points_bin(path) if path.suffix == ".bin" else _read_points_txt(path)


# ---------------------------------------------------------------------------------------------- text
def _records(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number, line) of the non-comment lines; blank lines are kept (images.txt's 2-D point
    lines may be empty)."""
    text = read_bytes(path, what).decode("utf-8", errors="replace")
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if not line.startswith("#")]


def _read_cameras_txt(path: Path) -> dict[int, Camera]:
    what = "COLMAP cameras.txt: CAMERA_ID MODEL WIDTH HEIGHT PARAMS..."
    cameras = {}
    for number, line in _records(path, what):
        if not line:
            continue
        fields = line.split()
        try:
            camera = Camera(int(fields[0]), fields[1], int(fields[2]), int(fields[3]),
                            tuple(float(v) for v in fields[4:]))
        except (IndexError, ValueError):
            raise DataError(f"{path}:{number}: {line!r}; expected {what}") from None
        expected = _PARAMS_BY_NAME.get(camera.model)
        if expected is not None and expected != len(camera.params):
            raise DataError(f"{path}:{number}: {camera.model} takes {expected} parameters, got {len(camera.params)}")
        cameras[camera.id] = camera
    return cameras


def _read_images_txt(path: Path) -> dict[int, Image]:
    what = "COLMAP images.txt: IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME, then a line of 2-D points"
    records = _records(path, what)
    while records and not records[-1][1]:
        records.pop()  # trailing blank lines
    images = {}
    for (number, line), _points in zip(records[0::2], records[1::2] + [(0, "")]):
        fields = line.split(maxsplit=9)
        try:
            values = [float(v) for v in fields[1:8]]
            image = Image(int(fields[0]), tuple(values[:4]), tuple(values[4:]), int(fields[8]), fields[9])
        except (IndexError, ValueError):
            raise DataError(f"{path}:{number}: {line!r}; expected {what}") from None
        images[image.id] = image
    return images


def _read_points_txt(path: Path) -> dict[int, Point3D]:
    what = "COLMAP points3D.txt: POINT3D_ID X Y Z R G B ERROR (IMAGE_ID POINT2D_IDX)..."
    points = {}
    for number, line in _records(path, what):
        if not line:
            continue
        fields = line.split()
        try:
            track = [int(v) for v in fields[8:]]
            if len(track) % 2:
                raise ValueError("odd track")
            point = Point3D(int(fields[0]), tuple(float(v) for v in fields[1:4]),
                            tuple(int(v) for v in fields[4:7]), float(fields[7]), tuple(track[0::2]))
        except (IndexError, ValueError):
            raise DataError(f"{path}:{number}: {line[:80]!r}; expected {what}") from None
        points[point.id] = point
    return points


# ---------------------------------------------------------------------------------------------- binary
class _Reader:
    """Sequential little-endian reads with errors that name the file and what was expected."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what
        self.data, self.pos = read_bytes(path, what), 0

    def take(self, fmt: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise DataError(f"{self.path}: truncated at byte {self.pos} (file has {len(self.data)}); expected {self.what}")
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return values

    def skip(self, size: int) -> None:
        if self.pos + size > len(self.data):
            raise DataError(f"{self.path}: truncated at byte {self.pos} (file has {len(self.data)}); expected {self.what}")
        self.pos += size

    def string(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise DataError(f"{self.path}: unterminated image name at byte {self.pos}; expected {self.what}")
        text = self.data[self.pos:end].decode("utf-8", errors="replace")
        self.pos = end + 1
        return text

    def done(self) -> None:
        if self.pos != len(self.data):
            raise DataError(f"{self.path}: {len(self.data) - self.pos} bytes after the last record; expected {self.what}")


def _read_cameras_bin(path: Path) -> dict[int, Camera]:
    reader = _Reader(path, "COLMAP cameras.bin")
    cameras = {}
    for _ in range(reader.take("Q")[0]):
        camera_id, model_id, width, height = reader.take("iiQQ")
        if model_id not in CAMERA_MODELS:
            raise DataError(f"{path}: camera {camera_id} has unknown model id {model_id}; expected one of "
                            f"COLMAP's {len(CAMERA_MODELS)} models")
        name, count = CAMERA_MODELS[model_id]
        cameras[camera_id] = Camera(camera_id, name, width, height, reader.take("d" * count))
    reader.done()
    return cameras


def _read_images_bin(path: Path) -> dict[int, Image]:
    reader = _Reader(path, "COLMAP images.bin")
    images = {}
    for _ in range(reader.take("Q")[0]):
        image_id, *pose, camera_id = reader.take("idddddddi")
        name = reader.string()
        reader.skip(reader.take("Q")[0] * struct.calcsize("<ddq"))  # 2-D points: x, y, point3D id
        images[image_id] = Image(image_id, tuple(pose[:4]), tuple(pose[4:]), camera_id, name)
    reader.done()
    return images


def _read_points_bin(path: Path) -> dict[int, Point3D]:
    reader = _Reader(path, "COLMAP points3D.bin")
    points = {}
    for _ in range(reader.take("Q")[0]):
        point_id, x, y, z, r, g, b, error = reader.take("QdddBBBd")
        track = reader.take("ii" * reader.take("Q")[0])
        points[point_id] = Point3D(point_id, (x, y, z), (r, g, b), error, tuple(track[0::2]))
    reader.done()
    return points
