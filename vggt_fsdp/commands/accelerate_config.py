"""`vggt-fsdp accelerate-config RECIPE [key=value ...] [--output FILE]`: the recipe as an Accelerate config
file for `accelerate launch --config_file FILE YOUR_SCRIPT.py`, a script of your own that only calls
`accelerator.prepare(model, optimizer)`.

The recipe's `accelerate:` section holds only what the toolkit's trainer needs from a launcher (its own
FSDP2 plugin comes from `parallel:`: parallel/accelerate.py). A plain script has only the file, so the
`fsdp_config` written here spells out the recipe's `parallel:` choices as Accelerate's FSDP2 plugin reads
them: each module of the recipe's block classes its own FSDP unit (TRANSFORMER_BASED_WRAP; without
it Accelerate shards the model as one unit, which saves no memory while it runs), resharding after
forward, CPU offload, activation checkpointing of those blocks where the recipe checkpoints any, rank
0's weights sent to the other ranks, sharded state dicts. The same file launches the toolkit's trainer
(`accelerate launch --config_file FILE -m vggt_fsdp.train RECIPE`, the SLURM script), which passes its
own FSDP2 plugin and so reads none of these keys. Hybrid sharding is left out: Accelerate's
`parallelism_config` would reach the trainer too (it builds its own mesh), so a plain script shards
over all processes. It then says what it wrote, on stderr.
Accelerate shards only GPU processes: under a CPU recipe's file a plain script trains unsharded (the
toolkit's trainer bridges that itself), which the summary says too.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """  vggt-fsdp accelerate-config a100_80g -o acc.yaml accelerate.num_machines=2
  accelerate launch --config_file acc.yaml my_script.py     Accelerate shards your own script's model
"""


def build_parser(parser: argparse.ArgumentParser) -> None:
    from vggt_fsdp.cli import add_recipe_arguments

    add_recipe_arguments(parser, "accelerate.num_machines=2")
    parser.add_argument("--output", "-o", type=Path, help="write the config here instead of stdout")


def fsdp_config(parallel) -> dict:
    """Accelerate's FSDP2 file keys for the recipe's `parallel:` section. Accelerate finds block classes
    by their class name alone (`get_module_class_from_name`), hence the last dotted part."""
    classes = [name.rsplit(".", 1)[-1] for name in parallel.layout.block_types]
    return {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": ",".join(classes),
        "fsdp_reshard_after_forward": parallel.sharding.reshard_after_forward,
        "fsdp_offload_params": parallel.sharding.cpu_offload,
        "fsdp_activation_checkpointing": parallel.checkpoint.policy != "none",
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_cpu_ram_efficient_loading": True,  # rank 0 loads the weights, the others receive them
        "fsdp_sync_module_states": True,  # which Accelerate requires with the line above
    }


def summary(recipe, where: Path | None) -> str:
    """What the file holds; `where`: the file written, None for stdout."""
    acc, cfg = recipe.accelerate, fsdp_config(recipe.parallel)
    what = f"wrote {where}: an" if where else "the above is an"
    lines = [f"{what} Accelerate config for `accelerate launch --config_file {where or 'FILE'} SCRIPT.py`",
             f"  {acc.get('num_processes')} process(es) on {acc.get('num_machines', 1)} machine(s), "
             f"mixed_precision {acc.get('mixed_precision')}, FSDP2: each {cfg['fsdp_transformer_layer_cls_to_wrap']} "
             f"module its own unit (your model's block class goes in fsdp_transformer_layer_cls_to_wrap), "
             f"reshard_after_forward {cfg['fsdp_reshard_after_forward']}, offload {cfg['fsdp_offload_params']}, "
             f"activation checkpointing {cfg['fsdp_activation_checkpointing']}"]
    if recipe.parallel.sharding.mode == "hybrid":
        lines.append("  parallel.sharding.mode is hybrid, which this file leaves out: under it a plain script shards "
                     "over all processes (Accelerate's parallelism_config would also reach vggt-fsdp's trainer, "
                     "which the SLURM script launches with this file and which builds its own mesh)")
    if acc.get("use_cpu"):
        lines.append("  use_cpu is true: Accelerate shards only GPU processes, so a plain script trains unsharded "
                     "here; `vggt-fsdp train RECIPE` shards on CPU processes too")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import yaml

    from vggt_fsdp.recipe import load_recipe_or_exit

    recipe = load_recipe_or_exit(args.recipe, args.overrides)
    section = {**recipe.accelerate, "fsdp_config": fsdp_config(recipe.parallel)}
    text = yaml.safe_dump(section, sort_keys=False)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    print(summary(recipe, args.output), file=sys.stderr)
    return 0
