"""Saved-tensor bytes of VGGT's track head, per part, counted exactly on the CPU (issue 13).

    python -m benchmarks.track_memory --preset vggt-mid --scenes 1 --frames 2 4 --image 56x70 \
        --points 16 64 --iters 2 [--chunks] [--cuda-rules] [--json OUT.json]

The head runs as it trains: bf16 parameters (what FSDP2 all-gathers) under bf16 autocast, reading the
aggregator's kept layers in bf16 and fp32 query points. `SavedTensorCounter` charges each saved storage
once to the innermost part running when it was saved:

- features: the DPT feature extractor (`track_head.feature_extractor`);
- corr: the correlation lookups (`track_head.tracker.corr`), all iterations;
- updateformer: the update transformer, all iterations;
- tracker: the rest of the tracker (feature-map norm and pyramid, initial track features, the rest of
  each iteration: correlation MLP, embeddings, feature update; visibility and confidence).

The kept layers themselves are the aggregator's outputs, shared with the other heads (the planner's
"kept layer outputs" term), and are not charged here. A part's bytes per iteration are read from two
counts, at `iters` and `iters + 1`. These are CPU counts: CUDA autocast runs LayerNorm and GroupNorm
in fp32 and grid_sample in its inputs' dtype (the CPU: the norms in bf16, grid_sample in fp32), which
changes some dtypes; `vggt_fsdp.memory.track_formulas` models both, and `--cuda-rules` counts on the CPU
under CUDA's rules (`memory.cuda_autocast.cuda_autocast_rules` and `cuda_grid_sample_rule` below).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from benchmarks.provenance import git_commit
from vggt_fsdp.memory.accounting import count_saved_bytes
from vggt_fsdp.model.config import VGGTConfig, get_preset

PARTS = ("features", "corr", "updateformer", "tracker")


@dataclass(frozen=True)
class TrackShape:
    scenes: int
    frames: int
    height: int
    width: int
    points: int
    iters: int


def build_head(cfg: VGGTConfig, chunks: bool) -> nn.Module:
    """The track head of `cfg` in bf16 (as FSDP2 all-gathers it), with or without chunk recompute."""
    from vggt_fsdp.model.vggt import _build_track_head

    torch.manual_seed(0)
    head = _build_track_head(cfg).to(torch.bfloat16)
    head.checkpoint_chunks = chunks
    return head


def head_inputs(cfg: VGGTConfig, shape: TrackShape, seed: int = 0):
    """Kept layers (bf16; parameters only so that the counter, which skips parameters, leaves these
    aggregator outputs out), images, query points inside the image (fp32)."""
    gen = torch.Generator().manual_seed(seed)
    patch = cfg.aggregator.patch_size
    tokens_per_frame = 1 + cfg.aggregator.num_register_tokens + (shape.height // patch) * (shape.width // patch)
    read = {i % cfg.aggregator.depth for i in cfg.dpt_head.intermediate_layer_idx}
    layers = [nn.Parameter(torch.randn(shape.scenes, shape.frames, tokens_per_frame, cfg.token_dim, generator=gen)
                           .to(torch.bfloat16)) if i in read else None for i in range(cfg.aggregator.depth)]
    images = torch.rand(shape.scenes, shape.frames, 3, shape.height, shape.width, generator=gen)
    scale = torch.tensor([shape.width - 1.0, shape.height - 1.0])
    queries = torch.rand(shape.scenes, shape.points, 2, generator=gen) * scale
    return layers, images, queries


def count_parts(head: nn.Module, cfg: VGGTConfig, shape: TrackShape) -> dict[str, int]:
    """Saved bytes per part for one forward of `head` at `shape` (CPU, bf16 autocast)."""
    layers, images, queries = head_inputs(cfg, shape)
    tracker = head.tracker
    groups = {"features": head.feature_extractor, "corr": tracker.corr, "updateformer": tracker.updateformer,
              "tracker": tracker}
    special = 1 + cfg.aggregator.num_register_tokens

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return head(layers, images, special, query_points=queries, iters=shape.iters, apply_sigmoid=False)

    report, _ = count_saved_bytes(forward, groups)
    parts = {name: report.by_group[name] for name in PARTS}
    parts["other"] = report.by_group["other"]
    parts["total"] = report.total_bytes
    return parts


def measure(cfg: VGGTConfig, shape: TrackShape, chunks: bool) -> dict:
    """Parts at `shape`, and per refinement iteration (the difference to one more iteration)."""
    head = build_head(cfg, chunks)
    at = count_parts(head, cfg, shape)
    more = count_parts(head, cfg, TrackShape(**{**asdict(shape), "iters": shape.iters + 1}))
    per_iter = {name: more[name] - at[name] for name in at}
    return {"shape": asdict(shape), "chunks": chunks, "bytes": at, "per_iteration": per_iter}


class _CudaGridSample(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.grid_sample and torch.is_autocast_enabled("cpu"):
            dtype = torch.promote_types(args[0].dtype, args[1].dtype)
            with torch.autocast("cpu", enabled=False):
                return func(args[0].to(dtype), args[1].to(dtype), *args[2:], **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_grid_sample_rule() -> Iterator[None]:
    """CUDA autocast's rule for grid_sample on the CPU: it runs in its inputs' promoted dtype ("promote",
    aten/src/ATen/autocast_mode.cpp), where CPU autocast runs it in fp32. With
    `memory.cuda_autocast.cuda_autocast_rules` (the fp32 norms) it makes a CPU count a CUDA count."""
    with _CudaGridSample():
        yield


def provenance() -> dict:
    return {"device": f"CPU ({platform.machine()})", "torch": torch.__version__, "commit": git_commit(short=True),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m benchmarks.track_memory", *sys.argv[1:]])}


@contextlib.contextmanager
def _rules(cuda: bool) -> Iterator[None]:
    if not cuda:
        yield
        return
    from vggt_fsdp.memory.cuda_autocast import cuda_autocast_rules

    with cuda_autocast_rules(), cuda_grid_sample_rule():
        yield


def _image(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    return int(height), int(width or height)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.track_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vggt-mid")
    parser.add_argument("--scenes", type=int, default=1)
    parser.add_argument("--frames", type=int, nargs="+", default=[2])
    parser.add_argument("--image", type=_image, nargs="+", default=[(56, 70)], help="HxW, several allowed")
    parser.add_argument("--points", type=int, nargs="+", default=[16])
    parser.add_argument("--iters", type=int, nargs="+", default=[2])
    parser.add_argument("--chunks", action="store_true", help="with parallel.checkpoint.heads: chunks")
    parser.add_argument("--cuda-rules", action="store_true",
                        help="count under CUDA's autocast rules (fp32 norms, grid_sample in its inputs' dtype)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    cfg = get_preset(args.preset)
    rows = []
    for frames in args.frames:
        for height, width in args.image:
            for points in args.points:
                for iters in args.iters:
                    shape = TrackShape(args.scenes, frames, height, width, points, iters)
                    with _rules(args.cuda_rules):
                        row = measure(cfg, shape, args.chunks)
                    row["autocast_rules"] = "cuda" if args.cuda_rules else "cpu"
                    rows.append(row)
                    mib = {k: round(v / 2**20, 3) for k, v in row["bytes"].items()}
                    print(json.dumps({"shape": row["shape"], "MiB": mib}), flush=True)
    result = {"provenance": provenance(), "preset": args.preset, "rows": rows}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
