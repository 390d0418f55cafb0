"""Planner against measurement: predicted peak vs the peak of a real training step, per policy and frames.

One GPU measures what one GPU of an N-GPU run holds: the model is sharded over a fake process group of
world size N (rank 0; collectives do nothing, buffers have their true sizes), built on the meta device
and initialised on the device, its AdamW state created, then runs one measured step (bf16 forward,
backward, fused AdamW) under the recipe's sharding and precision with the checkpoint policy under test. Measured:
`torch.cuda.max_memory_allocated` on CUDA (FSDPMemTracker's peak on the CPU) and the exact saved-tensor
bytes of the forward pass. Writes `plan_vs_measured.json` and `.md` (command, device, date, versions).

GPU run (VGGT-1B, world size 8, 3 frame counts x 2 policies, the 24 frames as 12 scenes of 2 frames;
benchmarks/gpu_session.sh runs it):
    python benchmarks/plan_vs_measured.py --recipe recipes/a100_40g.yaml --world-size 8 \\
        --frames 8,24:2,48 --policies block/chunks,block/none --out benchmarks/results
CPU smoke run (tiny preset):
    python benchmarks/plan_vs_measured.py --recipe recipes/cpu_tiny.yaml --preset vggt-tiny --world-size 8 \\
        --frames 2,4:2 --policies attention/none,block/chunks --image 56x56 --out /tmp/pvm
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import shlex
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.provenance import git_commit  # noqa: E402
from vggt_fsdp.memory import planner  # noqa: E402
from vggt_fsdp.memory.measure import measure_step  # noqa: E402

GiB = planner.GiB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/a100_40g.yaml")
    p.add_argument("--preset", default=None, help="model preset instead of the recipe's (e.g. vggt-tiny)")
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--frames", default="8,16,24:2",
                   help="comma-separated frames per GPU, each F or F:S (scenes of S frames; default S: the "
                        "recipe's data.frames_range[1], capped at F)")
    p.add_argument("--policies", default="block/chunks,block/none",
                   help="comma-separated BLOCKS/HEADS, BLOCKS in none|attention|every_N|block, HEADS in none|chunks")
    p.add_argument("--image", default=None, help="HxW (default: the recipe's largest image)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="output directory")
    return p.parse_args(argv)


def with_policy(parallel_cfg, spec: str):
    """The recipe's parallel config with every block group (dino, frame, global) set to BLOCKS and the
    DPT heads to HEADS; the camera trunk keeps the recipe's setting."""
    for label, cfg in planner.policy_candidates(parallel_cfg):
        block, heads = label.replace("blocks ", "").split(", heads ")
        if f"{block}/{heads}" == spec:
            return cfg
    valid = [lbl.replace("blocks ", "").replace(", heads ", "/") for lbl, _ in planner.policy_candidates(parallel_cfg)]
    raise ValueError(f"--policies entry {spec!r}; valid: {', '.join(valid)}")


