"""The one bridge between a recipe and Hugging Face Accelerate.

The trainer creates its `Accelerator` here and shards the model here:

    accelerator = build_accelerator(recipe)
    plan = prepare_model(accelerator, model, recipe.parallel)     # checkpoint wrappers + fully_shard
    optimizer = AdamW(model.parameters(), ...)                      # over the sharded (DTensor) params
    model, optimizer = prepare_optimizer(accelerator, model, optimizer)

Accelerate then treats the model as FSDP2 (`accelerator.is_fsdp2`): its prepare leaves an already
sharded model alone, and save/load_state, clip_grad_norm_ and no_sync/accumulate take the FSDP path.
Sharding, precision and checkpointing come from the recipe's `parallel:` section only; the Accelerate
FSDP plugin is built from it with Accelerate's own wrapping and checkpointing switched off, so nothing
is decided twice.

The bridge (`_enable_fsdp`): Accelerate 1.15 switches a process to FSDP only inside the MULTI_GPU /
MULTI_XPU / ... branch of `AcceleratorState.__init__`. CPU processes stay MULTI_CPU (prepare would wrap
the model in DDP), and a single process started without a launcher stays NO, on a GPU too. FSDP2 itself
runs on the CPU over gloo and on one rank, so after construction we make the assignment that branch makes
(plus a 1-rank process group for a lone process). That is the only difference between the CPU and the
GPU path.

This module reads a recipe only through `LaunchSpec` (its `accelerate:` and `parallel:` sections) and
imports nothing from `vggt_fsdp.recipe`: the recipe module calls `check_accelerate_section` while
loading, so the dependency runs one way, recipe -> parallel.
"""
from __future__ import annotations

import copy
import difflib
import sys
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from vggt_fsdp.parallel.config import ParallelConfig
from vggt_fsdp.parallel.precision import accelerate_mixed_precision
from vggt_fsdp.parallel.sharding import ParallelPlan, apply_parallelism, build_mesh, ensure_process_group, mesh_shape

if TYPE_CHECKING:
    from accelerate import Accelerator

# fsdp_config keys a recipe may set: everything else about FSDP is decided by `parallel:`.
ALLOWED_FSDP_CONFIG = {"fsdp_version": 2}


class LaunchSpec(Protocol):
    """What the bridge reads of a recipe: `vggt_fsdp.recipe.Recipe` is one, and so is any object with
    these two attributes (a user's own config)."""

    accelerate: dict[str, Any]  # the Accelerate config, as `accelerate launch --config_file` reads it
    parallel: ParallelConfig


# --------------------------------------------------------------------------------------- the recipe section
def check_accelerate_section(section: dict[str, Any], parallel: ParallelConfig) -> None:
    """Reject an `accelerate:` section that Accelerate's config loader would refuse, or that disagrees
    with `parallel:`. Messages name the dotted key."""
    data = _loaded_by_accelerate(section)
    if data["distributed_type"] != "FSDP":
        raise ValueError(f"accelerate.distributed_type={data['distributed_type']!r}: recipes shard with FSDP2; "
                         "set it to 'FSDP' (the CPU path runs FSDP2 over gloo too)")
    for key, value in (data.get("fsdp_config") or {}).items():
        if key not in ALLOWED_FSDP_CONFIG:
            raise ValueError(f"accelerate.fsdp_config.{key}: sharding, precision and checkpointing are set in "
                             "parallel:, not here; allowed keys: fsdp_version")
        if value != ALLOWED_FSDP_CONFIG[key]:
            raise ValueError(f"accelerate.fsdp_config.{key}={value!r}: must be {ALLOWED_FSDP_CONFIG[key]!r}")
    expected = accelerate_mixed_precision(parallel.precision)
    if data.get("mixed_precision") != expected:
        raise ValueError(f"accelerate.mixed_precision={data.get('mixed_precision')!r} disagrees with "
                         f"parallel.precision.param_dtype={parallel.precision.param_dtype!r} with "
                         f"parallel.precision.autocast={parallel.precision.autocast}; set it to {expected!r}")
    _check_topology(data, parallel)


def _loaded_by_accelerate(section: dict[str, Any]) -> dict[str, Any]:
    """The section as Accelerate's config loader reads a file (its defaults filled in), or a ValueError
    where the loader would refuse it."""
    from accelerate.commands.config.config_args import ClusterConfig

    if "distributed_type" not in section:
        raise ValueError("accelerate.distributed_type is required (FSDP)")
    data = ClusterConfig.process_config(copy.deepcopy(section))
    valid = sorted(ClusterConfig.__dataclass_fields__)
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"accelerate.{key}: unknown Accelerate config key{hint}; valid keys: {', '.join(valid)}")
    if data["compute_environment"] != "LOCAL_MACHINE":
        raise ValueError(f"accelerate.compute_environment={data['compute_environment']!r}: only "
                         "'LOCAL_MACHINE' is supported")
    try:
        ClusterConfig(**data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"accelerate: Accelerate rejects this section: {err}") from None
    return data


