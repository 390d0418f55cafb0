"""Loss curves with and without autocast, on the CPU: the numerical effect of `parallel.precision.autocast`.

The same model initialisation, the same batches and the trainer's pieces (sharded model, `VGGTTask`
forward and loss, AdamW with the recipe's schedule, per-group clipping) trained for N steps in each mode:

- `fp32`: param_dtype fp32, the reference;
- `bf16 autocast (CUDA rules)`: bf16 parameters under bf16 autocast with CUDA autocast's fp32 list
  applied on the CPU (`vggt_fsdp.memory.cuda_autocast`: LayerNorm and softmax in fp32), i.e. the
  arithmetic upstream's recipe runs on a GPU;
- `bf16 no autocast`: bf16 parameters, MixedPrecisionPolicy only (LayerNorm bf16 in and out with fp32
  statistics inside the kernel).

(CPU autocast proper is not a separate mode: it changes no op of VGGT's bf16 trunk, so its curve is
bitwise the no-autocast one; tests/test_precision.py checks that.) One process, a 1-rank fake process
group. What it cannot show: GPU kernels' own rounding (cuBLAS split-K, cuDNN attention), nor speed.

    python benchmarks/precision_curves.py --preset vggt-tiny --steps 30 --out benchmarks/results/X

The .json and .md are rewritten after every step, so a run stopped part-way keeps what it measured (a
curve cut short says how many steps it has). Long CPU runs (tiny 200 steps, mid 30) take hours on a shared
2-core machine, so the modes can run as separate processes side by side (`--mode`, repeatable) and their
files be joined afterwards (`--join A.json B.json ... --out X`), which checks that every curve started from
the same initial weights and trained on the same batch shapes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (the command above), not as a module
    sys.path.insert(0, str(REPO))

from benchmarks.provenance import git_commit  # noqa: E402

MODES = {  # name: (param_dtype, autocast, CUDA autocast rules)
    "fp32": ("fp32", False, False),
    "bf16 autocast (CUDA rules)": ("bf16", True, True),
    "bf16 no autocast": ("bf16", False, False),
}


def host_batches(recipe, steps: int, frames: int) -> list[dict[str, torch.Tensor]]:
    """`steps` batches of the recipe's data section (synthetic source, no augmentation), drawn once."""
    from vggt_fsdp.data import build_dataloader

    data = dataclasses.replace(recipe.data, source="synthetic", root=None, num_workers=0,
                               augment=dataclasses.replace(recipe.data.augment, enabled=False))
    loader = iter(build_dataloader(data, frames_per_gpu=frames, num_workers=0))
    return [next(loader) for _ in range(steps)]


def train_curve(recipe, mode: str, batches: list[dict[str, torch.Tensor]], seed: int, on_step=None) -> dict:
    """Train one mode over `batches`; the losses (total and per term) of every step. `on_step(curve)` after
    each step, with the curve so far."""
    from vggt_fsdp.memory.cuda_autocast import cuda_autocast_rules
    from vggt_fsdp.memory.fake_pg import fake_process_group
    from vggt_fsdp.model import build_model, materialize
    from vggt_fsdp.parallel import apply_parallelism
    from vggt_fsdp.recipe import model_config
    from vggt_fsdp.tasks.vggt import VGGTTask, freeze
    from vggt_fsdp.train.optim import build_optimizer, build_scheduler, clip_grad_norms, clip_groups

    param_dtype, autocast, cuda_rules = MODES[mode]
    parallel = dataclasses.replace(recipe.parallel, precision=dataclasses.replace(
        recipe.parallel.precision, param_dtype=param_dtype, autocast=autocast))
    cfg = model_config(recipe.model)
    losses, terms, start = [], [], time.perf_counter()
    curve = {"losses": losses, "terms": terms, "steps_planned": len(batches)}
    with fake_process_group(1):
        torch.manual_seed(seed)
        model = build_model(cfg, device="meta")
        freeze(model, recipe.model.freeze)
        apply_parallelism(model, parallel)
        materialize(model, torch.device("cpu"))
        curve["init_checksum"] = float(sum(p.full_tensor().double().sum() for p in model.parameters()))
        optimizer = build_optimizer(model, recipe.optim, "cpu")
        scheduler = build_scheduler(optimizer, recipe.schedule, recipe.optim.lr, len(batches))
        groups = clip_groups(model, recipe.optim.clip_groups)
        task = VGGTTask(None, recipe.loss, cfg.aggregator.patch_size, 1 + cfg.aggregator.num_register_tokens,
                        tracks=False)
        for index, batch in enumerate(batches):
            with cuda_autocast_rules() if cuda_rules else contextlib.nullcontext():
                loss, parts = task.loss(model, batch)
                loss.backward()
            clip_grad_norms(groups, torch.nn.utils.clip_grad_norm_)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
            terms.append({k: float(v) for k, v in parts.items()})
            curve["seconds"] = time.perf_counter() - start
            print(f"  {mode}: step {index + 1}/{len(batches)} loss {losses[-1]:.5f} ({curve['seconds']:.0f} s)",
                  file=sys.stderr, flush=True)
            if on_step is not None:
                on_step(curve)
    return curve


