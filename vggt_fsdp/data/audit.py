"""`vggt-fsdp data check`: read every scene of every source once, before anyone spends GPU hours.

Each frame goes through the same reader and geometry checks as training (FileSceneSource.load_frame),
so what fails here would fail (or, with data.skip_bad_frames, be skipped) in training. The report
lists, per source and split, unreadable files, invalid cameras and depth statistics; for COLMAP
sources it also compares the depth maps with the model's sparse points (a wrong depth scale shows).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

import numpy as np
import torch

from vggt_fsdp.data.base import DataError
from vggt_fsdp.data.config import DataConfig, SourceConfig
from vggt_fsdp.geometry import project_points

# colmap: depth maps further than this fraction from the model's sparse points' depths are reported
MAX_POINT_RATIO_ERROR = 0.05


@dataclass
class SourceReport:
    label: str
    source: str
    root: str | None
    split: str
    scenes: int = 0
    frames_read: int = 0
    problems: list[str] = field(default_factory=list)
    note: str = ""  # why nothing was read (synthetic), if so
    # per frame read: valid-depth fraction, and min / median / max of its valid depth (metres)
    valid_fraction: list[float] = field(default_factory=list)
    depth: list[tuple[float, float, float]] = field(default_factory=list)
    focal_over_width: list[float] = field(default_factory=list)
    sizes: set[tuple[int, int]] = field(default_factory=set)
    # colmap: per frame, median of (depth map / depth of the model's sparse points it observes)
    point_ratios: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        out = {"label": self.label, "source": self.source, "root": self.root, "split": self.split,
               "scenes": self.scenes, "frames_read": self.frames_read, "problems": self.problems}
        if self.note:
            out["note"] = self.note
        if self.depth:
            depth = np.array(self.depth)
            out["depth_m"] = {"min": float(depth[:, 0].min()), "median_of_frame_medians": float(np.median(depth[:, 1])),
                              "max": float(depth[:, 2].max())}
            out["valid_depth_fraction"] = {"mean": float(np.mean(self.valid_fraction)),
                                           "min": float(np.min(self.valid_fraction))}
            out["focal_over_width"] = {"min": float(min(self.focal_over_width)), "max": float(max(self.focal_over_width))}
            out["image_sizes"] = sorted(f"{w}x{h}" for h, w in self.sizes)
        if self.point_ratios:
            out["depth_over_sparse_points"] = {"median": float(np.median(self.point_ratios)),
                                               "frames": len(self.point_ratios)}
        return out


class Progress:
    """A status line on `stream` at most every `every` seconds (each on its own line when the stream
    is not a terminal, so logs stay readable)."""

    def __init__(self, stream: TextIO | None = None, every: float = 2.0):
        self.stream = sys.stderr if stream is None else stream  # looked up now: tests replace sys.stderr
        self.every, self.last = every, 0.0
        self.tty = self.stream.isatty()

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            self.stream.write(("\r\033[K" if self.tty else "") + text + ("" if self.tty else "\n"))
            self.stream.flush()

    def done(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def check_source(cfg: SourceConfig, data: DataConfig, split: str, progress: Progress,
                 frames_per_scene: int = 0) -> SourceReport:
    """Read every scene of one source's split (at most frames_per_scene frames of each, 0: all)."""
    from vggt_fsdp.data import make_source

    report = SourceReport(cfg.label, cfg.source, cfg.root, split)
    if cfg.source == "synthetic":
        report.note = "rendered on the fly: no files to read"
        return report
    try:
        source = make_source(cfg, data, split, strict=False)
    except DataError as err:
        report.problems.append(str(err))
        return report
    report.problems.extend(source.scene_errors)
    report.scenes = len(source)
    for scene, count in enumerate(source.frame_counts):
        frames = range(count) if frames_per_scene <= 0 else np.linspace(0, count - 1, min(count, frames_per_scene)).round().astype(int)
        for frame in frames:
            _read(source, scene, int(frame), report)
            progress.update(f"[data check] {cfg.label} ({split}): scene {scene + 1}/{len(source)}, "
                            f"{report.frames_read} frames read, {len(report.problems)} problem(s)")
    if report.point_ratios:
        ratio = float(np.median(report.point_ratios))
        if abs(ratio - 1) > MAX_POINT_RATIO_ERROR:
            report.problems.append(
                f"{cfg.label}: the depth maps are {ratio:.4g} times the depth of the model's sparse points they "
                f"see (median over {len(report.point_ratios)} frames): check the source's colmap.depth_scale, "
                "or that the depth maps belong to this model")
    progress.update(f"[data check] {cfg.label} ({split}): {report.scenes} scenes, {report.frames_read} frames read, "
                    f"{len(report.problems)} problem(s)", force=True)
    return report


