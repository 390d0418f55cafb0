"""Compare the 40GB recipe, the 80GB recipe and an upstream-style baseline, and sweep the frontier.

    python -m benchmarks.compare_recipes --out DIR [--profile gpu|cpu] [--budget-s 270] ...

In one invocation: each configuration runs `benchmarks.bench_step` in a fresh subprocess (so an
out-of-memory error, or a crash, cannot poison the next one) with a timeout; then the results go to
`DIR/<date>-<device>.json`, a Markdown report `DIR/<date>-<device>.md` and PNG charts beside it
(charts need the optional `plots` extra, matplotlib; without it the report says they were skipped).
The JSON and the report are rewritten after every configuration, so a run cut short keeps what it
measured.

Configurations, in the order they run (the most important first, so a tight budget drops the sweep):
0. (CPU profile) the communication volumes of the 80GB recipe's VGGT-1B at world size 8 (meta device);
1. the block policy the recipes had before issue 10 (every DINO, frame and global block checkpointed
   whole, eager, autocast), on the 40GB recipe at its target shape: the reference the new recipes'
   speed-ups are measured against, in the same run;
2. the 40GB recipe at its target shape, capped at 40 GiB of device memory;
3. the 80GB recipe at its target shape, capped at 80 GiB;
   (1-3 at the worst case, scenes of 24 frames; then 1-3 again on a realistic mix with `--mix`: the first
   N batches the recipe's sampler draws, scene lengths and aspect ratios varying as in training;)
4. the 40GB recipe with compiled blocks, when the recipe does not compile already (a check that
   `parallel.compile` holds, and its speed-up);
5. the upstream-style baseline at the same two shapes and caps (and, after the sweep, at a smaller
   frame count under the 80 GiB cap, where it does fit): no sharding (world size 1, every GPU holds the full fp32
   parameters, gradients and AdamW state, as DDP does), every transformer block checkpointed, all 24
   aggregator layer outputs kept, the DPT heads' chunks not checkpointed;
4. the sweep: the 80GB recipe over frames per GPU and the checkpoint policy of its DINO, frame and
   global blocks (the memory/throughput frontier), without a memory cap (the card's own memory).
The recipes themselves are not edited: a configuration is a recipe plus `key=value` overrides.

`--grid` adds, after 1-3, their variants with autocast off and with compiled blocks (GRID_VARIANTS; the
precision and compile choice a recipe should make by measurement) and writes `fastest.json`: for each
recipe, the fastest variant that ran within its cap, as overrides. `--mix-only` keeps the mix
configurations alone (the session's sampler-mix stage). Each configuration is recorded in the GPU
session's ledger as it completes (benchmarks/session_ledger.py), and one an earlier session at the same
code measured is skipped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE_40G = "recipes/a100_40g.yaml"
RECIPE_80G = "recipes/a100_80g.yaml"

# Upstream's training choices, as overrides of a recipe (the model and data stay the recipe's): the DINO,
# frame and global blocks checkpointed whole (its 72 checkpointed blocks), the camera trunk not.
# The checkpointing both A100 recipes used before issue 10, as overrides: every DINO, frame and global
# block recomputed whole, the camera trunk kept, DPT heads per chunk, eager blocks.
BLOCK_POLICY_BEFORE = [
    "parallel.checkpoint.policy=block",
    "parallel.checkpoint.groups={camera_trunk: {policy: none}}",
    "parallel.checkpoint.heads=chunks",
    "parallel.compile=false",
]
UPSTREAM_BASELINE = [
    "parallel.checkpoint.policy=block",
    "parallel.checkpoint.groups={camera_trunk: {policy: none}}",
    "parallel.checkpoint.heads=none",
    "model.overrides.keep_all_layers=true",
]

# The precision and compile variants of the block policy and the recipes (--grid), most likely lever first
# (issue 18: autocast off is predicted 1.19x, compiled blocks measured 1.21x on the H200 in November).
GRID_VARIANTS = {
    "no autocast": ["parallel.precision.autocast=false", "accelerate.mixed_precision=no"],
    "compiled": ["parallel.compile=true"],
    "no autocast, compiled": ["parallel.precision.autocast=false", "accelerate.mixed_precision=no",
                              "parallel.compile=true"],
}
RECIPE_ROLES = {"recipe_40g": "40GB recipe", "recipe_80g": "80GB recipe"}

VOLUMES_WORLD_SIZE = 8
# Errors (not out-of-memory) in this many configurations in a row mean the setup is broken: stop rather
# than spend the rest of a GPU budget failing the same way.
MAX_ERRORS_IN_ROW = 2


@dataclass
class Config:
    name: str
    role: str  # volumes | block_40g | recipe_40g | recipe_80g | compiled_40g | baseline | sweep
    recipe: str
    frames: int
    world_size: int
    overrides: list[str] = field(default_factory=list)
    gpu_memory_gib: float | None = None
    policy: str | None = None  # the swept checkpoint policy (sweep rows)
    mix: int = 0  # 0: scenes of the worst-case shape; N: the recipe sampler's first N batches
    variant: str = ""  # a GRID_VARIANTS key; "" for the configuration as its role defines it


@dataclass
class Profile:
    """Shapes and sizes of one comparison: the GPU one (VGGT-1B) or the CPU one (tiny model)."""

    name: str
    image: tuple[int, int]
    world_size: int
    frames_40g: int
    frames_80g: int
    cap_40g: float | None
    cap_80g: float | None
    baseline_probe_frames: list[int]  # extra baseline runs under the 80GB cap: where upstream's choices fit
    sweep_frames: list[int]
    sweep_policies: list[str]
    overrides: list[str]  # applied to every configuration
    warmup: int
    steps: int
    timeout_s: float
    # The VGGT-1B units job: for the communication model where no recipe is measured with VGGT-1B (the
    # CPU profile); a GPU comparison reads the units of its measured recipes instead.
    volumes_job: bool = False
    mix_batches: int = 0  # > 0: also measure 1-3 on the sampler's first N batches
    compile_probe: bool = False  # also measure the 40GB recipe with parallel.compile=true


PROFILES = {
    # VGGT-1B, 518 px, world size 8, each recipe at its own frames per GPU (24 for both since issue 10).
    "gpu": Profile("gpu", image=(518, 518), world_size=8, frames_40g=24, frames_80g=24, cap_40g=40.0, cap_80g=80.0,
                   baseline_probe_frames=[8], sweep_frames=[16, 64], sweep_policies=["attention", "block"],
                   overrides=[], warmup=1, steps=3, timeout_s=120, mix_batches=6, compile_probe=True),
    # The same scripts on the CPU with the tiny model: checks the machinery, measures nothing of a GPU.
    "cpu": Profile("cpu", image=(112, 112), world_size=8, frames_40g=2, frames_80g=4, cap_40g=None, cap_80g=None,
                   baseline_probe_frames=[1], sweep_frames=[2, 8], sweep_policies=["attention", "block"],
                   overrides=["model.preset=vggt-tiny"], warmup=1, steps=2, timeout_s=240, volumes_job=True,
                   mix_batches=2),
}


def plan(profile: Profile, include_baseline: bool = True, include_sweep: bool = True, grid: bool = False,
         compile_grid: bool = True) -> list[Config]:
    common = profile.overrides
    configs = []
    if profile.volumes_job:
        # The 80GB recipe's own model (VGGT-1B whatever the profile) sharded on the meta device at the
        # target world size: the communication volumes of the scaling model (seconds, no memory).
        configs.append(Config("80GB recipe (VGGT-1B units)", "volumes", RECIPE_80G, 1, VOLUMES_WORLD_SIZE))
    recipes = [
        Config("block policy (before)", "block_40g", RECIPE_40G, profile.frames_40g, profile.world_size,
               [*common, *BLOCK_POLICY_BEFORE], profile.cap_40g),
        Config("40GB recipe", "recipe_40g", RECIPE_40G, profile.frames_40g, profile.world_size,
               list(common), profile.cap_40g),
        Config("80GB recipe", "recipe_80g", RECIPE_80G, profile.frames_80g, profile.world_size,
               list(common), profile.cap_80g),
    ]
    configs += recipes
    if grid:  # each variant of the three before the next variant: a budget cut drops the least likely lever
        for variant, overrides in GRID_VARIANTS.items():
            if "compiled" in variant and not compile_grid:
                continue
            configs += [replace(c, name=f"{c.name}, {variant}", overrides=[*c.overrides, *overrides], variant=variant)
                        for c in recipes]
    if profile.mix_batches:
        configs += [replace(c, name=f"{c.name}, mix", mix=profile.mix_batches) for c in recipes]
    baseline = [*common, *UPSTREAM_BASELINE]
    if include_baseline:  # where upstream's choices fit first: its speed is owed; the OOM shapes are known
        for frames in profile.baseline_probe_frames:
            configs.append(Config(f"upstream-style baseline @{frames}", "baseline", RECIPE_80G, frames, 1,
                                  baseline, profile.cap_80g))
        for frames, cap in ((profile.frames_40g, profile.cap_40g), (profile.frames_80g, profile.cap_80g)):
            configs.append(Config(f"upstream-style baseline @{frames}", "baseline", RECIPE_80G, frames, 1,
                                  baseline, cap))
    if profile.compile_probe and not grid and not _compiles(RECIPE_40G):
        # After the baseline, as compiling is the slowest start: the worst case (one scene of 24 frames)
        # for the speed-up, then the sampler mix, whose batches of 2+ scenes are where pytorch#166926 failed.
        compiled = Config("40GB recipe, compiled", "compiled_40g", RECIPE_40G, profile.frames_40g,
                          profile.world_size, [*common, "parallel.compile=true"], profile.cap_40g)
        configs.append(compiled)
        if profile.mix_batches:
            configs.append(replace(compiled, name=f"{compiled.name}, mix", mix=profile.mix_batches))
    if include_sweep:  # by frames, then policy: a budget cut drops the largest shapes, not a policy
        for frames in profile.sweep_frames:
            for policy in profile.sweep_policies:
                configs.append(Config(f"80GB recipe, {policy} @{frames}", "sweep", RECIPE_80G, frames,
                                      profile.world_size,
                                      [*common, f"parallel.checkpoint.policy={policy}"], None, policy))
    return configs


def _compiles(recipe: str) -> bool:
    from vggt_fsdp.recipe import load_recipe

    return load_recipe(REPO / recipe).parallel.compile


def bench_command(config: Config, profile: Profile) -> list[str]:
    """The bench_step command line of one configuration (without the interpreter and --json)."""
    height, width = profile.image
    cmd = ["-m", "benchmarks.bench_step", config.recipe, *config.overrides,
           "--frames", str(config.frames), "--image", f"{height}x{width}",
           "--world-size", str(config.world_size), "--warmup", str(profile.warmup),
           "--steps", str(profile.steps), "--name", config.name]
    if config.gpu_memory_gib is not None:
        cmd += ["--gpu-memory", str(config.gpu_memory_gib)]
    if config.mix:
        cmd += ["--mix", str(config.mix)]
    if config.role == "volumes":
        cmd += ["--volumes-only", "--device", "cpu"]
    return cmd


def run_config(config: Config, profile: Profile, timeout_s: float, flops_cache: Path | None = None) -> dict:
    """One configuration in a fresh process; its JSON result, or a record of why there is none."""
    env = dict(os.environ)
    # Upstream trains with expandable segments; the same allocator setting for every configuration.
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(tmp) / "result.json"
        args = bench_command(config, profile)
        start = time.monotonic()
        try:
            extra = ["--flops-cache", str(flops_cache)] if flops_cache is not None else []
            proc = subprocess.run([sys.executable, *args, "--json", str(json_path), *extra], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
            result = {"status": "timeout", "error": f"no result within {timeout_s:.0f} s",
                      "stderr_tail": stderr[-2000:]}
        else:
            if json_path.is_file():
                result = json.loads(json_path.read_text())
            else:
                result = {"status": "error", "error": f"bench_step exited {proc.returncode} without a result",
                          "stderr_tail": proc.stderr[-2000:]}
        result["wall_s"] = time.monotonic() - start
    result["config"] = asdict(config)
    result["command"] = shlex.join(["python", *args])
    return result


def predict(config: Config, profile: Profile, device_name: str | None) -> dict:
    """The planner's view of a configuration, from `vggt-fsdp plan --json` at the measured shape: its
    recompute fraction, and its step time on the card that measured (the card torch names; none on the
    CPU, where no step time is predicted). The worst-case shape only: a mix has no single shape."""
    from vggt_fsdp.hardware import card_for_device_name

    if config.role == "volumes" or config.mix:
        return {}
    card = card_for_device_name(device_name) if device_name else None
    height, width = profile.image
    cmd = [sys.executable, "-m", "vggt_fsdp.cli", "plan", config.recipe, *config.overrides,
           *([f"hardware.device={card.name}"] if card is not None else []),
           "--frames", str(config.frames), "--gpus", str(config.world_size), "--image", f"{height}x{width}",
           "--json"]
    if config.gpu_memory_gib is not None:
        cmd += ["--gpu-memory", str(config.gpu_memory_gib)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"],
                "command": shlex.join(cmd[2:])}
    planned = json.loads(proc.stdout)
    return {"card": card.name if card is not None else None,
            "step_s": planned.get("predicted_step_s") if card is not None else None,
            "recompute_fraction": planned.get("recompute_fraction"),
            "peak_bytes": planned["plan"].get("peak_bytes"), "command": shlex.join(["vggt-fsdp", *cmd[4:]])}


def fits_cap(result: dict) -> bool:
    """Ran to the end within its configuration's cap (an OOM, or a run that reserved past the cap, does not)."""
    return result.get("status") == "ok" and (result.get("memory") or {}).get("cap_respected", True) is not False


