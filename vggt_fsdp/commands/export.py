"""`vggt-fsdp export CHECKPOINT OUT.safetensors`: one .safetensors file from a sharded checkpoint.

CHECKPOINT is a complete `step-*` directory, or a run's output directory / its `checkpoints/`
directory (then the latest complete checkpoint). The file holds the model's fp32 master weights
(or --dtype bf16) under upstream names, loadable with `vggt_fsdp.model.load_weights(model, path)`
or by upstream's VGGT. Runs in one process, without a process group; memory: one copy of the model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("fp32", "bf16")


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="step-* directory, checkpoints/ or a run's output_dir")
    parser.add_argument("out", type=Path, help="output .safetensors file")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="tensor dtype in the file")


def find_checkpoint(path: Path) -> Path:
    from vggt_fsdp.train import checkpoint as ckpt

    if ckpt.is_complete(path):
        return path
    for root in (path, path / "checkpoints"):
        found = ckpt.complete_checkpoints(root)
        if found:
            return found[-1][1]
    raise FileNotFoundError(f"{path} is not a complete checkpoint and holds none (looked for step-* "
                            f"directories with a {ckpt.MARKER} marker in {path} and {path / 'checkpoints'})")


def run(args: argparse.Namespace) -> int:
    import torch

    from vggt_fsdp.train import checkpoint as ckpt

    if args.out.suffix != ".safetensors":
        print(f"error: output {args.out} must end in .safetensors", file=sys.stderr)
        return 2
    try:
        source = find_checkpoint(args.checkpoint)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    count = ckpt.export_safetensors(source, args.out, dtype=dtype)
    size = args.out.stat().st_size / 2**20
    print(f"exported {count} tensors ({size:.1f} MiB, {args.dtype}) from {source} to {args.out}")
    return 0
