"""`--model MODULE:CALLABLE` of `vggt-fsdp recipe show` and `vggt-fsdp plan`: your own model in place of
the VGGT the recipe's `model:` section describes (the `parallel:` section must describe your model).

The protocol (the starter task, vggt_fsdp/tasks/own_model.py, follows it):
- MODULE is a dotted module name, importable from the current directory or the installed packages, or
  the path of a .py file; CALLABLE, a name in it, returns your `nn.Module` when called with no
  arguments. It is called under `with torch.device("meta")`: shapes only, no memory, so a model of any
  size is shown at once. It must therefore not pass `device=` to the tensors it creates.
- `plan` also needs MODULE to define `example_inputs(size)`: the inputs of one training forward at
  `size` (a tuple of positional inputs, or a dict of keyword inputs) on the CPU. `size` is your per-GPU
  batch in whatever unit you choose (sequences, images, tokens); `--size N` is the one to plan for.
  The model is then built and run on the CPU at sizes 1, 2 and 4 (memory/generic.py says what is
  measured and what is scaled).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn


def add_model_option(parser: argparse.ArgumentParser, *, plan: bool = False) -> None:
    parser.add_argument("--model", metavar="MODULE:CALLABLE", default=None,
                        help="your own model instead of the recipe's VGGT: CALLABLE() in MODULE (dotted name or "
                             ".py path) returns the nn.Module; it is built on the meta device")
    if plan:
        parser.add_argument("--size", type=int, default=None, metavar="N",
                            help="with --model: the per-GPU batch to plan for, in the unit of the module's "
                                 "example_inputs(size)")


@dataclass
class UserModel:
    spec: str
    factory: Callable[[], nn.Module]
    example_inputs: Callable[[int], Any] | None


def load_user_model(spec: str) -> UserModel:
    """Import MODULE and find CALLABLE (and example_inputs); a ValueError says what is wrong."""
    from vggt_fsdp.tasks.base import import_callable

    factory, module = import_callable(spec, what="--model")
    inputs = getattr(module, "example_inputs", None)
    return UserModel(spec, factory, inputs if callable(inputs) else None)


def meta_model(user: UserModel) -> nn.Module:
    import torch

    try:
        with torch.device("meta"):
            model = user.factory()
    except Exception as err:  # the user's code: one line that says where, not a traceback into ours
        raise ValueError(f"--model {user.spec!r}: calling it on the meta device raised {type(err).__name__}: "
                         f"{err}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {user.spec!r}: the callable returned {type(model).__name__}, not a torch.nn.Module")
    return model


def user_model_or_exit(spec: str) -> tuple[UserModel, nn.Module]:
    """For commands: a bad spec prints one `error:` line and exits with status 2."""
    try:
        user = load_user_model(spec)
        return user, meta_model(user)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


# ---------------------------------------------------------------------------------------- plan --model
def run_plan(args: argparse.Namespace, recipe, memory: int, memory_source: str) -> int:
    """`vggt-fsdp plan RECIPE --model MODULE:CALLABLE --size N`: memory/generic.py's plan of that model."""
    from vggt_fsdp.memory.generic import CHECK_SIZE, FIT_SIZES, GiB, plan_model

    user, model = user_model_or_exit(args.model)
    problems = []
    if args.size is None or args.size < 1:
        problems.append("--size N (>= 1) is required with --model: the per-GPU batch, in the unit of example_inputs")
    if user.example_inputs is None:
        problems.append(f"{args.model.rpartition(':')[0]} defines no example_inputs(size): plan needs one training "
                        "forward's inputs to measure activations (see vggt_fsdp/tasks/own_model.py)")
    if getattr(args, "frames", None) is not None or getattr(args, "image", None) is not None:
        problems.append("--frames and --image describe VGGT batches; with --model the batch is --size")
    if getattr(args, "optimize", False):
        problems.append("--optimize ranks VGGT checkpoint layouts by the step-time model, which counts VGGT's work "
                        "only; with --model, compare layouts by planning each (parallel.checkpoint.policy=...)")
    if problems:
        print("vggt-fsdp plan: " + "; ".join(problems), file=sys.stderr)
        return 2
    world = args.gpus if args.gpus is not None else int(recipe.accelerate.get("num_processes", 1))
    device_kind = args.device_kind or recipe.hardware.kind
    sizes = ", ".join(str(s) for s in (*FIT_SIZES, CHECK_SIZE))
    print(f"[vggt-fsdp] measuring {type(model).__name__}'s activations on the CPU at sizes {sizes} ...",
          file=sys.stderr, flush=True)
    result = plan_model(user.factory, user.example_inputs, recipe.parallel, world, args.size, device_kind)
    summary = {
        "recipe": args.recipe, "model": args.model, "gpu_memory_bytes": memory,
        "gpu_memory_GiB": round(memory / GiB, 2), "gpu_memory_source": memory_source,
        "fits": result.fits(memory), "margin_GiB": round((memory - result.device_bytes) / GiB, 3),
        "plan": result.to_dict(),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"recipe {args.recipe}, model {args.model}: {result.model}")
    what = "CPU processes" if result.device_kind == "cpu" else "GPUs"
    print(f"{world} {what} (parameters sharded over {result.shard_size}), size {args.size} per process, "
          f"{result.device_kind} kernels; no step time (the step-time model counts VGGT's work only)")
    print()
    print(result.table())
    print()
    for note in result.notes:
        print(f"# {note}")
    verdict = "fits" if summary["fits"] else "does NOT fit"
    print(f"{verdict} {summary['gpu_memory_GiB']} GiB ({memory_source}): margin {summary['margin_GiB']} GiB")
    return 0