def fastest_fitting(results: list[dict]) -> dict[str, dict | None]:
    """For each recipe measured at its worst case (no mix), its fastest variant that fits its cap: the
    overrides that make it (relative to the recipe), the median step and the device that measured."""
    best: dict[str, dict | None] = {}
    for role, recipe in RECIPE_ROLES.items():
        runs = [r for r in results if r.get("config", {}).get("role") == role and not r["config"].get("mix")]
        if not runs:
            continue
        fitting = [r for r in runs if fits_cap(r)]
        if not fitting:
            best[recipe] = None
            continue
        top = min(fitting, key=lambda r: r["timing"]["median"])
        best[recipe] = {"name": top["config"]["name"], "overrides": GRID_VARIANTS.get(top["config"].get("variant"), []),
                        "step_s": top["timing"]["median"], "device": (top.get("device") or {}).get("name"),
                        "compared": sorted(r["config"]["name"] for r in fitting)}
    return best


def _write(doc: dict, out: Path, stem: str, charts: bool) -> None:
    from benchmarks.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str))
    write_report(doc, out, stem, charts=charts)
    if doc.get("grid"):
        (out / "fastest.json").write_text(json.dumps(fastest_fitting(doc["results"]), indent=1))


def _stem(results: list[dict], profile: Profile) -> str:
    from benchmarks.bench_step import device_slug

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    measured = next((r["device"] for r in results if "device" in r), None)
    slug = device_slug(measured) if measured else ("cpu" if profile.name == "cpu" else "unknown-device")
    return f"{date}-{slug}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare_recipes", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="directory for the JSON, report and charts (default benchmarks/results)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help="gpu: VGGT-1B at 518 px, world size 8; cpu: tiny model "
                             "(default: gpu when CUDA is present)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting configurations when less than one timeout of this budget is left")
    parser.add_argument("--timeout-s", type=float, default=None, help="per-configuration timeout")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--sweep-frames", default=None, help="comma-separated frames per GPU for the sweep")
    parser.add_argument("--sweep-policies", default=None, help="comma-separated checkpoint policies")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--no-charts", action="store_true")
    parser.add_argument("--roles", default=None,
                        help="comma-separated roles to run (block_40g, recipe_40g, recipe_80g, compiled_40g, "
                             "baseline, sweep, volumes); default all")
    parser.add_argument("--no-mix", action="store_true", help="skip the realistic-mix configurations")
    parser.add_argument("--mix-only", action="store_true", help="only the realistic-mix configurations")
    parser.add_argument("--grid", action="store_true",
                        help="also each of 1-3 with autocast off and compiled (GRID_VARIANTS); writes fastest.json")
    parser.add_argument("--no-compile-grid", action="store_true", help="--grid without the compiled variants")
    parser.add_argument("--keep-going", action="store_true",
                        help=f"do not stop after {MAX_ERRORS_IN_ROW} configurations in a row fail with an error")
    return parser


