"""`vggt-fsdp data preview RECIPE [key=value ...] --out DIR`: look at what the trainer will see.

Builds one batch of the recipe's data section exactly as training does (same sampler, augmentation
and normalisation), writes DIR/batch.png (a row per frame: image with its visible track points, depth,
valid-point mask, world points as colours) and DIR/batch.json (shapes, dtypes and value ranges),
and prints the JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def build_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    preview = sub.add_parser("preview", help="write a PNG sheet and a JSON summary of one batch")
    preview.add_argument("recipe", help="recipe YAML file")
    preview.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.image_width=252")
    preview.add_argument("--out", required=True, help="output directory (created if missing)")
    preview.add_argument("--split", choices=("train", "val"), default="train")
    preview.add_argument("--step", type=int, default=0, help="which step's batch (the sampler is deterministic)")
    preview.add_argument("--rank", type=int, default=0, help="which rank's batch")
    preview.add_argument("--world-size", type=int, default=1)
    preview.add_argument("--frames-per-gpu", type=int, default=None,
                         help="frame budget when the recipe says data.frames_per_gpu=auto")
    preview.add_argument("--max-rows", type=int, default=16, help="frames drawn in the sheet (JSON covers all)")


def run(args: argparse.Namespace) -> int:
    from vggt_fsdp.data import build_dataloader
    from vggt_fsdp.recipe import load_recipe_or_exit

    recipe = load_recipe_or_exit(args.recipe, args.overrides)
    budget = args.frames_per_gpu
    if budget is None and recipe.data.frames_per_gpu == "auto":
        raise SystemExit("data.frames_per_gpu is 'auto' in this recipe: pass --frames-per-gpu N "
                         "(for example the number `vggt-fsdp plan RECIPE` fits)")
    loader = build_dataloader(recipe.data, rank=args.rank, world_size=args.world_size, split=args.split,
                              frames_per_gpu=budget, num_workers=0)
    loader.load_state_dict(loader.sampler.state_at(args.step))
    batch = next(iter(loader))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"recipe": args.recipe, "overrides": args.overrides, "split": args.split, "step": args.step,
               "rank": args.rank, "tensors": describe_batch(batch)}
    (out / "batch.json").write_text(json.dumps(summary, indent=2) + "\n")
    from vggt_fsdp.data.png import write_png

    write_png(out / "batch.png", batch_sheet(batch, args.max_rows))
    print(json.dumps(summary, indent=2))
    print(f"# wrote {out / 'batch.png'} and {out / 'batch.json'}")
    return 0


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


def batch_sheet(batch: dict[str, torch.Tensor], max_rows: int) -> np.ndarray:
    """(rows * H, 4 * W, 3) uint8: per frame, image (+ visible tracks), depth, mask, world points."""
    images, depths, masks = batch["images"], batch["depths"], batch["point_masks"]
    points = batch["world_points"]
    b, s = images.shape[:2]
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
            rows.append(np.concatenate([image, depth, np.repeat(mask[..., None], 3, -1), xyz], 1))
    return (np.concatenate(rows, 0) * 255).round().clip(0, 255).astype(np.uint8)


# Control points of a perceptually ordered dark-blue -> cyan -> yellow -> red map.
_MAP_X = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_MAP_RGB = np.array([[0.19, 0.07, 0.23], [0.16, 0.47, 0.93], [0.25, 0.93, 0.60], [0.97, 0.73, 0.22], [0.6, 0.05, 0.02]])


def _colormap(values: np.ndarray) -> np.ndarray:
    values = np.clip(values, 0.0, 1.0)
    return np.stack([np.interp(values, _MAP_X, _MAP_RGB[:, c]) for c in range(3)], -1)


def _draw_tracks(image: np.ndarray, tracks: torch.Tensor, visible: torch.Tensor) -> None:
    """Mark visible track points (pixel-index coordinates) with 3x3 dots, a colour per track."""
    height, width = image.shape[:2]
    for n, ((u, v), vis) in enumerate(zip(tracks.tolist(), visible.tolist())):
        if not vis:
            continue
        col, row = int(round(u)), int(round(v))
        colour = _colormap(np.array((n * 0.618) % 1.0))
        image[max(row - 1, 0):min(row + 2, height), max(col - 1, 0):min(col + 2, width)] = colour
