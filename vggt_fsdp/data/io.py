"""Reading dataset files with errors that name the file and what was expected.

Images are identified by content, not extension (as OpenCV does upstream). PNG needs nothing beyond
numpy (vggt_fsdp.data.png); Pillow, when installed, decodes PNG faster. JPEG needs Pillow: install
the `real-data` extra (`pip install 'vggt-fsdp[real-data]'`).
"""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import torch

from vggt_fsdp.data.base import DataError
from vggt_fsdp.data.png import PNGError, decode_png

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG"


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def read_bytes(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; expected {what}") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err}); expected {what}") from None
    if not data:
        raise DataError(f"{path}: empty file; expected {what}")
    return data


def decode_array(path: Path, what: str) -> np.ndarray:
    """A PNG or JPEG file as a numpy array (H, W) or (H, W, C), uint8 or uint16."""
    data = read_bytes(path, what)
    image_lib = _pillow()
    if data.startswith(_PNG_MAGIC) and image_lib is None:
        try:
            return decode_png(data, str(path))
        except PNGError as err:
            raise DataError(f"{err}; expected {what}") from None
    if not data.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
        raise DataError(f"{path}: neither PNG nor JPEG content; expected {what}")
    if image_lib is None:
        raise DataError(f"{path}: decoding JPEG needs Pillow, which is not installed; "
                        f"run `pip install 'vggt-fsdp[real-data]'` (expected {what})")
    try:
        with image_lib.open(io.BytesIO(data)) as img:
            if img.mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            array = np.array(img)
    except Exception as err:  # Pillow raises many types for corrupt files
        raise DataError(f"{path}: cannot decode ({err}); expected {what}") from None
    return array.astype(np.uint16) if array.dtype == np.int32 else array  # 16-bit PNGs open as mode "I"


def read_rgb(path: Path) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]; gray images are repeated to three channels, alpha dropped."""
    array = decode_array(path, "an RGB image (PNG or JPEG)")
    if array.dtype != np.uint8:
        raise DataError(f"{path}: {array.dtype} samples; expected an 8-bit RGB image")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, -1)
    elif array.shape[-1] in (2, 4):
        array = array[..., :-1] if array.shape[-1] == 4 else np.repeat(array[..., :1], 3, -1)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255.0


def read_uint16(path: Path, what: str) -> np.ndarray:
    array = decode_array(path, what)
    if array.dtype != np.uint16 or array.ndim != 2:
        raise DataError(f"{path}: {array.dtype} image of shape {array.shape}; expected {what}")
    return array


def read_mask(path: Path, threshold: int) -> torch.Tensor:
    """(H, W) bool: an 8-bit gray PNG's samples above `threshold`."""
    array = decode_array(path, "an 8-bit grayscale mask PNG")
    if array.ndim == 3:
        array = array[..., 0]
    if array.dtype != np.uint8:
        raise DataError(f"{path}: {array.dtype} samples; expected an 8-bit grayscale mask PNG")
    return torch.from_numpy(array > threshold)


def read_json(path: Path, what: str, gzipped: bool = False):
    data = read_bytes(path, what)
    try:
        if gzipped:
            data = gzip.decompress(data)
        return json.loads(data)
    except (OSError, EOFError, ValueError) as err:
        raise DataError(f"{path}: malformed ({err}); expected {what}") from None


def read_depth_file(path: Path, png_scale: float = 1.0) -> torch.Tensor:
    """A depth map (H, W) float32 by its extension: .npy (float, metres), .pfm (metres) or a 16-bit
    .png (times png_scale metres per unit)."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return torch.from_numpy(_read_npy(path))
    if suffix == ".pfm":
        return torch.from_numpy(read_pfm(path))
    if suffix == ".png":
        array = read_uint16(path, "a 16-bit depth PNG")
        return torch.from_numpy(array.astype(np.float32)) * png_scale
    raise DataError(f"{path}: depth maps are .npy, .pfm or 16-bit .png files, not {suffix or 'extensionless'}")


def _read_npy(path: Path) -> np.ndarray:
    what = "a float (H, W) depth .npy"
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; expected {what}") from None
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: malformed ({err}); expected {what}") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{path}: {array.dtype} array of shape {array.shape}; expected {what}")
    return array.astype(np.float32)


def read_pfm(path: Path) -> np.ndarray:
    """A one-channel PFM ("Pf") as float32 (H, W), top row first (PFM stores the bottom row first)."""
    what = "a one-channel PFM depth map ('Pf' header, width height, scale, float32 rows)"
    data = read_bytes(path, what)
    lines = data.split(b"\n", 3)  # "Pf", "width height", "scale", then the samples
    try:
        kind, (width, height), scale = lines[0].strip(), map(int, lines[1].split()), float(lines[2])
        body_start = len(data) - len(lines[3])
    except (IndexError, ValueError):
        raise DataError(f"{path}: malformed PFM header; expected {what}") from None
    if kind != b"Pf":
        raise DataError(f"{path}: PFM type {kind[:8]!r}; expected {what}")
    count = width * height
    body = data[body_start:body_start + 4 * count]
    if width < 1 or height < 1 or len(body) != 4 * count:
        raise DataError(f"{path}: {len(body)} bytes of samples for a {width}x{height} PFM; expected {4 * count}")
    array = np.frombuffer(body, "<f4" if scale < 0 else ">f4").reshape(height, width)
    return np.ascontiguousarray(array[::-1]).astype(np.float32)


def as_matrix(value, shape: tuple[int, ...], where: str) -> torch.Tensor:
    """A nested list as a float32 tensor of exactly `shape`, or a DataError naming `where`."""
    try:
        tensor = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {value!r} is not a numeric matrix; expected shape {list(shape)}") from None
    if tuple(tensor.shape) != shape or not torch.isfinite(tensor).all():
        raise DataError(f"{where}: got shape {list(tensor.shape)}; expected a finite {list(shape)} matrix")
    return tensor.float()
