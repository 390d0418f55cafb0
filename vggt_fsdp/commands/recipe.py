"""`vggt-fsdp recipe list | show | copy`: the bundled recipes, and what a recipe resolves to.

`recipe list`: the bundled recipes (vggt_fsdp/bundled.py): name, the card each is sized for
(`hardware:`), processes, frames per GPU and what each is for (the first paragraph of its header).
`recipe copy NAME DEST [--slurm]`: a bundled recipe into DEST (a file, or a directory), and with
--slurm the multi-node SLURM script beside it, asking for the resources the recipe needs per node
(commands/slurm_copy.py), to run unedited with `sbatch --nodes N` or to edit.
`recipe show RECIPE [key=value ...]`: the resolved recipe, then the parallel plan: which modules become
FSDP units, their parameter and reduce dtypes, and what is checkpointed. The model is built on the meta
device, so this is instant and needs no process group, even for VGGT-1B. With `--get KEY` it prints only
that resolved value (e.g. `--get train.output_dir`, for scripts such as the SLURM one).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


EXAMPLES = """  vggt-fsdp recipe list
  vggt-fsdp recipe show a100_40g --plan-only parallel.checkpoint.policy=attention
  vggt-fsdp recipe show cpu_tiny --get train.output_dir
  vggt-fsdp recipe copy a100_80g my_recipes/ --slurm
"""

def build_parser(parser: argparse.ArgumentParser) -> None:
    from vggt_fsdp.cli import add_recipe_arguments

    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("list", help="the bundled recipes: name, card, processes, frames per GPU, what each is for")
    copy = sub.add_parser("copy", help="copy a bundled recipe (and with --slurm the SLURM script) to edit")
    copy.add_argument("name", help="a bundled recipe's name (`vggt-fsdp recipe list`) or a recipe file")
    copy.add_argument("dest", type=Path, help="destination file, or an existing directory")
    copy.add_argument("--slurm", action="store_true",
                      help="also copy the multi-node SLURM script (train_multinode.sbatch) beside it")
    copy.add_argument("--force", action="store_true", help="overwrite files that exist")
    show = sub.add_parser("show", help="print the resolved recipe and its FSDP / precision / checkpoint plan")
    add_recipe_arguments(show, "parallel.checkpoint.policy=block")
    show.add_argument("--plan-only", action="store_true", help="print only the plan table")
    from vggt_fsdp.commands.model_option import add_model_option

    add_model_option(show)  # --model MODULE:CALLABLE: your own model in place of the recipe's VGGT
    show.add_argument("--get", action="append", default=[], metavar="KEY",
                      help="print only this dotted key's resolved value, one line each (repeatable)")


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        return list_recipes()
    if args.action == "copy":
        return copy_recipe(args.name, args.dest, args.slurm, args.force)
    from vggt_fsdp.recipe import dump_recipe, load_recipe_or_exit

    recipe = load_recipe_or_exit(args.recipe, args.overrides)
    if args.get:
        return print_values(recipe, args.get)
    if not args.plan_only:
        print(f"# resolved recipe: {args.recipe} {' '.join(args.overrides)}".rstrip())
        print(dump_recipe(recipe))
    return print_plan(recipe, args.model)


def print_plan(recipe, model_spec: str | None) -> int:
    """The plan of the recipe's VGGT, or of the model `--model` builds; a `parallel.layout` that does not
    fit that model is one `error:` line and exit status 2."""
    from vggt_fsdp.memory.generic import describe_model

    model = None
    if model_spec:
        from vggt_fsdp.commands.model_option import user_model_or_exit

        _, model = user_model_or_exit(model_spec)
        print(f"# model: {describe_model(model)}, from --model {model_spec}")
    elif not recipe.vggt_task:
        from vggt_fsdp.tasks import TaskError, build_task

        try:
            model = build_task(recipe).model
        except TaskError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        model_spec = f"task {recipe.task}"
        print(f"# model: {describe_model(model)}, from {model_spec}")
    try:
        if model is not None:
            warn_layout(model, recipe.parallel)
        print(describe_plan(recipe, model))
    except ValueError as err:
        whose = (f"the model {model_spec} builds" if model_spec else "the VGGT the recipe's model: section "
                 "describes; for your own model pass --model MODULE:CALLABLE")
        print(f"error: {err} (in {whose})", file=sys.stderr)
        return 2
    return 0


def warn_layout(model, parallel) -> None:
    """A layout class or pattern that matches nothing in `model` (a VGGT recipe's, shown with another
    model): one `warning:` line each, as `vggt-fsdp train` would refuse it, so that the table below is not
    read as what training would do (an fp32 head that does not exist computes nothing in fp32)."""
    from vggt_fsdp.train.preflight import layout_problems

    for problem in layout_problems(model, parallel):
        print(f"warning: {problem} (`vggt-fsdp train` refuses this)", file=sys.stderr)


def print_values(recipe, keys: list[str]) -> int:
    """Each dotted key's resolved value on its own line: strings as they are, anything else as JSON."""
    from vggt_fsdp.recipe import recipe_to_dict

    data = recipe_to_dict(recipe)
    values = []
    for key in keys:
        node = data
        for depth, part in enumerate(key.split(".")):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(key.split(".")[:depth]) or "the recipe"
                valid = sorted(node) if isinstance(node, dict) else f"none: {where} is a value"
                print(f"error: --get {key}: {where} has no key {part!r}; valid keys: {valid}", file=sys.stderr)
                return 2
            node = node[part]
        values.append(node if isinstance(node, str) else json.dumps(node))
    print("\n".join(values))
    return 0