def _read(source, scene: int, frame: int, report: SourceReport) -> None:
    try:
        raw = source.load_frame(scene, frame)
    except DataError as err:
        report.problems.append(str(err))
        return
    report.frames_read += 1
    valid = raw.mask & (raw.depth > 0)
    depth = raw.depth[valid].numpy()
    report.valid_fraction.append(float(valid.float().mean()))
    report.depth.append((float(depth.min()), float(np.median(depth)), float(depth.max())))
    height, width = raw.image.shape[-2:]
    report.focal_over_width.append(float(raw.intrinsics[0, 0]) / width)
    report.sizes.add((height, width))
    points = source.observed_points(scene, frame) if hasattr(source, "observed_points") else None
    if points is not None and len(points):
        ratio = _depth_over_points(raw, points)
        if ratio is not None:
            report.point_ratios.append(ratio)


def _depth_over_points(raw, points: torch.Tensor) -> float | None:
    """Median of depth map / camera depth at the pixels where the frame sees `points` (world, (N, 3))."""
    uv, z = project_points(points.float(), raw.extrinsics, raw.intrinsics)
    height, width = raw.depth.shape
    col, row = uv[:, 0].round(), uv[:, 1].round()
    inside = (z > 0) & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    depth = raw.depth[row[inside].long(), col[inside].long()]
    seen = depth > 0
    if not seen.any():
        return None
    return float((depth[seen] / z[inside][seen]).median())


def check_data(data: DataConfig, splits: list[str], frames_per_scene: int = 0,
               progress: Progress | None = None) -> list[SourceReport]:
    progress = progress or Progress()
    reports = [check_source(cfg, data, split, progress, frames_per_scene)
               for cfg in data.source_configs() for split in splits]
    progress.done()
    return reports


def format_report(reports: list[SourceReport], max_problems: int = 20,
                  write: Callable[[str], None] = print) -> None:
    for report in reports:
        s = report.summary()
        where = f"{report.source}, {report.root}" if report.root else report.source
        write(f"source {report.label} ({where}), {report.split} split: "
              + (report.note if report.note else
                 f"{report.scenes} scenes, {report.frames_read} frames read, {len(report.problems)} problem(s)"))
        if "depth_m" in s:
            d, v, f = s["depth_m"], s["valid_depth_fraction"], s["focal_over_width"]
            write(f"  depth: {d['min']:.3g} to {d['max']:.3g} m (median of frame medians {d['median_of_frame_medians']:.3g} m); "
                  f"valid pixels {100 * v['mean']:.1f}% on average, {100 * v['min']:.1f}% at least")
            write(f"  cameras: fx / width {f['min']:.3g} to {f['max']:.3g}; image sizes {', '.join(s['image_sizes'])}")
        if "depth_over_sparse_points" in s:
            ratio = s["depth_over_sparse_points"]
            write(f"  depth maps / depth of the model's sparse points: {ratio['median']:.4g} (median over "
                  f"{ratio['frames']} frames)")
        for problem in report.problems[:max_problems]:
            write(f"  problem: {problem}")
        if len(report.problems) > max_problems:
            write(f"  ... and {len(report.problems) - max_problems} more (all of them in --json)")
