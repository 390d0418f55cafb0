"""`vggt-fsdp data`: look at what the trainer will see, and check a dataset before training on it.

    data preview RECIPE [key=value ...] --out DIR   one batch of each source of the recipe's data
        section, built exactly as training builds it (same sampler, crops, augmentation and
        normalisation): DIR/batch-<source>.png (labelled panels: a row per frame with its image and
        visible track points, depth, valid-point mask and world points as colours) and DIR/batch.json
        (shapes, dtypes and value ranges of every tensor); a line per source on stdout.
    data check RECIPE [key=value ...]                reads every frame of every scene of every source
        once through the training readers and geometry checks; reports unreadable files, invalid
        cameras and depth statistics per source, with progress on stderr; exit status 1 on any problem.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch


EXAMPLES = """  vggt-fsdp data preview cpu_tiny --out preview/         one batch as PNG sheets and JSON
  vggt-fsdp data check a100_80g data.root=/data/co3d     read every frame once, report problems
"""

def build_parser(parser: argparse.ArgumentParser) -> None:
    from vggt_fsdp.cli import add_recipe_arguments

    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    preview = sub.add_parser("preview", help="write a labelled PNG sheet per source and a JSON summary of one batch")
    add_recipe_arguments(preview, "data.image_width=252")
    preview.add_argument("--out", required=True, help="output directory (created if missing)")
    preview.add_argument("--split", choices=("train", "val"), default="train")
    preview.add_argument("--step", type=int, default=0, help="which step's batch (the sampler is deterministic)")
    preview.add_argument("--rank", type=int, default=0, help="which rank's batch")
    preview.add_argument("--world-size", type=int, default=1)
    preview.add_argument("--frames-per-gpu", type=int, default=None,
                         help="frame budget when the recipe says data.frames_per_gpu=auto")
    preview.add_argument("--max-rows", type=int, default=16, help="frames drawn per sheet (the JSON covers all)")
    check = sub.add_parser("check", help="read every scene once; report bad files, invalid cameras, depth statistics")
    add_recipe_arguments(check, "data.root=/data/co3d")
    check.add_argument("--split", choices=("train", "val", "all"), default="all")
    check.add_argument("--frames-per-scene", type=int, default=0,
                       help="read at most this many frames of each scene, spread over it (0: every frame)")
    check.add_argument("--json", default=None, help="also write the full report here")
    check.add_argument("--max-problems", type=int, default=20, help="problems listed per source (--json has all)")


def run(args: argparse.Namespace) -> int:
    from vggt_fsdp.recipe import load_recipe_or_exit

    recipe = load_recipe_or_exit(args.recipe, args.overrides)
    return preview(recipe, args) if args.action == "preview" else check(recipe, args)


def preview(recipe, args: argparse.Namespace) -> int:
    from vggt_fsdp.data import DataError, build_dataloader
    from vggt_fsdp.data.png import write_png
    from vggt_fsdp.data.sheet import batch_sheet

    budget = args.frames_per_gpu
    if budget is None and recipe.data.frames_per_gpu == "auto":
        raise SystemExit("data.frames_per_gpu is 'auto' in this recipe: pass --frames-per-gpu N "
                         "(for example the number `vggt-fsdp plan RECIPE` fits)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"recipe": str(args.recipe), "overrides": args.overrides, "split": args.split, "step": args.step,
               "rank": args.rank, "world_size": args.world_size, "sources": {}}
    failed = 0
    for label, data in per_source(recipe.data):
        try:
            loader = build_dataloader(data, rank=args.rank, world_size=args.world_size, split=args.split,
                                      frames_per_gpu=budget, num_workers=0)
            loader.load_state_dict(loader.sampler.state_at(args.step))
            batch = next(iter(loader))
        except DataError as err:
            print(f"{label}: no preview: {err}")
            failed += 1
            continue
        b, s, _, h, w = batch["images"].shape
        png = out / f"batch-{label}.png"
        title = f"{label}  {args.split} step {args.step} rank {args.rank}: {b} scenes x {s} frames, {w}x{h}"
        write_png(png, batch_sheet(batch, args.max_rows, title))
        tensors = describe_batch(batch)
        summary["sources"][label] = {"png": str(png), "tensors": tensors}
        mask = tensors["point_masks"]["true_fraction"]
        depth = tensors["depths"]
        depth_text = f", depth {depth['min']:.3g} to {depth['max']:.3g} (normalised)" if "min" in depth else ""
        print(f"{label}: {b} scenes x {s} frames, {w}x{h}, valid points {100 * mask:.0f}%{depth_text} -> {png}")
    (out / "batch.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"# shapes, dtypes and value ranges: {out / 'batch.json'}")
    return 1 if failed else 0


def per_source(data):
    """(label, a data section holding only that source) for each source of `data`."""
    if not data.sources:
        yield data.label, data
        return
    for entry in data.sources:
        yield entry.label, dataclasses.replace(data, sources=[entry])


def check(recipe, args: argparse.Namespace) -> int:
    from vggt_fsdp.data.audit import check_data, format_report

    splits = ["train", "val"] if args.split == "all" else [args.split]
    reports = check_data(recipe.data, splits, args.frames_per_scene)
    format_report(reports, args.max_problems)
    problems = sum(len(r.problems) for r in reports)
    if args.json:
        Path(args.json).write_text(json.dumps([r.summary() for r in reports], indent=2) + "\n")
        print(f"# full report: {args.json}")
    print(f"# {problems} problem(s) in {sum(r.frames_read for r in reports)} frames read"
          + ("" if problems else ": the data reads as training reads it"))
    return 1 if problems else 0


def describe_batch(batch: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Shape, dtype and min/max/mean of every tensor; for dense geometry only over valid points."""
    mask = batch.get("point_masks")
    info = {}
    for key, value in batch.items():
        entry: dict = {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
        data = value
        if mask is not None and key in ("depths", "world_points", "cam_points") and mask.any():
            data = value[mask]
            entry["over"] = "point_masks"
        if data.dtype == torch.bool:
            entry["true_fraction"] = round(float(data.float().mean()), 6)
        elif data.numel():
            data = data.double()
            entry.update(min=round(float(data.min()), 6), max=round(float(data.max()), 6),
                         mean=round(float(data.mean()), 6))
        info[key] = entry
    return info