def header_summary(path: Path) -> str:
    """What a recipe is for: the first paragraph of its header comment, without the leading `NAME:`."""
    lines = []
    for line in path.read_text().splitlines():
        text = line.removeprefix("#").strip()
        if not line.startswith("#") or not text:
            break
        lines.append(text)
    return " ".join(lines).removeprefix(f"{path.stem}:").strip()


def card_summary(hardware) -> str:
    """The card a recipe states and the memory it is planned against."""
    from vggt_fsdp.hardware import CPU, GPU, card

    if hardware.device is None:
        return "unstated"
    if hardware.memory_gib is not None:
        memory = hardware.memory_gib
    else:
        memory = card(hardware.device).memory_gib  # cpu and gpu recipes must state memory (HardwareConfig)
    suffix = {CPU: " a process", GPU: " (any CUDA card)"}.get(hardware.device, "")
    return f"{hardware.device}, {memory:g} GiB{suffix}"


def list_recipes(width: int | None = None) -> int:
    """A row per recipe (name, card, processes, frames per GPU), what it is for wrapped below it, all
    within `width` columns (default: the terminal's, 100 when not a terminal)."""
    import textwrap

    from vggt_fsdp.bundled import bundled_recipes, recipe_dir
    from vggt_fsdp.recipe import load_recipe

    width = width or shutil.get_terminal_size((100, 24)).columns
    rows, purposes = [("name", "card", "processes", "frames/GPU")], []
    for name, path in bundled_recipes().items():
        recipe = load_recipe(path)
        acc = recipe.accelerate
        kind = "CPU" if acc.get("use_cpu") else "GPU"
        rows.append((name, card_summary(recipe.hardware), f"{acc.get('num_processes')} {kind}",
                     str(recipe.data.frames_per_gpu)))
        purposes.append(textwrap.wrap(header_summary(path), width - 4, max_lines=2, placeholder=" ..."))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        for line in purposes[i - 1] if i else []:
            print(f"    {line}")
    notes = (f"in {recipe_dir()}; `vggt-fsdp recipe show NAME` shows one in full, `vggt-fsdp recipe copy NAME "
             "DEST` copies one; any command takes a bundled recipe's NAME where it takes a recipe file")
    print("\n".join(textwrap.wrap(notes, width, initial_indent="# ", subsequent_indent="# ")))
    return 0