def tail_mean(losses: list[float], fraction: float = 0.2) -> float:
    """Mean loss over the last `fraction` of the steps (at least one): where the curve has got to, less
    sensitive than the last step alone to one batch's noise."""
    tail = losses[-max(1, round(len(losses) * fraction)):]
    return sum(tail) / len(tail)


def compare(curves: dict[str, dict], reference: str = "fp32") -> dict[str, dict]:
    """Each other mode against `reference`: mean and max |loss - ref loss| / ref loss over the steps both
    ran, and the tail means (last 20% of the steps) of both."""
    if reference not in curves:
        return {}
    ref = curves[reference]["losses"]
    out = {}
    for mode, curve in curves.items():
        if mode == reference:
            continue
        rel = [abs(a - b) / abs(b) for a, b in zip(curve["losses"], ref)]
        out[mode] = {"mean_rel_dev": sum(rel) / len(rel), "max_rel_dev": max(rel),
                     "final_loss": curve["losses"][-1], f"{reference}_final_loss": ref[-1],
                     "tail_mean": tail_mean(curve["losses"]), f"{reference}_tail_mean": tail_mean(ref)}
    return out


def run(preset: str, steps: int, frames: int, width: int, seed: int, recipe_path: str, modes=tuple(MODES),
        on_curve=None) -> dict:
    """The curves of `modes` for one preset; `on_curve(partial_run)` after each step (incremental writes)."""
    from vggt_fsdp.recipe import load_recipe

    recipe = load_recipe(recipe_path, [f"model.preset={preset}", f"data.image_width={width}",
                                       f"data.frames_range=[{min(2, frames)}, {frames}]", f"data.frames_per_gpu={frames}"])
    batches = host_batches(recipe, steps, frames)
    result = {"preset": preset, "steps": steps, "frames_per_step": frames, "image_width": width,
              "shapes": [list(b["images"].shape) for b in batches], "curves": {}}
    for mode in modes:
        def step_done(curve, mode=mode):
            result["curves"][mode] = curve
            summarise(result)
            if on_curve is not None:
                on_curve(result)
        train_curve(recipe, mode, batches, seed, on_step=step_done)
    return result


def summarise(result: dict) -> None:
    """The comparisons of a run's curves (over the steps both curves of a pair have)."""
    result["vs_fp32"] = compare(result["curves"])
    # autocast=false against autocast directly: the choice a recipe makes on a GPU.
    result["no_autocast_vs_autocast"] = compare(result["curves"], "bf16 autocast (CUDA rules)").get(
        "bf16 no autocast")


def provenance(argv: list[str]) -> dict:
    return {"command": "python benchmarks/precision_curves.py " + shlex.join(argv),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "commit": git_commit()}


