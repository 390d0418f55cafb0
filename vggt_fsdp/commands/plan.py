"""`vggt-fsdp plan RECIPE [key=value ...]`: one GPU's predicted peak memory and step time for a recipe,
what fits, and what to change.

Prints the planner's terms (each with its formula), the peak and whether it fits the recipe's card
(`hardware.device`, or `--gpu-memory`), the largest frames per GPU that fit under the recipe's
checkpoint policy, the checkpoint policy with the least recompute that fits, and the predicted step
time on the card (work counted by kind, at the card's rates: `vggt_fsdp/memory/steptime.py`).
`--optimize` searches per-group checkpoint policies and DPT chunking for the fastest that fits
(`vggt_fsdp/memory/optimize.py`). Nothing is allocated; the model is built on the meta device.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from vggt_fsdp import hardware
from vggt_fsdp.cli import add_recipe_arguments
from vggt_fsdp.memory import context_terms, planner, steptime

EXAMPLES = """  vggt-fsdp plan a100_40g                                   peak memory and step time on the recipe's card
  vggt-fsdp plan a100_40g --optimize data.frames_per_gpu=32  the fastest checkpoint policy that fits
  vggt-fsdp plan gpu24g_single --host-memory 64 --json
"""

GiB = planner.GiB


def build_parser(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser, "parallel.checkpoint.policy=attention")
    parser.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an override like the positional ones (repeatable; kept for older command lines)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="world size (default: accelerate.num_processes); one node or whole nodes")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GiB",
                        help="device memory in GiB (default: the recipe's card, hardware.device)")
    parser.add_argument("--frames", type=int, default=None, help="frames per GPU (default: data.frames_per_gpu)")
    parser.add_argument("--host-memory", type=float, default=None, metavar="GiB",
                        help="with parallel.sharding.cpu_offload: the training host's RAM (default: this machine's)")
    parser.add_argument("--image", type=_image_hw, default=None, metavar="HxW",
                        help="image size (default: data.image_width at the tallest data.aspect_range)")
    parser.add_argument("--device-kind", choices=("cuda", "cpu"), default=None,
                        help="kernels to plan for (default: cpu for hardware.device cpu, else cuda)")
    parser.add_argument("--optimize", action="store_true",
                        help="search per-group checkpoint policies and DPT chunking for the fastest that fits")
    parser.add_argument("--margin", type=float, default=0.05, metavar="FRACTION",
                        help="with --optimize: memory to leave free, as a fraction of the card's (default 0.05)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    from vggt_fsdp.commands.model_option import add_model_option

    add_model_option(parser, plan=True)  # --model MODULE:CALLABLE --size N: your own model


def _image_hw(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image {text!r}: expected HxW, e.g. 518x518") from None
    return height, width


# ======================================================================================== the target
@dataclass(frozen=True)
class Target:
    """What the recipe is planned for: world size, GPUs a node, memory, kernels, and the card (rates)."""

    world_size: int
    gpus_per_node: int
    memory_bytes: int
    memory_source: str
    device_kind: str
    card: hardware.Card | None


def gpus_per_node(recipe) -> int:
    """GPUs (processes) a node, from the recipe's accelerate section: num_processes / num_machines."""
    processes = int(recipe.accelerate.get("num_processes", 1))
    machines = int(recipe.accelerate.get("num_machines", 1))
    return max(processes // max(machines, 1), 1)


def world_size(recipe, gpus: int | None) -> int:
    """--gpus checked: at least 1, and at most one node or whole nodes."""
    per_node = gpus_per_node(recipe)
    if gpus is None:
        return int(recipe.accelerate.get("num_processes", 1))
    if gpus < 1:
        raise ValueError(f"--gpus {gpus}: a world needs at least 1 GPU")
    if gpus > per_node and gpus % per_node:
        raise ValueError(f"--gpus {gpus}: not whole nodes of {per_node} GPUs (accelerate.num_processes / "
                         f"num_machines); give at most {per_node} or a multiple of {per_node}")
    return gpus


def device_memory(gib: float | None, recipe) -> tuple[int, str]:
    """(bytes, where the figure came from): --gpu-memory, else the recipe's card, else the visible GPU."""
    if gib is not None:
        if gib <= 0:
            raise ValueError(f"--gpu-memory {gib}: must be > 0")
        return int(gib * GiB), "--gpu-memory"
    stated = recipe.hardware.memory_bytes()
    if stated is not None:
        where = "hardware.memory_gib" if recipe.hardware.memory_gib is not None else hardware.card(
            recipe.hardware.device).memory_source
        return stated, f"{recipe.hardware.device}: {where}"
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(props.total_memory), f"visible device {props.name}"
    raise ValueError("the recipe states no card (hardware.device) and no GPU is visible: set hardware.device "
                     f"(one of {', '.join(hardware.cards())}) or pass --gpu-memory GiB")


def target(recipe, args) -> Target:
    memory, source = device_memory(args.gpu_memory, recipe)
    card = recipe.hardware.card()
    if card is None and recipe.hardware.device in (None, hardware.GPU):  # the visible card's rates, if known
        import torch

        if torch.cuda.is_available():
            card = hardware.card_for_device_name(torch.cuda.get_device_name(torch.cuda.current_device()))
    kind = args.device_kind or recipe.hardware.kind
    return Target(world_size(recipe, args.gpus), gpus_per_node(recipe), memory, source, kind, card)


# ======================================================================================== the report
def report(recipe, args, where: Target) -> tuple[dict, planner.MemoryPlan, steptime.StepWork]:
    """(the JSON summary, the memory plan it summarises, the step's counted work)."""
    shape = planner.recipe_shape(recipe, where.world_size, args.image)
    frames = args.frames if args.frames is not None else recipe.data.frames_per_gpu
    common = dict(frames_range=shape.frames_range, freeze=shape.freeze, gpus_per_node=where.gpus_per_node,
                  track_points=shape.track_points)
    if frames == "auto":  # the largest count that fits (at --gpus/--image): max_frames itself
        frames = max_frames = planner.resolve_frames_per_gpu(recipe, where.memory_bytes, where.device_kind,
                                                             gpus=where.world_size, image_hw=args.image,
                                                             gpus_per_node=where.gpus_per_node)
    else:
        max_frames = planner.max_frames_that_fit(shape.model_cfg, recipe.parallel, shape.world_size, shape.image_hw,
                                                 where.memory_bytes, where.device_kind, **common)
    frames_range = planner.clip_range(shape.frames_range, frames, recipe.parallel.context_parallel)
    result = planner.plan(shape.model_cfg, recipe.parallel, shape.world_size, frames, shape.image_hw,
                          where.device_kind, frames_range=frames_range, freeze=shape.freeze,
                          gpus_per_node=where.gpus_per_node, track_points=shape.track_points)
    cheapest = planner.cheapest_policy_that_fits(shape.model_cfg, recipe.parallel, shape.world_size, frames,
                                                 shape.image_hw, where.memory_bytes, where.device_kind,
                                                 frames_range=frames_range, freeze=shape.freeze,
                                                 track_points=shape.track_points)
    work = steptime.slowest_step(shape.model_cfg, recipe.parallel, frames, frames_range, shape.image_hw, where.card,
                                 world_size=shape.world_size, gpus_per_node=where.gpus_per_node, freeze=shape.freeze,
                                 track_points=shape.track_points)
    step = steptime.predict(work, where.card) if where.card is not None else None
    summary = {
        "recipe": args.recipe,
        "gpu_memory_bytes": where.memory_bytes,
        "gpu_memory_GiB": round(where.memory_bytes / GiB, 2),
        "gpu_memory_source": where.memory_source,
        "fits": result.fits(where.memory_bytes),
        "margin_GiB": round((where.memory_bytes - result.device_bytes) / GiB, 2),
        "max_frames_per_gpu": max_frames,
        "cheapest_policy": None if cheapest is None else {
            "label": cheapest[0], "peak_GiB": round(cheapest[2].peak_bytes / GiB, 3),
            "device_GiB": round(cheapest[2].device_bytes / GiB, 3)},
        "card": None if where.card is None else {"name": where.card.name, "title": where.card.title,
                                                 "rates": where.card.provenance()},
        "predicted_step_s": None if step is None else step.to_dict()["predicted_step_s"],
        "recompute_fraction": round(work.recompute_fraction, 4),
        "step_time": None if step is None else step.to_dict(),
        "work": work.to_dict(),
        "plan": result.to_dict(),
    }
    summary["context_parallel"] = recipe.parallel.context_parallel
    if recipe.parallel.context_parallel > 1 and where.card is not None:
        summary["context_exchange_s"] = context_terms.exchange_seconds(
            shape.model_cfg, result.policy["blocks"].get("global", "none"), work.batch,
            recipe.parallel.context_parallel, recipe.parallel.precision.param_dtype, where.card.name)
    if step is None:
        summary["step_time_unavailable"] = ("no card with rates: set hardware.device to a GPU card "
                                            f"({', '.join(hardware.cards())})")
    if recipe.parallel.sharding.cpu_offload:  # the host side: memory (refused above its RAM) and time
        from vggt_fsdp.memory import offload

        host = None if args.host_memory is None else int(args.host_memory * GiB)
        summary["offload"] = offload.summary(recipe, shape.model_cfg, shape.freeze, shape.world_size,
                                             where.gpus_per_node, where.device_kind,
                                             None if step is None else step.total_s, host)
    return summary, result, work


def optimize(recipe, args, where: Target, frames: int) -> dict:
    """`--optimize`: the frontier and the fastest configuration that fits with the margin."""
    from vggt_fsdp.memory import optimize as opt

    if where.card is None:
        raise ValueError("--optimize ranks configurations by predicted step time and needs a card with rates: "
                         f"set hardware.device ({', '.join(hardware.cards())})")
    if not 0 <= args.margin < 1:
        raise ValueError(f"--margin {args.margin}: a fraction of the card's memory, 0 <= margin < 1")
    shape = planner.recipe_shape(recipe, where.world_size, args.image)
    common = dict(world_size=shape.world_size, image_hw=shape.image_hw, frames_range=shape.frames_range,
                  memory_bytes=where.memory_bytes, card=where.card, margin=args.margin, device_kind=where.device_kind,
                  freeze=shape.freeze, gpus_per_node=where.gpus_per_node, track_points=shape.track_points)
    found = opt.search(shape.model_cfg, recipe.parallel, frames_per_gpu=frames, **common)
    sizes = opt.search_context(shape.model_cfg, recipe.parallel, frames_per_gpu=frames, known=found, **common)
    return {
        "card": where.card.name, "margin": args.margin, "frames_per_gpu": frames,
        "candidates": found.candidates, "planned": found.planned,
        "frontier": [p.to_dict(where.memory_bytes, args.margin) for p in found.frontier],
        "best": None if found.best is None else found.best.to_dict(where.memory_bytes, args.margin),
        "context_parallel": recipe.parallel.context_parallel,
        "context_sizes": [_group_size(g, where.memory_bytes, args.margin) for g in sizes],
    }


def _group_size(group, memory_bytes: int, margin: float) -> dict:
    best = group.found.best
    return {"context_parallel": group.size, "frames_per_gpu": group.frames_per_gpu,
            "best": None if best is None else best.to_dict(memory_bytes, margin),
            "exchange_s": group.exchange_s, "frames_per_s_per_gpu": group.frames_per_s,
            "overrides": group.overrides() if best is not None else None}


def run(args: argparse.Namespace) -> int:
    from vggt_fsdp.recipe import load_recipe

    try:
        recipe = load_recipe(args.recipe, [*args.overrides, *args.set_overrides])
        if args.model:  # a user's model in place of the recipe's VGGT: memory/generic.py
            from vggt_fsdp.commands.model_option import run_plan

            return run_plan(args, recipe, *device_memory(args.gpu_memory, recipe))
        if not recipe.vggt_task:
            raise ValueError(f"the recipe trains task {recipe.task}, not VGGT: plan its model with --model "
                             "MODULE:CALLABLE --size N (the module defines example_inputs(size))")
        where = target(recipe, args)
        data, result, work = report(recipe, args, where)
        if args.optimize:
            data["optimize"] = optimize(recipe, args, where, result.frames_per_gpu)
    except (OSError, ValueError) as err:  # a bad recipe, override, size or shape: say which, no traceback
        print(f"vggt-fsdp plan: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print_report(args, data, result, work)
    if "offload" in data:
        from vggt_fsdp.memory.offload import print_summary

        print_summary(data["offload"])
    if args.optimize:
        print_optimize(data["optimize"], data["gpu_memory_GiB"])
    return 0


# ======================================================================================== printing
def print_report(args, data: dict, result: planner.MemoryPlan, work: steptime.StepWork) -> None:
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
    print()
    b = work.batch
    size = data["context_parallel"]  # a scene's frames are spread over this many GPUs
    held = f"{b.frames} frames" if size == 1 else f"{b.frames * size} frames ({b.frames} on this GPU)"
    print(f"step time, {b.scenes} scene(s) x {held} (the slowest split): model "
          f"{_si(work.model.model_flops, 'FLOP')}, recompute {work.recompute_fraction:.1%} of it")
    step = data["step_time"]
    if step is None:
        print(f"  {data['step_time_unavailable']}")
        return
    card = data["card"]
    print(f"  on {card['title']} ({card['name']}), rates {card['rates']}")
    amounts = work.by_kind()
    for kind, seconds in step["seconds_by_kind"].items():
        unit = f"{_si(amounts[kind], 'B')} memory-bound" if kind == "memory" else _si(amounts[kind], "FLOP")
        print(f"  {kind:<12} {_si(seconds, 's'):>9}  ({unit})")
    print(f"  predicted step {_si(step['predicted_step_s'], 's')}, {b.images / step['predicted_step_s']:.3g} frames/s "
          f"per GPU, MFU {step['predicted_mfu']:.1%} (an estimate, compute only: communication assumed overlapped)")
    if "context_exchange_s" in data:
        print(f"  context parallelism: {_si(data['context_exchange_s'], 's')} a step of all-to-all exchanges over the "
              "node's GPU links (datasheet bandwidth, not overlapped: an estimate; memory/context_terms.py), not in "
              "the step above; its global attention is this GPU's: heads/N over the whole scene's frames")


def _si(value: float, unit: str) -> str:
    """`value` with an SI prefix and 3-4 significant digits: 569.9 TFLOP, 1.66 TB, 12.3 ms."""
    prefixes = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""), (1e-3, "m"), (1e-6, "u")]
    scale, prefix = next(((f, p) for f, p in prefixes if abs(value) >= f), prefixes[-1])
    return f"{value / scale:.4g} {prefix}{unit}"


