"""Recipes: strict typed loading, overrides, the shipped recipes, and the accelerate-config command."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from vggt_fsdp.recipe import Recipe, RecipeError, dump_recipe, from_data, load_recipe, model_config, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))

BASE = {
    "model": {"preset": "vggt-tiny", "heads": {"track": False}},
    "accelerate": {"distributed_type": "FSDP", "num_processes": 2, "num_machines": 1, "mixed_precision": "bf16",
                   "use_cpu": True, "fsdp_config": {"fsdp_version": 2}},
    "data": {"frames_range": [2, 4], "frames_per_gpu": 4, "image_width": 112},
}


def load(overrides=(), base=BASE) -> Recipe:
    return recipe_from_dict(copy.deepcopy(base), overrides)


def test_shipped_recipes_are_found():
    assert {p.name for p in RECIPES} >= {"a100_40g.yaml", "a100_80g.yaml", "cpu_tiny.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_loads_and_round_trips(path):
    recipe = load_recipe(path)
    again = recipe_from_dict(yaml.safe_load(dump_recipe(recipe)))
    assert again == recipe
    assert path.read_text().startswith("# "), "every recipe starts with its comment header"


def test_a100_recipes_are_vggt_1b_with_trainable_aggregator_on_8_gpus():
    for name in ("a100_40g.yaml", "a100_80g.yaml"):
        recipe = load_recipe(REPO / "recipes" / name)
        assert recipe.model.preset == "vggt-1b" and not recipe.model.freeze
        assert (recipe.model.heads.camera, recipe.model.heads.depth, recipe.model.heads.point) == (True, True, True)
        assert recipe.accelerate["num_processes"] == 8 and recipe.accelerate["num_machines"] == 1
        assert recipe.parallel.precision.param_dtype == "bf16" and recipe.parallel.precision.reduce_dtype == "fp32"
        # Both recompute selectively (issue 10); only the 40GB card needs the DPT heads per chunk.
        groups = recipe.parallel.checkpoint.groups
        assert {groups[g].policy for g in ("dino", "frame", "global")} == {"selective"}
        assert recipe.parallel.checkpoint.heads == ("chunks" if name == "a100_40g.yaml" else "none")


def test_defaults_and_types():
    recipe = load(["optim.lr=1e-4", "train.max_steps=7", "data.frames_per_gpu=auto"])
    assert recipe.optim.lr == pytest.approx(1e-4) and isinstance(recipe.optim.lr, float)
    assert recipe.train.max_steps == 7
    assert recipe.data.frames_per_gpu == "auto"
    assert recipe.parallel.checkpoint.policy == "attention"  # a default no file set


def test_int_is_accepted_for_a_float_field():
    assert load(["optim.lr=1"]).optim.lr == 1.0


def test_overrides_reach_nested_dicts_and_lists():
    recipe = load(["parallel.checkpoint.groups.global.policy=block", "parallel.checkpoint.groups.global.n=3",
                   "data.frames_range=[2, 3]", "accelerate.main_process_port=29555"])
    assert recipe.parallel.checkpoint.groups["global"].policy == "block"
    assert recipe.parallel.checkpoint.groups["global"].n == 3
    assert recipe.data.frames_range == [2, 3]
    assert recipe.accelerate["main_process_port"] == 29555


def test_yaml_1_2_scalars():
    # `no` is a string (Accelerate's mixed_precision value), 1e-4 is a float.
    recipe = load(["parallel.precision.param_dtype=fp32", "accelerate.mixed_precision=no", "optim.eps=1e-6"])
    assert recipe.accelerate["mixed_precision"] == "no"
    assert recipe.optim.eps == pytest.approx(1e-6)


def test_tuples_of_fixed_length_check_length_and_each_item_type():
    assert from_data(tuple[int, str], [1, "a"], "x") == (1, "a")
    assert from_data(tuple[int, ...], [1, 2, 3], "x") == (1, 2, 3)
    with pytest.raises(ValueError, match=r"^x: expected 2 items, got 1$"):
        from_data(tuple[int, str], [1], "x")
    with pytest.raises(ValueError, match=r"^x\[1\]: expected str, got int 2$"):
        from_data(tuple[int, str], [1, 2], "x")


def test_model_config_applies_heads_and_overrides():
    recipe = load(["model.overrides={aggregator.depth: 2, dpt_head.intermediate_layer_idx: [0, 1, 1, 1]}"])
    cfg = model_config(recipe.model)
    assert cfg.aggregator.depth == 2 and cfg.enable_track is False and cfg.enable_depth is True


def test_nested_model_override_changes_one_field_and_keeps_the_preset():
    # `model.overrides.aggregator.num_heads=2` builds {"aggregator": {"num_heads": 2}}: one field, not a
    # new aggregator with VGGT-1B's defaults.
    preset = model_config(load().model).aggregator
    cfg = model_config(load(["model.overrides.aggregator.num_heads=2"]).model).aggregator
    assert cfg.num_heads == 2 != preset.num_heads
    assert (cfg.embed_dim, cfg.depth, cfg.img_size) == (preset.embed_dim, preset.depth, preset.img_size)


INVALID = [
    # (kind, overrides, fragments the message must contain)
    ("misspelt key", ["parallel.checkpoint.polcy=block"],
     ["parallel.checkpoint.polcy", "did you mean 'policy'", "valid keys"]),
    ("unknown section", ["trian.max_steps=3"], ["trian", "did you mean 'train'"]),
    ("wrong type", ["train.max_steps=many"], ["train.max_steps", "expected int", "'many'"]),
    ("bool for int", ["train.max_steps=true"], ["train.max_steps", "expected int", "bool"]),
    ("literal choice", ["parallel.checkpoint.policy=atention"],
     ["parallel.checkpoint.policy", "'atention'", "'every_n'", "did you mean 'attention'"]),
    ("int or auto", ["data.frames_per_gpu=auot"], ["data.frames_per_gpu", "int or 'auto'", "did you mean 'auto'"]),
    ("section not a mapping", ["parallel.sharding=full"], ["parallel.sharding", "expected a mapping"]),
    ("list expected", ["parallel.layout.units=camera_head"], ["parallel.layout.units", "expected a list"]),
    ("unknown checkpoint group", ["parallel.checkpoint.groups.frames.policy=block"],
     ["parallel.checkpoint.groups", "'frames'", "dino", "global"]),
    ("every_n with n < 1", ["parallel.checkpoint.policy=every_n", "parallel.checkpoint.n=0"],
     ["parallel.checkpoint.n", ">= 1"]),
    ("hybrid degrees on full sharding", ["parallel.sharding.shard_degree=2"], ["mode: hybrid"]),
    ("hybrid degree not dividing", ["parallel.sharding.mode=hybrid", "parallel.sharding.shard_degree=3"],
     ["shard_degree=3", "world size 2"]),
    ("unknown Accelerate key", ["accelerate.num_procesess=2"],
     ["accelerate.num_procesess", "did you mean 'num_processes'"]),
    ("not FSDP", ["accelerate.distributed_type=MULTI_GPU"], ["accelerate.distributed_type", "'FSDP'"]),
    ("FSDP decided twice", ["accelerate.fsdp_config.fsdp_activation_checkpointing=true"],
     ["accelerate.fsdp_config.fsdp_activation_checkpointing", "parallel:"]),
    ("precision disagreement", ["accelerate.mixed_precision=no"],
     ["accelerate.mixed_precision='no'", "parallel.precision.param_dtype='bf16'"]),
    ("unknown preset", ["model.preset=vggt-2b"], ["'vggt-2b'", "vggt-tiny"]),
    ("unknown model override", ["model.overrides={aggregator.dept: 3}"], ["model.overrides.aggregator.dept", "depth"]),
    ("no head", ["model.heads={camera: false, depth: false, point: false, track: false}"], ["model.heads"]),
    ("bad override syntax", ["train.max_steps"], ["dotted.key=value"]),
    ("loss of a disabled head", ["model.heads.point=false"],
     ["loss.point.enabled is true", "model.heads.point is false", "loss.point.enabled=false"]),
]


@pytest.mark.parametrize("kind,overrides,fragments", INVALID, ids=[row[0] for row in INVALID])
def test_invalid_recipe_message(kind, overrides, fragments):
    with pytest.raises(RecipeError) as info:
        load(overrides)
    for fragment in fragments:
        assert fragment in str(info.value), f"{kind}: {fragment!r} not in {info.value}"


def test_yaml_errors_name_the_file(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  max_steps: 1\n  max_steps: 2\n")
    with pytest.raises(RecipeError, match=r"dup\.yaml.*duplicate key 'max_steps'"):
        load_recipe(dup)
    with pytest.raises(RecipeError, match=r"missing\.yaml' is neither a file nor a bundled recipe"):
        load_recipe(tmp_path / "missing.yaml")


def _cli(capsys, *args: str):
    from vggt_fsdp.cli import main

    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_accelerate_config_is_accepted_by_accelerates_loader(tmp_path, capsys):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    out = tmp_path / "accelerate.yaml"
    code, _, err = _cli(capsys, "accelerate-config", str(REPO / "recipes" / "a100_40g.yaml"),
                        "accelerate.num_machines=2", "accelerate.num_processes=16", "accelerate.machine_rank=1",
                        "--output", str(out))
    assert code == 0, err
    assert err.startswith(f"wrote {out}: an Accelerate config for `accelerate launch --config_file {out} SCRIPT.py`")
    config = load_config_from_file(str(out))
    assert config.distributed_type == DistributedType.FSDP
    assert (config.num_machines, config.num_processes, config.machine_rank) == (2, 16, 1)
    assert config.mixed_precision == "bf16" and config.fsdp_config["fsdp_version"] == 2


def test_accelerate_config_lets_accelerate_shard_a_plain_script_by_block(tmp_path, capsys, monkeypatch):
    """What `accelerate launch --config_file FILE script.py` hands a script's `accelerator.prepare`: the
    launcher's environment for the file, the FSDP2 plugin Accelerate builds from it, and the units its
    wrap policy makes of a model (without a wrap policy it shards the model as one unit)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    from vggt_fsdp.model import build_model
    from vggt_fsdp.model.config import get_preset
    from vggt_fsdp.model.layers import Block

    out = tmp_path / "acc.yaml"
    assert _cli(capsys, "accelerate-config", "a100_80g", "-o", str(out), "parallel.sharding.cpu_offload=true")[0] == 0
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(out), "s.py"]))
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    assert os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG") is None  # nothing that reaches the trainer's mesh
    plugin = FullyShardedDataParallelPlugin()
    from torch.distributed.fsdp import CPUOffloadPolicy

    assert plugin.fsdp_version == 2 and isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    assert plugin.cpu_ram_efficient_loading
    assert plugin.reshard_after_forward is False  # a100_80g keeps parameters unsharded between passes
    model = build_model(get_preset("vggt-tiny"), device="meta")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    units = [m for m in model.modules() if policy(m)]
    assert units and len(units) == sum(isinstance(m, Block) for m in model.modules())


