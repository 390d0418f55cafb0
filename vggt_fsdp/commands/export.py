"""`vggt-fsdp export CHECKPOINT OUT.safetensors`: one .safetensors file from a sharded checkpoint.

CHECKPOINT is a complete `step-*` directory, or a run's output directory / its `checkpoints/`
directory (then the newest intact checkpoint: a damaged one is named and skipped). The checkpoint's
files are verified against the checksums of its COMPLETE marker first, and weights holding NaN or Inf
are refused (named); nothing is written then. The file holds the model's fp32 master weights (or
--dtype bf16) under upstream names, loadable with `vggt_fsdp.model.load_weights(model, path)` or by
upstream's VGGT, readable like any new file (0666 less the umask). Runs in one process, without a
process group; memory: one copy of the model. Nothing in the checkpoint is run as code: its files are
read as tensors and plain data only, and a file holding anything else is refused (train/safe_load.py).
An output path that is a directory, or whose directory cannot be created, is refused before reading.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """  vggt-fsdp export runs/cpu_tiny runs/cpu_tiny/final.safetensors     the newest intact checkpoint
  vggt-fsdp export runs/try1/checkpoints/step-000500 step500.safetensors --dtype bf16
"""

DTYPES = ("fp32", "bf16")


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="step-* directory, checkpoints/ or a run's output_dir")
    parser.add_argument("out", type=Path, help="output .safetensors file")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="tensor dtype in the file")


def candidates(path: Path) -> tuple[list[Path], bool]:
    """The checkpoints `path` names, newest first, and whether it named one explicitly."""
    from vggt_fsdp.train import checkpoint as ckpt

    if ckpt.is_complete(path):
        return [path], True
    for root in (path, path / "checkpoints"):
        found = ckpt.complete_checkpoints(root)
        if found:
            return [p for _, p in reversed(found)], False
    raise FileNotFoundError(f"{path} is not a complete checkpoint and holds none (looked for step-* "
                            f"directories with a {ckpt.MARKER} marker in {path} and {path / 'checkpoints'})")


def find_checkpoint(path: Path) -> Path:
    """The newest intact checkpoint `path` names; a damaged one named explicitly is an error, one found
    in a directory is reported on stderr and the next older one is tried."""
    from vggt_fsdp.train import checkpoint as ckpt

    if not ckpt.is_complete(path):
        for root in (path, path / "checkpoints"):
            ckpt.say_unmarked(root, lambda text: print(f"warning: {text}", file=sys.stderr))
    found, explicit = candidates(path)
    for checkpoint in found:
        problems = ckpt.checkpoint_problems(checkpoint)
        if not problems:
            return checkpoint
        text = f"checkpoint {checkpoint} {ckpt.verdict(problems)}: {'; '.join(problems)}"
        if explicit:
            raise ckpt.CheckpointError(text)
        print(f"warning: {text}; trying the next older one", file=sys.stderr)
    raise ckpt.CheckpointError(f"no intact checkpoint under {path}")


def output_problem(out: Path) -> str | None:
    """Why `out` cannot be written (None: it can, as far as can be told before writing)."""
    import os

    if out.is_dir():
        return "is a directory; name a .safetensors file inside it"
    existing = next((p for p in (out.parent.absolute(), *out.parent.absolute().parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return f"cannot be created: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be created: {existing} is not writable by this user"
    return None


def run(args: argparse.Namespace) -> int:
    import torch

    from vggt_fsdp.train import checkpoint as ckpt
    from vggt_fsdp.train.integrity import NonFiniteWeightsError

    if args.out.suffix != ".safetensors":
        print(f"error: output {args.out} must end in .safetensors", file=sys.stderr)
        return 2
    if problem := output_problem(args.out):
        print(f"error: output {args.out} {problem}", file=sys.stderr)
        return 2
    try:
        source = find_checkpoint(args.checkpoint)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ckpt.CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    try:
        count = ckpt.export_safetensors(source, args.out, dtype=dtype, verify=False)  # verified above
    except (NonFiniteWeightsError, ckpt.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    size = args.out.stat().st_size / 2**20
    print(f"exported {count} tensors ({size:.1f} MiB, {args.dtype}) from {source} to {args.out}")
    return 0