def print_optimize(found: dict, memory_gib: float) -> None:
    print()
    print(f"--optimize: {found['candidates']} checkpoint configurations on {found['card']} at {found['frames_per_gpu']} "
          f"frames per GPU ({found['planned']} planned in full); frontier of device memory against step time:")
    rows = [("step", "MFU", "recompute", "device GiB", "fits", "dino / frame / global / heads")]
    for p in found["frontier"]:
        blocks = " / ".join(p["blocks"].values())
        rows.append((_si(p["predicted_step_s"], "s"), f"{p['predicted_mfu']:.1%}", f"{p['recompute_fraction']:.1%}",
                     f"{p['device_GiB']:.2f}", "yes" if p["fits_with_margin"] else "no", f"{blocks} / {p['heads']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.rjust(wd) if i < 5 else c for i, (c, wd) in enumerate(zip(r, widths))))
    best = found["best"]
    usable = memory_gib * (1 - found["margin"])
    if best is None:
        print(f"no configuration fits {usable:.2f} GiB ({memory_gib} GiB less a {found['margin']:.0%} margin) at "
              f"{found['frames_per_gpu']} frames per GPU: lower data.frames_per_gpu")
        return
    print(f"fastest that fits {usable:.2f} GiB ({memory_gib} GiB less a {found['margin']:.0%} margin): "
          f"{_si(best['predicted_step_s'], 's')} a step, {best['device_GiB']:.2f} GiB, recompute "
          f"{best['recompute_fraction']:.1%} of model FLOPs; as overrides:")
    print("  " + " ".join(best["overrides"]))
    print("or in the recipe (parallel:):")
    print(best["checkpoint_yaml"])
    print_context_sizes(found)


def print_context_sizes(found: dict) -> None:
    """The search at each context group size, ranked by frames a second per GPU."""
    sizes = found["context_sizes"]
    group = found["frames_per_gpu"] * found["context_parallel"]
    print()
    print(f"context parallelism: the same search for each group size N (a group holds {group} frames: each GPU "
          f"{group} / N), by predicted frames/s per GPU with the exchange added (estimates):")
    rows = [("N", "frames/GPU", "step", "exchange", "frames/s/GPU", "fastest that fits")]
    for g in sizes:
        best = g["best"]
        if best is None:
            rows.append((str(g["context_parallel"]), str(g["frames_per_gpu"]), "-", "-", "-", "none fits"))
            continue
        label = " / ".join(best["blocks"].values()) + f" / {best['heads']}"
        rows.append((str(g["context_parallel"]), str(g["frames_per_gpu"]), _si(best["predicted_step_s"], "s"),
                     _si(g["exchange_s"], "s") if g["exchange_s"] else "0", f"{g['frames_per_s_per_gpu']:.3f}", label))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.rjust(wd) if i < 5 else c for i, (c, wd) in enumerate(zip(r, widths))))
    fitting = [g for g in sizes if g["best"] is not None]
    if not fitting:
        return
    top = max(fitting, key=lambda g: g["frames_per_s_per_gpu"])
    print(f"most frames/s per GPU: N = {top['context_parallel']}"
          + (" (the recipe's)" if top["context_parallel"] == found["context_parallel"] else "") + "; as overrides:")
    print("  " + " ".join(top["overrides"]))
