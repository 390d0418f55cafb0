"""`vggt-fsdp plan RECIPE`: one GPU's predicted peak memory for a recipe, what fits, and what to change.

Prints the planner's terms (each with its formula), the peak and whether it fits the card, the largest
frames per GPU that fit under the recipe's checkpoint policy, and the checkpoint policy with the least
recompute that fits the recipe's (or --frames) frame count. Nothing is allocated; the model is built on
the meta device.
"""
from __future__ import annotations

import argparse
import json
import sys

from vggt_fsdp.memory import planner

GiB = planner.GiB
# A100-SXM4-40GB's total memory as torch.cuda reports it; the default card without a visible GPU.
A100_40GB_BYTES = 42_505_273_344


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument("--gpus", type=int, default=None, help="world size (default: accelerate.num_processes)")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GiB",
                        help="device memory in GiB (default: the visible CUDA device's, else an A100 40GB's 39.6)")
    parser.add_argument("--frames", type=int, default=None, help="frames per GPU (default: data.frames_per_gpu)")
    parser.add_argument("--image", type=_image_hw, default=None, metavar="HxW",
                        help="image size (default: data.image_width at the tallest data.aspect_range)")
    parser.add_argument("--device-kind", choices=("cuda", "cpu"), default="cuda",
                        help="kernels to plan for (default cuda)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override (repeatable), e.g. parallel.checkpoint.policy=attention")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    from vggt_fsdp.commands.model_option import add_model_option

    add_model_option(parser, plan=True)  # --model MODULE:CALLABLE --size N: your own model


def _image_hw(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image {text!r}: expected HxW, e.g. 518x518") from None
    return height, width


def device_memory(gib: float | None) -> tuple[int, str]:
    """(bytes, where the figure came from)."""
    if gib is not None:
        if gib <= 0:
            raise ValueError(f"--gpu-memory {gib}: must be > 0")
        return int(gib * GiB), "--gpu-memory"
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(props.total_memory), f"visible device {props.name}"
    return A100_40GB_BYTES, "no CUDA device visible: an A100 40GB's total (pass --gpu-memory)"


def report(recipe, args) -> tuple[dict, planner.MemoryPlan]:
    """(the JSON summary, the plan it summarises)."""
    memory, source = device_memory(args.gpu_memory)
    shape = planner.recipe_shape(recipe, args.gpus, args.image)
    frames = args.frames if args.frames is not None else recipe.data.frames_per_gpu
    if frames == "auto":  # the largest count that fits (at --gpus/--image): max_frames itself
        frames = max_frames = planner.resolve_frames_per_gpu(recipe, memory, args.device_kind, gpus=args.gpus,
                                                             image_hw=args.image)
    else:
        max_frames = planner.max_frames_that_fit(shape.model_cfg, recipe.parallel, shape.world_size,
                                                 shape.image_hw, memory, args.device_kind,
                                                 frames_range=shape.frames_range, freeze=shape.freeze)
    frames_range = planner.clip_range(shape.frames_range, frames)
    result = planner.plan(shape.model_cfg, recipe.parallel, shape.world_size, frames, shape.image_hw,
                          args.device_kind, frames_range=frames_range, freeze=shape.freeze)
    cheapest = planner.cheapest_policy_that_fits(shape.model_cfg, recipe.parallel, shape.world_size, frames,
                                                 shape.image_hw, memory, args.device_kind,
                                                 frames_range=frames_range, freeze=shape.freeze)
    summary = {
        "recipe": args.recipe,
        "gpu_memory_bytes": memory,
        "gpu_memory_GiB": round(memory / GiB, 2),
        "gpu_memory_source": source,
        "fits": result.fits(memory),
        "margin_GiB": round((memory - result.device_bytes) / GiB, 2),
        "max_frames_per_gpu": max_frames,
        "cheapest_policy": None if cheapest is None else {
            "label": cheapest[0], "peak_GiB": round(cheapest[2].peak_bytes / GiB, 3),
            "device_GiB": round(cheapest[2].device_bytes / GiB, 3)},
        "plan": result.to_dict(),
    }
    return summary, result


def run(args: argparse.Namespace) -> int:
    from vggt_fsdp.recipe import load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.model:  # a user's model in place of the recipe's VGGT: memory/generic.py
            from vggt_fsdp.commands.model_option import run_plan

            return run_plan(args, recipe, *device_memory(args.gpu_memory))
        data, result = report(recipe, args)
    except (OSError, ValueError) as err:  # a bad recipe, override, size or shape: say which, no traceback
        print(f"vggt-fsdp plan: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    h, w = result.image_hw
    print(f"recipe {args.recipe}: {result.model}")
    print(f"{result.world_size} GPUs (parameters sharded over {result.shard_size}), {result.frames_per_gpu} frames "
          f"per GPU planned as {result.scenes} scene(s) x {result.frames_per_scene} frames at {h}x{w}, "
          f"{result.device_kind} kernels")
    print(f"checkpointing: {result.policy}")
    print()
    print(result.table())
    print()
    verdict = "fits" if data["fits"] else "does NOT fit"
    print(f"{verdict} {data['gpu_memory_GiB']} GiB ({data['gpu_memory_source']}): margin {data['margin_GiB']} GiB")
    print(f"largest frames per GPU that fit with this policy: {data['max_frames_per_gpu']}")
    cheapest = data["cheapest_policy"]
    if cheapest is None:
        print(f"no checkpoint policy fits {result.frames_per_gpu} frames per GPU")
    else:
        print(f"least-recompute policy that fits {result.frames_per_gpu} frames per GPU: {cheapest['label']} "
              f"(peak {cheapest['peak_GiB']} GiB, device {cheapest['device_GiB']} GiB)")
    return 0
