"""FSDP2 sharding: the plan (which modules become units, in which precision, what is recomputed) and
its application. The plan is data computed from the module tree alone, so `vggt-fsdp recipe show` and
the memory planner read the same plan that `apply_parallelism` applies, on a meta-device model and
without a process group.

Units, in the order `fully_shard` is applied (inner before outer, as FSDP2 requires):
1. every transformer block (found by type name or path, `parallel.layout`),
2. every module named by `layout.units` (VGGT: one per head; a head's trunk blocks are already units),
3. the root, which owns what is left (patch embedding, special tokens, norms).
"""
from __future__ import annotations

import os
from fnmatch import fnmatchcase

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

from vggt_fsdp.parallel.checkpointing import apply_checkpointing, block_policies
from vggt_fsdp.parallel.compiling import compile_blocks
from vggt_fsdp.parallel.config import ParallelConfig, ShardingConfig
from vggt_fsdp.parallel.plan import ParallelPlan, UnitPlan
from vggt_fsdp.parallel.precision import apply_forward_precision, mp_policy, unit_dtypes


# --------------------------------------------------------------------------------------- planning
def type_matches(module: nn.Module, names: list[str]) -> bool:
    """Match a module's class against fully qualified (`pkg.mod.Class`) or bare (`Class`) names."""
    cls = type(module)
    qualified = f"{cls.__module__}.{cls.__qualname__}"
    return any(name == qualified if "." in name else name == cls.__name__ for name in names)


def find_blocks(model: nn.Module, cfg: ParallelConfig) -> list[str]:
    layout = cfg.layout
    blocks = [
        path for path, module in model.named_modules()
        if path and (type_matches(module, layout.block_types)
                     or any(fnmatchcase(path, pattern) for pattern in layout.block_paths))
    ]
    for outer in blocks:
        nested = [path for path in blocks if path.startswith(outer + ".")]
        if nested:
            raise ValueError(f"block {nested[0]} is nested inside block {outer}; parallel.layout must name "
                             "only the outermost transformer block type")
    if not blocks:
        raise ValueError(
            f"no module of the model matches parallel.layout.block_types={layout.block_types} or "
            f"block_paths={layout.block_paths}; name the model's transformer block class")
    return blocks


def plan_parallelism(model: nn.Module, cfg: ParallelConfig) -> ParallelPlan:
    """The plan for `model` under `cfg`; reads only the module tree (works on the meta device)."""
    blocks = find_blocks(model, cfg)
    groups = [_group_of(path, cfg.layout.groups) for path in blocks]
    modules = _module_units(model, cfg, blocks)
    owners = _param_owners(model, blocks + modules)

    wrapped: list[str] = []
    selective: dict[str, tuple[str, ...]] = {}
    units: list[UnitPlan] = []
    reshard = cfg.sharding.reshard_after_forward
    for path, policy in zip(blocks, block_policies(groups, cfg.checkpoint)):
        if policy.policy == "attention":
            wrapped += _attention_paths(model, path, cfg.layout.attention_types)
        elif policy.policy in ("block", "selective"):
            wrapped.append(path)
            if policy.policy == "selective":
                selective[path] = policy.save
        units.append(_unit(path, "block", policy.group, cfg, reshard, policy.label, owners))

    chunked = _chunk_paths(model) if cfg.checkpoint.heads == "chunks" else []
    if cfg.checkpoint.heads == "chunks" and not chunked:
        raise ValueError("parallel.checkpoint.heads is 'chunks' but no module of the model has a "
                         "`checkpoint_chunks` attribute (VGGT: the DPT heads)")
    for path in modules:
        recompute = "chunks" if any(c == path or c.startswith(path + ".") for c in chunked) else "none"
        units.append(_unit(path, "module", None, cfg, reshard, recompute, owners))
    # The root is not resharded after forward: backward starts with it, so it would be gathered again at once.
    units.append(_unit("", "root", None, cfg, False, "none", owners))
    return ParallelPlan(units=units, checkpoint_wrapped=wrapped, chunk_checkpointed=chunked, selective=selective)


def _module_units(model: nn.Module, cfg: ParallelConfig, blocks: list[str]) -> list[str]:
    """Modules named by layout.units, inner before outer (FSDP2 shards nested units bottom-up)."""
    found = [path for path, _ in model.named_modules()
             if path and path not in blocks and any(fnmatchcase(path, p) for p in cfg.layout.units)]
    for path in found:
        block = next((b for b in blocks if path.startswith(b + ".")), None)
        if block is not None:
            raise ValueError(f"parallel.layout.units names {path}, inside block {block}: blocks are the "
                             "smallest units; narrow the pattern")
    return sorted(found, key=lambda path: -path.count("."))  # stable: model order within a depth


def _group_of(path: str, groups: dict[str, str]) -> str | None:
    return next((name for name, pattern in groups.items() if fnmatchcase(path, pattern)), None)


