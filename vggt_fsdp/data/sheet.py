"""The preview sheet of a batch: labelled panels drawn with numpy alone (no imaging library).

One row per frame: the image with its visible track points, the depth (colour-mapped over the scene's
valid range), the valid-point mask and the world points as colours (x, y, z over the scene's range ->
red, green, blue). A title line names the source and step, a header names the columns and each row
starts with its scene and frame. Small frames are enlarged by an integer factor so labels fit.
"""
from __future__ import annotations

import math

import numpy as np
import torch

COLUMNS = ("image", "depth", "valid mask", "world xyz")
MIN_PANEL_WIDTH = 112  # narrower frames are enlarged by an integer factor
_BACKGROUND, _TEXT = 0.12, 0.95

# A 5x7 pixel font: per character, 7 rows as two hex digits each (the low 5 bits, leftmost pixel first).
_FONT = {
    "A": "0E11111F111111", "B": "1E11111E11111E", "C": "0E11101010110E", "D": "1C12111111121C",
    "E": "1F10101E10101F", "F": "1F10101E101010", "G": "0E11101711110F", "H": "1111111F111111",
    "I": "0E04040404040E", "J": "0702020202120C", "K": "11121418141211", "L": "1010101010101F",
    "M": "111B1515111111", "N": "11111915131111", "O": "0E11111111110E", "P": "1E11111E101010",
    "Q": "0E11111115120D", "R": "1E11111E141211", "S": "0F10100E01011E", "T": "1F040404040404",
    "U": "1111111111110E", "V": "11111111110A04", "W": "1111111515150A", "X": "11110A040A1111",
    "Y": "1111110A040404", "Z": "1F01020408101F", "0": "0E11131519110E", "1": "040C040404040E",
    "2": "0E11010204081F", "3": "1F02040201110E", "4": "02060A121F0202", "5": "1F101E0101110E",
    "6": "0608101E11110E", "7": "1F010204080808", "8": "0E11110E11110E", "9": "0E11110F01020C",
    "-": "0000001F000000", ".": "00000000000C0C", ":": "000C0C000C0C00", "/": "00010204081000",
    "_": "0000000000001F", "(": "02040808080402", ")": "08040202020408", ",": "000000000C0408",
    "=": "00001F001F0000", "%": "18190204081303", "+": "0004041F040400", "[": "0E08080808080E",
    "]": "0E02020202020E", "?": "0E110102040004", " ": "00000000000000",
}
GLYPH_W, GLYPH_H, ADVANCE = 5, 7, 6


def _glyph(char: str) -> np.ndarray:
    code = _FONT.get(char.upper(), _FONT["?"])
    rows = [int(code[i:i + 2], 16) for i in range(0, 14, 2)]
    return np.array([[(row >> (GLYPH_W - 1 - col)) & 1 for col in range(GLYPH_W)] for row in rows], bool)


def text_width(text: str, scale: int = 1) -> int:
    return max(0, len(text) * ADVANCE - 1) * scale


def draw_text(canvas: np.ndarray, x: int, y: int, text: str, scale: int = 1, colour: float = _TEXT,
              max_width: int | None = None) -> None:
    """Write `text` (upper-cased; unknown characters as '?') with its top-left corner at (x, y),
    clipped to the canvas and to max_width pixels."""
    limit = canvas.shape[1] if max_width is None else min(canvas.shape[1], x + max_width)
    for i, char in enumerate(text):
        left = x + i * ADVANCE * scale
        if left + GLYPH_W * scale > limit:
            break
        pixels = np.kron(_glyph(char), np.ones((scale, scale), bool))
        region = canvas[y:y + pixels.shape[0], left:left + pixels.shape[1]]
        region[pixels[:region.shape[0], :region.shape[1]]] = colour


