import io
import struct
import zlib

import numpy as np
import pytest

from vggt_fsdp.data.png import PNGError, decode_png, encode_png


def _png_with_filters(array: np.ndarray, filters: list[int]) -> bytes:
    """Encode 8-bit (H, W, C) with the given per-row filter types (what encoders like libpng choose)."""
    height, width, channels = array.shape
    raw, prev = b"", np.zeros(width * channels, np.int32)
    for r in range(height):
        row = array[r].reshape(-1).astype(np.int32)
        left = np.concatenate([np.zeros(channels, np.int32), row[:-channels]])
        corner = np.concatenate([np.zeros(channels, np.int32), prev[:-channels]])
        kind = filters[r % len(filters)]
        if kind == 0:
            out = row
        elif kind == 1:
            out = row - left
        elif kind == 2:
            out = row - prev
        elif kind == 3:
            out = row - (left + prev) // 2
        else:
            p = left + prev - corner
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - corner)
            out = row - np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, corner))
        raw += bytes([kind]) + (out & 0xFF).astype(np.uint8).tobytes()
        prev = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    colour = {1: 0, 3: 2, 4: 6}[channels]
    head = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_every_filter_type_decodes(channels):
    array = np.random.default_rng(channels).integers(0, 256, (9, 13, channels)).astype(np.uint8)
    decoded = decode_png(_png_with_filters(array, [0, 1, 2, 3, 4, 4, 3]))
    assert np.array_equal(decoded.reshape(array.shape), array)


def test_round_trip_8_and_16_bit():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3)).astype(np.uint8)
    gray16 = rng.integers(0, 65536, (5, 7)).astype(np.uint16)
    assert np.array_equal(decode_png(encode_png(rgb)), rgb)
    out = decode_png(encode_png(gray16))
    assert out.dtype == np.uint16 and np.array_equal(out, gray16)


def test_corrupt_files_are_rejected_with_their_name():
    data = bytearray(encode_png(np.zeros((4, 4), np.uint8)))
    data[40] ^= 0xFF
    with pytest.raises(PNGError, match="depth.png: truncated or corrupt"):
        decode_png(bytes(data), "depth.png")
    with pytest.raises(PNGError, match="not a PNG"):
        decode_png(b"GIF89a", "x")


def test_matches_pillow_when_installed():
    image_lib = pytest.importorskip("PIL.Image")
    y, x = np.mgrid[0:40, 0:50]
    arrays = [np.stack([x * 5 % 256, y * 3 % 256, (x + y) % 256], -1).astype(np.uint8),
              (x * 1000 + y * 7).astype(np.uint16)]
    for array in arrays:
        buf = io.BytesIO()
        image_lib.fromarray(array).save(buf, format="PNG")  # Pillow picks its own (adaptive) filters
        assert np.array_equal(decode_png(buf.getvalue()), array)