def test_fp32_recipe_keeps_no_as_a_string_in_accelerate_config(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    from vggt_fsdp.parallel.accelerate import accelerate_config_yaml

    out = tmp_path / "accelerate.yaml"
    out.write_text(accelerate_config_yaml(load(["parallel.precision.param_dtype=fp32",
                                                 "accelerate.mixed_precision=no"])))
    assert load_config_from_file(str(out)).mixed_precision == "no"


def test_recipe_show_prints_resolved_recipe_and_plan(capsys):
    code, out, err = _cli(capsys, "recipe", "show", str(REPO / "recipes" / "cpu_tiny.yaml"),
                          "parallel.checkpoint.policy=block", "parallel.checkpoint.groups.dino.policy=none")
    assert code == 0, err
    resolved, _, plan = out.partition("# parallel plan")
    assert yaml.safe_load(resolved)["parallel"]["checkpoint"]["policy"] == "block"
    rows = {line.split()[0]: line.split() for line in plan.splitlines()[2:] if line and not line.startswith("#")}
    assert rows["aggregator.patch_embed.blocks.0"][-1] == "none"
    assert rows["aggregator.frame_blocks.0"][-1] == "block"
    assert rows["depth_head"][4] == "fp32" and rows["<root>"][4] == "bf16"


def test_recipe_show_reports_errors_as_one_line(capsys):
    code, out, err = _cli(capsys, "recipe", "show", str(REPO / "recipes" / "cpu_tiny.yaml"),
                          "parallel.checkpoint.policy=blok")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and "did you mean 'block'" in err


@pytest.mark.parametrize("section, env, expected", [
    ({"num_machines": 1, "main_process_port": 29555}, {}, None),      # the recipe's port is written as is
    ({"num_machines": 2}, {"MASTER_PORT": "29601"}, None),            # machines must agree: never chosen here
    ({"num_machines": 1}, {"MASTER_PORT": "29601"}, 29601),           # the launcher's environment names it
    ({"num_machines": 1}, {}, "free"),                                # else a free port, never the default
])
def test_a_one_machine_launch_rendezvous_on_its_own_port(monkeypatch, section, env, expected):
    from vggt_fsdp.commands.train import rendezvous_port

    monkeypatch.delenv("MASTER_PORT", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    port = rendezvous_port(section)
    if expected == "free":
        assert isinstance(port, int) and port != 29500 and 1024 <= port < 65536
    else:
        assert port == expected