def markdown(result: dict) -> str:
    provs = result["provenance"] if isinstance(result["provenance"], list) else [result["provenance"]]
    lines = ["# Loss with and without autocast (CPU)", ""]
    for prov in provs:
        lines += [f"- command: `{prov['command']}`", f"  device: {prov['device']}; torch {prov['torch']}; "
                  f"date {prov['date']}; commit {prov['commit']}"]
    lines += ["- CPU numerics only: the `CUDA rules` mode applies CUDA autocast's fp32 list (LayerNorm, softmax) "
              "on the CPU; no speed figure here (GPU measurement owed).", ""]
    for run_ in result["runs"]:
        lines += [f"## {run_['preset']}: {run_['steps']} steps, {run_['frames_per_step']} frames a step, "
                  f"{run_['image_width']} px", "",
                  "| mode | first loss | last loss | mean loss, last 20% of steps | mean abs. rel. dev. from fp32 "
                  "| max | wall s (not a speed figure) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for mode, curve in run_["curves"].items():
            dev = run_.get("vs_fp32", {}).get(mode)
            cells = (f"{dev['mean_rel_dev']:.2e}", f"{dev['max_rel_dev']:.2e}") if dev else ("(reference)", "")
            name = mode if len(curve["losses"]) == run_["steps"] else \
                f"{mode} (stopped after {len(curve['losses'])} of {run_['steps']} steps)"
            lines.append(f"| {name} | {curve['losses'][0]:.5f} | {curve['losses'][-1]:.5f} "
                         f"| {tail_mean(curve['losses']):.5f} | {cells[0]} | {cells[1]} | {curve['seconds']:.0f} |")
        missing = [mode for mode in MODES if mode not in run_["curves"]]
        if missing:
            lines.append(f"| {', '.join(missing)} | not run | | | | | |")
        pair = run_.get("no_autocast_vs_autocast")
        if pair:
            lines += ["", f"`autocast=false` against autocast (CUDA rules), step by step: mean abs. rel. dev. "
                          f"{pair['mean_rel_dev']:.2e}, max {pair['max_rel_dev']:.2e}; mean loss over the last 20% "
                          f"of steps {pair['tail_mean']:.5f} against {pair['bf16 autocast (CUDA rules)_tail_mean']:.5f}."]
        lines.append("")
        lines.append("Losses per step: " + "; ".join(
            f"{mode}: " + ", ".join(f"{x:.4f}" for x in curve["losses"]) for mode, curve in run_["curves"].items()))
        lines.append("")
    return "\n".join(lines)


def join(results: list[dict]) -> dict:
    """One report from several runs' files: each preset's curves side by side. Refused unless the files
    come from one commit and the curves of a preset agree on steps, batch shapes and initial weights (the
    same experiment, split over processes)."""
    commits = {result["provenance"]["commit"] for result in results}
    if len(commits) != 1:  # the same code draws the same batches: shapes and weights alone would not show it
        raise SystemExit(f"--join: the files come from different commits {sorted(commits)}; join runs of one commit")
    runs: dict[str, dict] = {}
    for result in results:
        for run_ in result["runs"]:
            into = runs.setdefault(run_["preset"], {**run_, "curves": {}})
            for key in ("steps", "frames_per_step", "image_width", "shapes"):
                if into[key] != run_[key]:
                    raise SystemExit(f"--join: {run_['preset']}'s {key} differs between the files; "
                                     "join only runs of the same command but for --mode")
            for mode, curve in run_["curves"].items():
                first = next(iter(into["curves"].values()), curve)
                if curve["init_checksum"] != first["init_checksum"]:
                    raise SystemExit(f"--join: {run_['preset']} {mode} started from other weights "
                                     f"(checksum {curve['init_checksum']} against {first['init_checksum']})")
                if mode in into["curves"]:
                    raise SystemExit(f"--join: {run_['preset']} {mode} is in more than one file")
                into["curves"][mode] = curve
    for run_ in runs.values():
        run_["curves"] = {mode: run_["curves"][mode] for mode in MODES if mode in run_["curves"]}
        summarise(run_)
    provs = [p for r in results for p in (r["provenance"] if isinstance(r["provenance"], list) else [r["provenance"]])]
    return {"provenance": provs, "runs": list(runs.values())}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", action="append", help="model preset (repeatable)")
    parser.add_argument("--steps", type=int, action="append", help="steps, one per --preset")
    parser.add_argument("--mode", action="append", choices=list(MODES), help="modes to run (repeatable; default all)")
    parser.add_argument("--join", nargs="+", metavar="JSON", help="join the curves of earlier runs' files instead")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--width", type=int, default=112)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", default="recipes/cpu_tiny.yaml")
    parser.add_argument("--out", required=True, help="output path without suffix (.json and .md are written)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.join:
        joined = join([json.loads(Path(path).read_text()) for path in args.join])
        out.with_suffix(".json").write_text(json.dumps(joined, indent=1))
        out.with_suffix(".md").write_text(markdown(joined))
        print(markdown(joined))
        return 0
    if not args.preset or len(args.steps or []) != len(args.preset):
        parser.error("give --preset and one --steps per --preset (or --join)")
    prov = provenance(argv)  # at the start: the commit the run's code came from
    result = {"provenance": prov, "runs": []}

    def write(partial_run: dict) -> None:
        runs = [r for r in result["runs"] if r is not partial_run] + [partial_run]
        snapshot = {**result, "runs": runs}
        out.with_suffix(".json").write_text(json.dumps(snapshot, indent=1))
        out.with_suffix(".md").write_text(markdown(snapshot))

    for preset, steps in zip(args.preset, args.steps):
        result["runs"].append(run(preset, steps, args.frames, args.width, args.seed, args.recipe,
                                  modes=args.mode or tuple(MODES), on_curve=write))
        write(result["runs"][-1])
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