def run(args: argparse.Namespace, write=lambda result: None) -> dict:
    """Measure every (policy, frames) pair; `write(result)` is called after each row, so a run cut short
    by a time limit keeps what it measured. An out-of-memory step is a row too (status "oom")."""
    from vggt_fsdp.recipe import load_recipe

    overrides = [f"model.preset={args.preset}"] if args.preset else []
    recipe = load_recipe(args.recipe, overrides)
    image_hw = tuple(int(v) for v in args.image.lower().split("x")) if args.image else None
    shape = planner.recipe_shape(recipe, args.world_size, image_hw)
    device = torch.device(args.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    rows = []
    result = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()})"),
        "measured_with": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "FSDPMemTracker peak (CPU)",
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "recipe": args.recipe,
        "model": planner.model_name(shape.model_cfg),
        "preset": args.preset or recipe.model.preset,
        "world_size": args.world_size,
        "image_hw": list(shape.image_hw),
        "rows": rows,
    }
    for spec in args.policies.split(","):
        parallel_cfg = with_policy(recipe.parallel, spec.strip())
        for entry in args.frames.split(","):
            frames, _, per_scene = entry.partition(":")
            frames = int(frames)
            per_scene = min(int(per_scene) if per_scene else shape.frames_range[1], frames)
            scenes = frames // per_scene
            predicted = planner.plan(shape.model_cfg, parallel_cfg, args.world_size, scenes * per_scene,
                                     shape.image_hw, kind, frames_range=(per_scene, per_scene), freeze=shape.freeze)
            _free(device)
            try:
                measured = measure_step(shape.model_cfg, parallel_cfg, args.world_size, scenes, per_scene,
                                        shape.image_hw, device, freeze=shape.freeze)
            except torch.OutOfMemoryError:
                rows.append({"policy": spec, "frames_per_gpu": scenes * per_scene, "scenes": scenes,
                             "frames_per_scene": per_scene, "status": "oom",
                             "predicted_peak_GiB": round(predicted.peak_bytes / GiB, 3)})
                print(json.dumps(rows[-1]), flush=True)
                write(result)
                continue
            acts = predicted.total("activation")
            row = {
                "status": "ok", "policy": spec, "frames_per_gpu": scenes * per_scene, "scenes": scenes,
                "frames_per_scene": per_scene,
                "predicted_peak_bytes": predicted.peak_bytes,
                "measured_peak_bytes": measured.peak_bytes,
                "predicted_peak_GiB": round(predicted.peak_bytes / GiB, 3),
                "measured_peak_GiB": round(measured.peak_bytes / GiB, 3),
                "peak_error_pct": round(100 * (predicted.peak_bytes - measured.peak_bytes) / measured.peak_bytes, 2),
                "predicted_phase": predicted.peak_phase,
                "predicted_activation_bytes": acts,
                "saved_tensor_bytes": measured.saved.total_bytes,
                "activation_error_pct": round(100 * (acts - measured.saved.total_bytes)
                                              / max(measured.saved.total_bytes, 1), 2),
                "measured_reserved_GiB": round(measured.cuda.get("peak_reserved_bytes", 0) / GiB, 3),
                "seconds": round(measured.seconds, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(result)
    return result


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def markdown(result: dict) -> str:
    small = max((r["measured_peak_bytes"] for r in result["rows"] if r["status"] == "ok"), default=GiB) < GiB
    unit, scale = ("MiB", 2**20) if small else ("GiB", GiB)

    def fmt(n: int) -> str:
        return f"{n / scale:.3f}"

    lines = [
        f"# Planner vs measured peak memory ({result['device']})",
        "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}; torch {result['torch']}; commit {result['git_commit']}",
        f"- model: {result['preset']} ({result['model']}), recipe {result['recipe']}, world size "
        f"{result['world_size']} (fake process group, rank 0), image {result['image_hw'][0]}x{result['image_hw'][1]}",
        f"- measured: {result['measured_with']} over one training step (AdamW state already created)",
        "",
        f"| policy (blocks/heads) | frames | scenes x S | predicted {unit} | measured {unit} | error | predicted phase "
        f"| activations predicted / saved {unit} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['policy']} | {r['frames_per_gpu']} | {r['scenes']} x {r['frames_per_scene']} | "
                         f"{r['predicted_peak_GiB'] * GiB / scale:.3f} | out of memory | | | |")
            continue
        lines.append(
            f"| {r['policy']} | {r['frames_per_gpu']} | {r['scenes']} x {r['frames_per_scene']} | "
            f"{fmt(r['predicted_peak_bytes'])} | {fmt(r['measured_peak_bytes'])} | {r['peak_error_pct']:+.1f}% | "
            f"{r['predicted_phase']} | {fmt(r['predicted_activation_bytes'])} / {fmt(r['saved_tensor_bytes'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(result: dict) -> None:
        (out / "plan_vs_measured.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "plan_vs_measured.md").write_text(markdown(result))

    print(markdown(run(args, write)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
