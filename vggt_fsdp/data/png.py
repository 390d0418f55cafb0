"""A small PNG codec on numpy and zlib, so PNG files (depth maps, masks, the preview sheet) need no
imaging library.

Decoding handles every filter type, 8- and 16-bit samples, gray/RGB/palette/alpha, without
interlacing. Unfiltering is sequential along rows and columns; it runs over anti-diagonals, which
are independent, so the Python loop has H + W steps rather than H * W.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


class PNGError(ValueError):
    pass


def decode_png(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """PNG bytes -> (H, W) or (H, W, C) uint8 / uint16 array (palette images expand to RGB(A))."""
    if not data.startswith(_SIGNATURE):
        raise PNGError(f"{name}: not a PNG file (bad signature)")
    header, palette, idat, pos = None, None, [], len(_SIGNATURE)
    while pos + 12 <= len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length or zlib.crc32(kind + body) != struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]:
            raise PNGError(f"{name}: truncated or corrupt {kind!r} chunk at byte {pos}")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = np.frombuffer(body, np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise PNGError(f"{name}: missing IHDR or IDAT chunk")
    width, height, depth, colour, _, _, interlace = header
    if colour not in _CHANNELS or depth not in (8, 16) or interlace:
        raise PNGError(f"{name}: unsupported PNG (bit depth {depth}, colour type {colour}, interlace {interlace});"
                       " expected 8- or 16-bit, non-interlaced")
    channels = _CHANNELS[colour]
    bpp = channels * depth // 8
    try:
        raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    except zlib.error as err:
        raise PNGError(f"{name}: corrupt image data ({err})") from err
    if raw.size != height * (1 + width * bpp):
        raise PNGError(f"{name}: image data has {raw.size} bytes, expected {height * (1 + width * bpp)}")
    rows = raw.reshape(height, 1 + width * bpp)
    pixels = _unfilter(rows[:, 0], rows[:, 1:].reshape(height, width, bpp), name)
    if depth == 16:
        pixels = pixels.reshape(height, width, channels, 2)
        out = (pixels[..., 0].astype(np.uint16) << 8) | pixels[..., 1]  # PNG samples are big-endian
    else:
        out = pixels.reshape(height, width, channels)
    if colour == 3:
        if palette is None:
            raise PNGError(f"{name}: palette image without PLTE chunk")
        out = palette[out[..., 0]]
    return out[..., 0] if out.shape[-1] == 1 else out


def _unfilter(filters: np.ndarray, filtered: np.ndarray, name: str) -> np.ndarray:
    """Undo PNG's per-row filters on (H, W, bpp) bytes; each pixel depends on its left, upper and
    upper-left neighbours, so all pixels of one anti-diagonal can be reconstructed at once."""
    if (filters > 4).any():
        raise PNGError(f"{name}: invalid filter type {int(filters.max())}")
    height, width, bpp = filtered.shape
    if (filters == 0).all():
        return filtered.copy()
    out = np.zeros((height + 1, width + 1, bpp), np.int32)  # row 0 and column 0: the zero border
    data = filtered.astype(np.int32)
    rows_all = np.arange(height)
    for diag in range(height + width - 1):
        r = rows_all[max(0, diag - width + 1):min(height, diag + 1)]
        c = diag - r
        left, up, corner = out[r + 1, c], out[r, c + 1], out[r, c]
        kind = filters[r][:, None]
        pred = np.where(kind == 1, left, 0)
        pred = np.where(kind == 2, up, pred)
        pred = np.where(kind == 3, (left + up) >> 1, pred)
        if (kind == 4).any():
            p = left + up - corner
            pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - corner)
            paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, corner))
            pred = np.where(kind == 4, paeth, pred)
        out[r + 1, c + 1] = (data[r, c] + pred) & 0xFF
    return out[1:, 1:].astype(np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    """(H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA, uint8 or uint16 -> PNG bytes (no filtering)."""
    if array.dtype not in (np.uint8, np.uint16):
        raise PNGError(f"encode_png needs uint8 or uint16 samples, got {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    colour = {1: 0, 3: 2, 4: 6}.get(array.shape[-1])
    if array.ndim != 3 or colour is None:
        raise PNGError(f"encode_png needs (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    height, width, _ = array.shape
    depth = 16 if array.dtype == np.uint16 else 8
    samples = array.astype(">u2") if depth == 16 else array
    rows = samples.reshape(height, -1).view(np.uint8)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], 1).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return _SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def write_png(path: str | Path, array: np.ndarray) -> None:
    Path(path).write_bytes(encode_png(array))