def copy_recipe(name: str, dest: Path, slurm: bool, force: bool) -> int:
    from vggt_fsdp.bundled import resolve_recipe, slurm_script
    from vggt_fsdp.tasks.starters import STARTERS

    if name in STARTERS and not Path(name).is_file():
        return copy_starter(name, dest, force)
    try:
        source = resolve_recipe(name)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    target = dest / source.name if dest.is_dir() else dest
    copies = [(source, target)] + ([(slurm_script(), target.parent / slurm_script().name)] if slurm else [])
    existing = [str(to) for _, to in copies if to.exists()]
    if existing and not force:
        print(f"error: {', '.join(existing)} exist(s); pass --force to overwrite", file=sys.stderr)
        return 2
    texts = {}
    if slurm:  # the script with the resources the recipe needs (commands/slurm_copy.py), before any write
        from vggt_fsdp.commands.slurm_copy import script_for
        from vggt_fsdp.recipe import RecipeError

        try:
            texts[slurm_script()] = script_for(source, slurm_script())
        except RecipeError as err:
            print(f"error: {err} (the SLURM script asks for what the recipe needs)", file=sys.stderr)
            return 2
    target.parent.mkdir(parents=True, exist_ok=True)
    for frm, to in copies:
        if frm in texts:
            to.write_text(texts[frm])
        else:
            shutil.copyfile(frm, to)
        print(f"wrote {to} (from {frm})")
    print(f"# try it: vggt-fsdp recipe show {target}")
    if slurm:
        print(f"# on SLURM: sbatch --nodes N {target.parent / slurm_script().name} {target} [key=value ...]")
    return 0


def copy_starter(name: str, dest: Path, force: bool) -> int:
    """A starter task (vggt_fsdp/tasks/starters.py): its recipe and task module into the directory DEST."""
    from vggt_fsdp.tasks.starters import STARTERS

    if dest.suffix in (".yaml", ".yml", ".py") or dest.is_file():
        print(f"error: {dest}: `recipe copy {name}` writes a recipe and its task module: give a directory",
              file=sys.stderr)
        return 2
    files = STARTERS[name]
    existing = [str(dest / f.name) for f in files if (dest / f.name).exists()]
    if existing and not force:
        print(f"error: {', '.join(existing)} exist(s); pass --force to overwrite", file=sys.stderr)
        return 2
    dest.mkdir(parents=True, exist_ok=True)
    for source in files:
        shutil.copyfile(source, dest / source.name)
        print(f"wrote {dest / source.name} (from {source})")
    print(f"# train it: vggt-fsdp train {dest / files[0].name}")
    return 0


def describe_plan(recipe, model=None) -> str:
    """`model`: a module to plan (any device; meta is instant) instead of the recipe's VGGT."""
    from vggt_fsdp.model.vggt import build_model
    from vggt_fsdp.parallel import plan_parallelism
    from vggt_fsdp.recipe import model_config

    if model is None:
        model = build_model(model_config(recipe.model), device="meta")
    plan = plan_parallelism(model, recipe.parallel)
    total = sum(unit.num_params for unit in plan.units)
    from vggt_fsdp.parallel.precision import describe
    lines = [
        f"# parallel plan: {len(plan.units)} FSDP units, {total:,} parameters, "
        f"sharding {recipe.parallel.sharding.mode}, cpu_offload {recipe.parallel.sharding.cpu_offload}",
        plan.table(),
        f"# precision: {describe(recipe.parallel.precision)}; master weights and optimizer state fp32",
        f"# checkpoint wrappers: {len(plan.checkpoint_wrapped)} modules (checkpoint column: attention = the "
        f"block's attention sub-module, block = the whole block, selective(S) = the whole block keeping S: "
        f"sdpa the attention output and logsumexp, qkv the qkv projection)",
        "# per-chunk checkpointing: " + (", ".join(plan.chunk_checkpointed) or "none"),
    ]
    return "\n".join(lines)