def batch_sheet(batch: dict[str, torch.Tensor], max_rows: int, title: str) -> np.ndarray:
    """(H, W, 3) uint8: a title, column labels, then per frame (up to max_rows) a labelled row of
    image (+ visible tracks), depth, mask and world points."""
    images, depths, masks, points = batch["images"], batch["depths"], batch["point_masks"], batch["world_points"]
    b, s, _, height, width = images.shape
    zoom = max(1, math.ceil(MIN_PANEL_WIDTH / width))
    scale = 2 if width * zoom >= 400 else 1
    line = (GLYPH_H + 4) * scale
    margin = text_width("B00 S00", scale) + 6 * scale
    rows = []
    for i in range(b):
        valid_depth = depths[i][masks[i]]
        lo, hi = (float(valid_depth.min()), float(valid_depth.max())) if valid_depth.numel() else (0.0, 1.0)
        valid_pts = points[i][masks[i]]
        p_lo = valid_pts.amin(0) if valid_pts.numel() else torch.zeros(3)
        p_hi = valid_pts.amax(0) if valid_pts.numel() else torch.ones(3)
        for j in range(s):
            if len(rows) == max_rows:
                break
            image = images[i, j].permute(1, 2, 0).numpy().copy()
            if "tracks" in batch:
                _draw_tracks(image, batch["tracks"][i, j], batch["track_vis_mask"][i, j])
            mask = masks[i, j].numpy()
            depth = _colormap((depths[i, j].numpy() - lo) / max(hi - lo, 1e-6)) * mask[..., None]
            xyz = ((points[i, j] - p_lo) / (p_hi - p_lo).clamp_min(1e-6)).clamp(0, 1).numpy() * mask[..., None]
            panels = [image, depth, np.repeat(mask[..., None], 3, -1).astype(np.float64), xyz]
            rows.append((f"b{i} s{j}", [np.kron(p, np.ones((zoom, zoom, 1))) for p in panels]))
    panel_h, panel_w = height * zoom, width * zoom
    gap = 2
    sheet = np.full((2 * line + len(rows) * (panel_h + gap), margin + len(COLUMNS) * (panel_w + gap), 3),
                    _BACKGROUND)
    draw_text(sheet, 2 * scale, 2 * scale, title, scale)
    for c, name in enumerate(COLUMNS):
        draw_text(sheet, margin + c * (panel_w + gap) + 2, line + 2 * scale, name, scale, max_width=panel_w - 2)
    for r, (label, panels) in enumerate(rows):
        top = 2 * line + r * (panel_h + gap)
        draw_text(sheet, 2 * scale, top + 2 * scale, label, scale, max_width=margin - 4 * scale)
        for c, panel in enumerate(panels):
            left = margin + c * (panel_w + gap)
            sheet[top:top + panel_h, left:left + panel_w] = panel
    return (sheet * 255).round().clip(0, 255).astype(np.uint8)


# Control points of a perceptually ordered dark-blue -> cyan -> yellow -> red map.
_MAP_X = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_MAP_RGB = np.array([[0.19, 0.07, 0.23], [0.16, 0.47, 0.93], [0.25, 0.93, 0.60], [0.97, 0.73, 0.22], [0.6, 0.05, 0.02]])


def _colormap(values: np.ndarray) -> np.ndarray:
    values = np.clip(values, 0.0, 1.0)
    return np.stack([np.interp(values, _MAP_X, _MAP_RGB[:, c]) for c in range(3)], -1)


def _draw_tracks(image: np.ndarray, tracks: torch.Tensor, visible: torch.Tensor) -> None:
    """Mark visible track points (image coordinates, integer pixel centres) with 3x3 dots, a colour
    per track."""
    height, width = image.shape[:2]
    for n, ((u, v), vis) in enumerate(zip(tracks.tolist(), visible.tolist())):
        if not vis:
            continue
        col, row = int(round(u)), int(round(v))
        colour = _colormap(np.array((n * 0.618) % 1.0))
        image[max(row - 1, 0):min(row + 2, height), max(col - 1, 0):min(col + 2, width)] = colour