def _attention_paths(model: nn.Module, block: str, attention_types: list[str]) -> list[str]:
    found = [f"{block}.{sub}" for sub, module in model.get_submodule(block).named_modules()
             if sub and type_matches(module, attention_types)]
    if not found:
        raise ValueError(f"checkpoint policy 'attention' for block {block}, but it has no sub-module of "
                         f"parallel.layout.attention_types={attention_types}")
    return found


def _chunk_paths(model: nn.Module) -> list[str]:
    return [path for path, module in model.named_modules() if hasattr(module, "checkpoint_chunks")]


def _param_owners(model: nn.Module, unit_paths: list[str]) -> dict[str, int]:
    """Parameters owned by each unit: the innermost unit whose path contains the parameter ("" = root)."""
    counts = {path: 0 for path in unit_paths}
    counts[""] = 0
    by_depth = sorted(unit_paths, key=lambda p: -p.count("."))
    for name, param in model.named_parameters():
        owner = next((p for p in by_depth if name.startswith(p + ".")), "")
        counts[owner] += param.numel()
    return counts


def _unit(path, kind, group, cfg, reshard, checkpoint, owners) -> UnitPlan:
    param_dtype, reduce_dtype = unit_dtypes(path, cfg.precision)
    return UnitPlan(path=path, kind=kind, group=group, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                    reshard_after_forward=reshard, checkpoint=checkpoint, num_params=owners[path])


# --------------------------------------------------------------------------------------- applying
def apply_parallelism(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh | None = None) -> ParallelPlan:
    """Checkpoint-wrap, then shard `model` in place as `cfg` says; returns the plan it applied.

    `mesh`: the 1-D (full) or 2-D (replicate, shard) device mesh; None builds it from the default
    process group (`build_mesh`). Precision (input casts, autocast) as parallel/precision.py describes.
    The model may be on the meta device (materialise it afterwards with `model.to_empty(...)`), on the
    CPU, or on the mesh's device.
    """
    plan = plan_parallelism(model, cfg)
    apply_checkpointing(model, plan.checkpoint_wrapped, plan.chunk_checkpointed, plan.selective)
    if cfg.compile:
        compile_blocks(model, [unit.path for unit in plan.units if unit.kind == "block"])
    mesh = mesh if mesh is not None else build_mesh(cfg.sharding, default_device_type())
    offload = ({"offload_policy": CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda")}
               if cfg.sharding.cpu_offload else {})
    for unit in plan.units:
        module = model.get_submodule(unit.path) if unit.path else model
        fully_shard(module, mesh=mesh, reshard_after_forward=unit.reshard_after_forward,
                    mp_policy=mp_policy(module, unit, cfg.precision), **offload)
    apply_forward_precision(model, plan, cfg.precision, mesh.device_type)
    return plan


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------- the mesh
def mesh_shape(cfg: ShardingConfig, world_size: int, local_world_size: int | None) -> tuple[int, ...]:
    """(world,) for full sharding; (replicate, shard) for hybrid, "auto" sharding inside a node."""
    if cfg.mode == "full":
        return (world_size,)
    shard = cfg.shard_degree
    replicate = cfg.replicate_degree
    if shard == "auto":
        if replicate != "auto":
            if world_size % replicate:
                raise ValueError(f"hybrid replicate_degree={replicate} does not divide the world size {world_size}")
            shard = world_size // replicate
        elif local_world_size is None:
            raise ValueError("parallel.sharding.mode=hybrid with shard_degree=auto needs LOCAL_WORLD_SIZE "
                             "(set by accelerate launch / torchrun) or an explicit shard_degree")
        else:
            shard = local_world_size
    if world_size % shard:
        raise ValueError(f"hybrid shard_degree={shard} does not divide the world size {world_size}")
    if replicate == "auto":
        replicate = world_size // shard
    if replicate * shard != world_size:
        raise ValueError(f"hybrid mesh replicate_degree={replicate} x shard_degree={shard} != world size "
                         f"{world_size}")
    return (replicate, shard)


def ensure_process_group(device_type: str) -> None:
    """FSDP2 needs a process group; a single process started without a launcher gets a 1-rank one."""
    if dist.is_initialized():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise RuntimeError("WORLD_SIZE > 1 but no process group is initialised; create the Accelerator "
                           "(vggt_fsdp.parallel.build_accelerator) before sharding")
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def build_mesh(cfg: ShardingConfig, device_type: str) -> DeviceMesh:
    """The device mesh over the default process group (a 1-rank gloo group is created for a single
    process, so the CPU path shards with the same code as a multi-process run)."""
    ensure_process_group(device_type)
    local = os.environ.get("LOCAL_WORLD_SIZE")
    shape = mesh_shape(cfg, dist.get_world_size(), int(local) if local else None)
    names = ("shard",) if len(shape) == 1 else ("replicate", "shard")
    return init_device_mesh(device_type, shape, mesh_dim_names=names)
