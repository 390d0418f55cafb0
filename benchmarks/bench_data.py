"""Measure the data loader's throughput per worker: frames per second at 518 px.

    python -m benchmarks.bench_data [--frames 8] [--scenes 4] [--width 518] [--aspects 1.0 0.5]
        [--sources synthetic folder] [--json OUT.json]

One worker is one process building scenes one at a time, single-threaded: what each DataLoader
worker of the trainer does (`torch.set_num_threads(1)` in workers). Each scene goes through the same
`build_sample` as training (camera drawing, rendering or file decoding, crop/zoom augmentation,
colour jitter, normalisation and, for synthetic scenes, tracks). A GPU needs
frames_per_gpu / step_time frames per second; a loader with W workers gives at most W times the
figure below (scaling with W is not measured here), and only when W cores are free.

Sources: `synthetic` (the built-in world, rendered at the target size) and `folder` (the scene-folder
format: a scene rendered once at 4:3 with 1.2x the target width, written as PNG images and 16-bit
PNG depth, then read back, cropped and resized: the cost of a real-data loader on decoded PNGs).

Writes benchmarks/results/data-throughput-<date>-cpu.json by default, with the command, the CPU,
the date and the library versions. Loader workers run on CPU cores, so this is a CPU figure on any
machine; it is never a GPU result.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vggt_fsdp.data import DataConfig, build_source
from vggt_fsdp.data.base import SampleSpec, build_sample
from vggt_fsdp.data.sampler import image_hw_for

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8, help="frames per scene")
    parser.add_argument("--scenes", type=int, default=4, help="timed scenes per configuration (after 1 warm-up)")
    parser.add_argument("--width", type=int, default=518)
    parser.add_argument("--aspects", type=float, nargs="+", default=[1.0, 0.5], help="height / width")
    parser.add_argument("--sources", nargs="+", choices=("synthetic", "folder"), default=["synthetic", "folder"])
    parser.add_argument("--json", default=None, help="output path (default: benchmarks/results/data-throughput-<date>-cpu.json)")
    return parser.parse_args(argv)


def time_source(cfg: DataConfig, frames: int, image_hw: tuple[int, int], scenes: int) -> dict:
    """Seconds per scene over `scenes` timed scenes (distinct scenes and seeds) after one warm-up."""
    source = build_source(cfg, "train")
    wall, cpu = [], []
    for i in range(scenes + 1):
        spec = SampleSpec(index=i % len(source), num_frames=frames, image_hw=image_hw, seed=(cfg.seed, i),
                          step=i, next_position=0)
        start, start_cpu = time.perf_counter(), time.process_time()
        build_sample(source, spec, cfg.augment)
        if i:  # the first scene pays one-off costs (imports, allocator growth)
            wall.append((time.perf_counter() - start) / frames)
            cpu.append((time.process_time() - start_cpu) / frames)
    return {
        "frames_per_s": round(1 / statistics.median(wall), 2),
        "seconds_per_frame": {"median": round(statistics.median(wall), 4), "min": round(min(wall), 4),
                              "max": round(max(wall), 4)},
        # CPU time the worker itself used: what one dedicated core would take, unlike wall time on a
        # machine whose other processes compete for the cores.
        "frames_per_cpu_s": round(1 / statistics.median(cpu), 2),
        "timed_frames": frames * scenes,
    }


def write_folder_dataset(root: Path, frames: int, width: int) -> None:
    """One scene-folder scene at 4:3 and 1.2x the target width, rendered by the synthetic world."""
    from vggt_fsdp.data.config import SyntheticConfig
    from vggt_fsdp.data.png import write_png
    from vggt_fsdp.data.synthetic import draw_cameras, make_scene, render

    src_w = int(width * 1.2)
    src_hw = (src_w * 3 // 4, src_w)
    cfg = SyntheticConfig()
    scene = make_scene(0, 0, cfg)
    extr, intr = draw_cameras(scene, np.random.default_rng(0), frames, src_hw, cfg.fov_range_deg)
    folder = root / "scene0"
    (folder / "images").mkdir(parents=True)
    entries = []
    for i in range(frames):
        image, depth, _, _ = render(scene, extr[i], intr[i], src_hw)
        write_png(folder / "images" / f"{i:04d}.png", (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        write_png(folder / "images" / f"{i:04d}_depth.png", np.round(depth.numpy() * 1000).astype(np.uint16))
        entries.append({"image": f"images/{i:04d}.png", "depth": f"images/{i:04d}_depth.png",
                        "extrinsics": extr[i].tolist(), "intrinsics": intr[i].tolist()})
    (folder / "scene.json").write_text(json.dumps({"depth_scale": 0.001, "frames": entries}))


def device_description() -> str:
    model = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"cpu: {model}, {os.cpu_count()} logical cores, load average {load:.2f} at start"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # one loader worker
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if "folder" in args.sources:
            write_folder_dataset(Path(tmp), args.frames, args.width)
        for source in args.sources:
            for aspect in args.aspects:
                cfg = DataConfig(source=source, root=None if source == "synthetic" else tmp,
                                 frames_range=[args.frames, args.frames], frames_per_gpu=args.frames,
                                 image_width=args.width, val_fraction=0.0, num_workers=0)
                hw = image_hw_for(aspect, args.width, cfg.patch_size)
                row = {"source": source, "image_hw": list(hw), "frames_per_scene": args.frames,
                       **time_source(cfg, args.frames, hw, args.scenes)}
                print(json.dumps(row))
                results.append(row)
    try:
        import PIL
        pillow = PIL.__version__
    except ImportError:
        pillow = None
    report = {
        "benchmark": "data loader throughput per worker (one process, one thread)",
        "command": " ".join(["python -m benchmarks.bench_data"] + [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])]),
        "device": device_description(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "numpy": np.__version__, "pillow": pillow,
        "python": platform.python_version(),
        "note": "CPU measurement, one worker, one thread. frames_per_s is wall-clock and drops when other "
                "processes compete for the cores (see the load average in device); frames_per_cpu_s counts "
                "the worker's own CPU time, i.e. one dedicated core. PNG decoding uses Pillow when "
                "installed, else the numpy decoder (slower).",
        "results": results,
    }
    # Loader workers run on CPU cores whatever the training device, so this is always a CPU figure.
    out = Path(args.json) if args.json else RESULTS / f"data-throughput-{datetime.date.today().isoformat()}-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