def _check_topology(data: dict[str, Any], parallel: ParallelConfig) -> None:
    processes, machines = data.get("num_processes", -1), data.get("num_machines", 1)
    if not isinstance(processes, int) or processes < 1:
        raise ValueError(f"accelerate.num_processes={processes!r} must be a positive int (all processes of "
                         "all machines)")
    if not isinstance(machines, int) or machines < 1 or processes % machines:
        raise ValueError(f"accelerate.num_processes={processes} must be a multiple of "
                         f"accelerate.num_machines={machines}")
    if parallel.sharding.mode == "hybrid":
        try:
            mesh_shape(parallel.sharding, processes, processes // machines)
        except ValueError as err:
            raise ValueError(f"parallel.sharding: {err} (accelerate.num_processes={processes}, "
                             f"num_machines={machines})") from None


def accelerate_config_yaml(spec: LaunchSpec, main_process_port: int | None = None) -> str:
    """The recipe's `accelerate:` section as the text of an Accelerate config file (for
    `accelerate launch --config_file`), with `main_process_port` set where given; strings such as 'no'
    stay quoted so YAML reads them back."""
    import yaml

    section = dict(spec.accelerate)
    if main_process_port is not None:
        section["main_process_port"] = main_process_port
    return yaml.safe_dump(section, sort_keys=False)


def topology_notice(section: dict[str, Any], world: int) -> str | None:
    """A line for the user when the launcher started another number of processes than the recipe's
    `accelerate.num_processes` (torchrun, a hand-written launch): the run uses the launcher's."""
    asked = section.get("num_processes")
    if asked is not None and asked != world:
        return (f"launched with {world} process(es) but the recipe's accelerate.num_processes is {asked}: "
                f"running with {world}; `vggt-fsdp train RECIPE`, or `accelerate launch --config_file` with "
                "the file `vggt-fsdp accelerate-config RECIPE` writes, starts what the recipe asks for")
    return None


# --------------------------------------------------------------------------------------- the Accelerator
def fsdp_plugin(parallel: ParallelConfig):
    """An FSDP2 plugin that tells Accelerate the model is FSDP, but leaves wrapping, mixed precision and
    checkpointing to `apply_parallelism` (NO_WRAP, no activation checkpointing)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from vggt_fsdp.parallel.precision import DTYPES

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=parallel.sharding.reshard_after_forward,
        cpu_offload=parallel.sharding.cpu_offload,
        auto_wrap_policy="NO_WRAP",
        activation_checkpointing=False,
        state_dict_type="SHARDED_STATE_DICT",
        cpu_ram_efficient_loading=False,
        mixed_precision_policy=MixedPrecisionPolicy(
            param_dtype=DTYPES[parallel.precision.param_dtype],
            reduce_dtype=DTYPES[parallel.precision.reduce_dtype],
        ),
    )


def build_accelerator(spec: LaunchSpec, **kwargs: Any) -> Accelerator:
    """The Accelerator for a recipe: FSDP2 on GPUs and (bridged) on CPU processes; `kwargs` go to
    `Accelerator` (e.g. gradient_accumulation_steps, log_with, project_dir). Rank 0 prints the
    `topology_notice` on stderr when the launcher's process count differs from the recipe's."""
    from accelerate import Accelerator

    use_cpu = bool(spec.accelerate.get("use_cpu", False))
    if not use_cpu and not torch.cuda.is_available():
        raise RuntimeError("the recipe's accelerate.use_cpu is false but this machine has no CUDA device; "
                           "use a CPU recipe or override accelerate.use_cpu=true")
    plugin = fsdp_plugin(spec.parallel)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=spec.accelerate.get("mixed_precision", "no"),
        fsdp_plugin=plugin,
        **kwargs,
    )
    _enable_fsdp(accelerator, plugin)
    notice = topology_notice(spec.accelerate, accelerator.num_processes)
    if notice and accelerator.is_main_process:
        print(f"[vggt-fsdp] {notice}", file=sys.stderr, flush=True)
    return accelerator


def _enable_fsdp(accelerator: Accelerator, plugin) -> None:
    """Make a CPU process, or a lone process, FSDP as Accelerate makes a launched GPU process (see the
    module docstring)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state = AcceleratorState()
    if state.distributed_type == DistributedType.FSDP:
        return
    lone = state.distributed_type == DistributedType.NO and accelerator.num_processes == 1
    if not lone and not (state.distributed_type == DistributedType.MULTI_CPU and accelerator.device.type == "cpu"):
        raise RuntimeError(f"Accelerate chose {state.distributed_type} on {accelerator.device}; expected FSDP "
                           "(launch with the recipe's accelerate config)")
    if lone:
        ensure_process_group(accelerator.device.type)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def prepare_model(accelerator: Accelerator, model: nn.Module, parallel: ParallelConfig) -> ParallelPlan:
    """Shard `model` in place on the accelerator's device as `parallel` says; returns the applied plan.
    Create the optimizer afterwards, then call `prepare_optimizer`."""
    if not accelerator.is_fsdp2:
        raise RuntimeError("prepare_model needs an Accelerator from build_accelerator (FSDP2)")
    mesh = build_mesh(parallel.sharding, accelerator.device.type)
    return apply_parallelism(model, parallel, mesh)


def prepare_optimizer(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer):
    """`accelerator.prepare(model, optimizer)` for a model that `prepare_model` already sharded.

    Accelerate 1.15 re-maps the optimizer's parameters to the sharded ones by the `data_ptr()` of their
    local shards. A parameter whose shard on this rank is empty (dim 0 smaller than the world size,
    e.g. VGGT's (1, 2, 1, C) camera token on rank 1) has data_ptr 0, several of them collide, and the
    optimizer ends up holding the wrong tensors. The model is already sharded, so the correct mapping
    is the identity: the original parameter lists are put back.
    """
    params = [list(group["params"]) for group in optimizer.param_groups]
    model, prepared = accelerator.prepare(model, optimizer)
    inner = prepared
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    for group, original in zip(inner.param_groups, params):
        group["params"] = original
    return model, prepared