def _profile_from_args(args: argparse.Namespace) -> Profile:
    import torch

    name = args.profile or ("gpu" if torch.cuda.device_count() > 0 else "cpu")
    profile = PROFILES[name]
    changes = {key: getattr(args, key) for key in ("warmup", "steps") if getattr(args, key) is not None}
    if args.timeout_s is not None:
        changes["timeout_s"] = args.timeout_s
    if args.sweep_frames:
        changes["sweep_frames"] = [int(x) for x in args.sweep_frames.split(",")]
    if args.sweep_policies:
        changes["sweep_policies"] = args.sweep_policies.split(",")
    return Profile(**{**asdict(profile), **changes, "image": profile.image})


def main(argv: list[str] | None = None) -> int:
    from benchmarks import session_ledger as ledger

    args = build_parser().parse_args(argv)
    profile = _profile_from_args(args)
    configs = plan(profile, include_baseline=not args.no_baseline, include_sweep=not args.no_sweep,
                   grid=args.grid, compile_grid=not args.no_compile_grid)
    if args.roles:
        configs = [c for c in configs if c.role in args.roles.split(",")]
    if args.no_mix:
        configs = [c for c in configs if not c.mix]
    if args.mix_only:
        configs = [c for c in configs if c.mix]
    started = time.monotonic()
    doc = {
        "command": shlex.join(["python", "-m", "benchmarks.compare_recipes",
                               *(sys.argv[1:] if argv is None else argv)]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "profile": asdict(profile),
        "grid": args.grid,
        "results": [],
    }
    errors_in_row = 0
    # FLOPs depend on the model and the shape only: counted once per shape for the whole comparison.
    cache_dir = tempfile.TemporaryDirectory()
    flops_cache = Path(cache_dir.name) / "flops.json"
    for config in configs:
        if ledger.skip_if_measured(args.out, config.name):
            continue
        left = None if args.budget_s is None else args.budget_s - (time.monotonic() - started)
        reason = None
        if left is not None and left < min(profile.timeout_s, 60):
            reason = f"budget of {args.budget_s:.0f} s spent"
        elif errors_in_row >= MAX_ERRORS_IN_ROW and not args.keep_going:
            reason = f"{errors_in_row} configurations in a row failed with an error (a broken setup, not a shape)"
        if reason is not None:
            doc["results"].append({"status": "skipped", "error": reason, "config": asdict(config)})
            ledger.record(args.out, config.name, ledger.OWED, reason)
            continue
        timeout = profile.timeout_s if left is None else min(profile.timeout_s, left)
        print(f"[compare] {config.name}: frames {config.frames}, world size {config.world_size}", flush=True)
        result = run_config(config, profile, timeout, flops_cache)
        print(f"[compare]   -> {result['status']} in {result['wall_s']:.0f} s", flush=True)
        if result.get("status") == "ok":
            result["predicted"] = predict(config, profile, (result.get("device") or {}).get("name")
                                          if (result.get("device") or {}).get("type") == "cuda" else None)
        doc["results"].append(result)
        errors_in_row = errors_in_row + 1 if result["status"] == "error" else 0
        _write(doc, args.out, _stem(doc["results"], profile), charts=False)
        # An out-of-memory run is a measurement (the configuration does not fit); an error or timeout is not.
        ledger.record(args.out, config.name, ledger.MEASURED if result["status"] in ("ok", "oom") else ledger.FAILED,
                      result.get("error"), run_status=result["status"],
                      step_s=(result.get("timing") or {}).get("median"))
    cache_dir.cleanup()
    doc["wall_s"] = time.monotonic() - started
    measured = next((r["device"] for r in doc["results"] if "device" in r), None)
    doc["device"] = measured  # name, type, torch and CUDA versions of the machine that measured
    final = _stem(doc["results"], profile)
    _write(doc, args.out, final, charts=not args.no_charts)
    print(f"[compare] wrote {args.out / final}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
