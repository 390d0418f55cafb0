"""`vggt-fsdp recipe show RECIPE [key=value ...]`: the resolved recipe, then the parallel plan: which
modules become FSDP units, their parameter and reduce dtypes, and what is checkpointed. The model is
built on the meta device, so this is instant and needs no process group, even for VGGT-1B."""
from __future__ import annotations

import argparse


def build_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print the resolved recipe and its FSDP / precision / checkpoint plan")
    show.add_argument("recipe", help="recipe YAML file")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. parallel.checkpoint.policy=block")
    show.add_argument("--plan-only", action="store_true", help="print only the plan table")


def run(args: argparse.Namespace) -> int:
    from vggt_fsdp.recipe import dump_recipe, load_recipe_or_exit

    recipe = load_recipe_or_exit(args.recipe, args.overrides)
    if not args.plan_only:
        print(f"# resolved recipe: {args.recipe} {' '.join(args.overrides)}".rstrip())
        print(dump_recipe(recipe))
    print(describe_plan(recipe))
    return 0


def describe_plan(recipe) -> str:
    from vggt_fsdp.model.vggt import build_model
    from vggt_fsdp.parallel import plan_parallelism
    from vggt_fsdp.recipe import model_config

    model = build_model(model_config(recipe.model), device="meta")
    plan = plan_parallelism(model, recipe.parallel)
    total = sum(unit.num_params for unit in plan.units)
    precision = recipe.parallel.precision
    autocast = "off" if precision.param_dtype == "fp32" else f"{precision.param_dtype} autocast around the forward"
    lines = [
        f"# parallel plan: {len(plan.units)} FSDP units, {total:,} parameters, "
        f"sharding {recipe.parallel.sharding.mode}, cpu_offload {recipe.parallel.sharding.cpu_offload}",
        plan.table(),
        f"# autocast: {autocast}; master weights and optimizer state fp32",
        f"# checkpoint wrappers: {len(plan.checkpoint_wrapped)} modules (checkpoint column: attention = the "
        f"block's attention sub-module, block = the whole block)",
        "# per-chunk checkpointing: " + (", ".join(plan.chunk_checkpointed) or "none"),
    ]
    return "\n".join(lines)
