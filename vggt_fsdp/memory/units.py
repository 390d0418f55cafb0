"""The FSDP units a memory or time model plans with: each unit's parameters (shapes, trainable), compute
and reduce dtypes, resharding and checkpoint label, read from the sharding plan of a meta-device model
(`plan_parallelism`), cached per structure because policy searches plan hundreds of settings."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from vggt_fsdp.model.config import VGGTConfig


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    trainable: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def shard_numel(self, shard: int) -> int:
        """Rank 0's (padded) shard: FSDP2 splits dim 0 in chunks of ceil(d0 / shard)."""
        d0 = self.shape[0] if self.shape else 1
        return math.ceil(d0 / shard) * (self.numel // d0 if d0 else 0)


@dataclass(frozen=True)
class UnitInfo:
    path: str
    kind: str
    group: str | None
    param_bytes: int  # 2 (bf16) or 4 (fp32): compute dtype of the all-gathered parameters
    reduce_bytes: int
    reshard: bool
    checkpoint: str
    params: tuple[ParamInfo, ...]
    casts_inputs: bool = True  # FSDP2 casts the unit's floating inputs to param dtype (parallel/precision.py)

    def unsharded(self) -> int:
        return sum(p.numel for p in self.params) * self.param_bytes

    def all_gather(self, shard: int) -> int:
        """The all-gather output buffer; a 1-rank mesh needs none (FSDP2 skips the collective)."""
        if shard == 1:
            return 0
        return sum(p.shard_numel(shard) for p in self.params) * shard * self.param_bytes

    def grad_unsharded(self) -> int:
        return sum(p.numel for p in self.params if p.trainable) * self.param_bytes

    def reduce_scatter(self, shard: int) -> int:
        """FSDP2's reduce buffers: the input (the unsharded gradients copied in, reduce dtype) and, on a
        1-rank mesh, an output of the same size it is copied to (no collective); otherwise the input."""
        if shard == 1:
            return 2 * sum(p.numel for p in self.params if p.trainable) * self.reduce_bytes
        return sum(p.shard_numel(shard) for p in self.params if p.trainable) * shard * self.reduce_bytes


_DTYPE_BYTES = {"bf16": 2, "fp32": 4}


_META_MODELS: dict[str, object] = {}


def _meta_model(cfg: VGGTConfig):
    """A meta-device VGGT (shapes only, no memory), cached per config: the fitters plan many times."""
    from vggt_fsdp.model.vggt import build_model

    key = repr(cfg)
    if key not in _META_MODELS:
        _META_MODELS[key] = build_model(cfg, device="meta")
    return _META_MODELS[key]


_LAYOUTS: dict[str, list] = {}


_STRUCTURES: dict[str, list] = {}


def unit_layout(model_cfg: VGGTConfig, parallel_cfg, freeze: tuple[str, ...] = ()) -> list[UnitInfo]:
    """The FSDP units of the sharding plan (`plan_parallelism` on a meta-device model) with the shapes of
    the parameters each owns (the innermost unit whose path contains the parameter's name).

    Layouts that differ only in checkpointing share their units (computed once per structure, with the
    first checkpoint setting seen) and differ in their labels (`_relabel`): policy searches plan
    hundreds of checkpoint settings."""
    key = repr((model_cfg, parallel_cfg, freeze))
    if key not in _LAYOUTS:
        structure = structure_key(model_cfg, parallel_cfg, freeze)
        if structure not in _STRUCTURES:
            _STRUCTURES[structure] = _LAYOUTS[key] = _unit_layout(model_cfg, parallel_cfg, freeze)
        else:
            _LAYOUTS[key] = _relabel(_STRUCTURES[structure], _chunkable(model_cfg), parallel_cfg)
    return _LAYOUTS[key]


def structure_key(model_cfg: VGGTConfig, parallel_cfg, freeze: tuple[str, ...]) -> str:
    """What a layout depends on but its checkpoint labels: everything but `parallel.checkpoint`."""
    return repr((model_cfg, dataclasses.replace(parallel_cfg, checkpoint=None), tuple(freeze)))


_CHUNKABLE: dict[str, tuple[str, ...]] = {}


def _chunkable(model_cfg: VGGTConfig) -> tuple[str, ...]:
    """Paths of the modules that can recompute per chunk (`checkpoint_chunks`), per model config."""
    key = repr(model_cfg)
    if key not in _CHUNKABLE:
        _CHUNKABLE[key] = tuple(path for path, module in _meta_model(model_cfg).named_modules()
                                if hasattr(module, "checkpoint_chunks"))
    return _CHUNKABLE[key]


def _relabel(structure: list[UnitInfo], chunkable: tuple[str, ...], parallel_cfg) -> list[UnitInfo]:
    """`structure`'s units labelled with `parallel_cfg`'s checkpointing as `plan_parallelism` labels them
    (tests/test_plan_cli.py checks that they agree): blocks by `block_policies` in model order; a head
    unit "chunks" when checkpoint.heads is chunks and it holds a module with `checkpoint_chunks`."""
    from vggt_fsdp.parallel.checkpointing import block_policies

    checkpoint = parallel_cfg.checkpoint
    blocks = [u for u in structure if u.kind == "block"]
    labels = iter(p.label for p in block_policies([u.group for u in blocks], checkpoint))

    def label(u: UnitInfo) -> str:
        if u.kind == "block":
            return next(labels)
        chunked = u.kind == "module" and checkpoint.heads == "chunks"
        return "chunks" if chunked and any(c == u.path or c.startswith(u.path + ".") for c in chunkable) else "none"

    return [dataclasses.replace(u, checkpoint=label(u)) for u in structure]


def _unit_layout(model_cfg: VGGTConfig, parallel_cfg, freeze: tuple[str, ...]) -> list[UnitInfo]:
    return unit_layout_of(_meta_model(model_cfg), parallel_cfg, freeze)


def unit_layout_of(model: nn.Module, parallel_cfg, freeze: tuple[str, ...] = ()) -> list[UnitInfo]:
    """The FSDP units of `model` (any device, meta included) under `parallel_cfg`, each with the shapes of
    the parameters it owns (the innermost unit whose path contains the parameter's name) and whether it
    casts its inputs."""
    from vggt_fsdp.parallel.precision import casts_inputs
    from vggt_fsdp.parallel.sharding import plan_parallelism

    plan = plan_parallelism(model, parallel_cfg)
    paths = sorted((u.path for u in plan.units if u.path), key=lambda p: -p.count("."))
    owned: dict[str, list[ParamInfo]] = {u.path: [] for u in plan.units}
    for name, param in model.named_parameters():
        trainable = param.requires_grad and not any(fnmatchcase(name, pat) for pat in freeze)
        owner = next((p for p in paths if name.startswith(p + ".")), "")
        owned[owner].append(ParamInfo(name, tuple(param.shape), trainable))
    return [
        UnitInfo(u.path, u.kind, u.group, _DTYPE_BYTES[u.param_dtype], _DTYPE_BYTES[u.reduce_dtype],
                 u.reshard_after_forward, u.checkpoint, tuple(owned[u.path]),
                 casts_inputs(model.get_submodule(u.path), u.param_dtype, parallel_cfg.precision))
        for u in plan.units
    ]


def shard_size(parallel_cfg, world_size: int, gpus_per_node: int) -> int:
    """Ranks a parameter is sharded over: all of them (full), or one node's (hybrid, shard_degree auto)."""
    sharding = parallel_cfg.sharding
    if sharding.mode == "full":
        return world_size
    if sharding.shard_degree != "auto":
        return int(sharding.shard_degree)
    if sharding.replicate_degree != "auto":
        return world_size // int(sharding.replicate_degree)
    return min(world_size, gpus_per_node)
