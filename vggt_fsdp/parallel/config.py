"""The `parallel:` section of a recipe: how the model is sharded, in which precision, and what is recomputed.

Plain typed dataclasses with defaults; `vggt_fsdp.recipe` loads and validates them from YAML. Everything
model-specific (which classes are transformer blocks, which sub-modules are heads, how blocks group) lives
in `LayoutConfig`, so a recipe can be pointed at another project's model by editing that part only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

CheckpointPolicy = Literal["none", "attention", "selective", "block", "every_n"]
# What a block under the selective policy keeps for backward (parallel/checkpointing.py says which ops).
SavedTensors = Literal["sdpa", "qkv"]
SAVE_ORDER: tuple[str, ...] = ("sdpa", "qkv")
HeadCheckpoint = Literal["none", "chunks"]
ShardingMode = Literal["full", "hybrid"]
ParamDtype = Literal["bf16", "fp32"]
ReduceDtype = Literal["fp32", "bf16"]


def _vggt_groups() -> dict[str, str]:
    # Module-path patterns (fnmatch) of the VGGT block groups, as upstream names the modules.
    return {
        "dino": "aggregator.patch_embed.blocks.*",
        "frame": "aggregator.frame_blocks.*",
        "global": "aggregator.global_blocks.*",
        "camera_trunk": "camera_head.trunk.*",
    }


@dataclass
class LayoutConfig:
    """Where the transformer blocks, their attention and the heads are in the model.

    Class names are fully qualified (`package.module.Class`) or bare (`Class`); they are compared with
    each module's type by name, so nothing is imported. Paths are fnmatch patterns over dotted module
    names (`aggregator.frame_blocks.*`).
    """

    block_types: list[str] = field(default_factory=lambda: ["vggt_fsdp.model.layers.Block"])
    block_paths: list[str] = field(default_factory=list)  # extra blocks found by path, not by type
    attention_types: list[str] = field(default_factory=lambda: ["vggt_fsdp.model.layers.Attention"])
    # Each matching module becomes one FSDP unit after the blocks inside it (VGGT: one unit per head).
    # A pattern may match nothing: a disabled head has no module.
    units: list[str] = field(
        default_factory=lambda: ["camera_head", "depth_head", "point_head", "track_head"]
    )
    # Named groups of blocks, for per-group checkpoint policies. A block in no group uses the default.
    groups: dict[str, str] = field(default_factory=_vggt_groups)


@dataclass
class ShardingConfig:
    # full: shard every unit over all ranks. hybrid: shard inside a node, replicate across nodes (HSDP).
    mode: ShardingMode = "full"
    # Free the unsharded parameters after forward (gathered again in backward): less memory, one more
    # all-gather per unit. The root unit is never resharded after forward: backward needs it at once.
    reshard_after_forward: bool = True
    # Keep sharded parameters, gradients and optimiser state in host memory (FSDP2 CPUOffloadPolicy).
    cpu_offload: bool = False
    # Hybrid mesh (replicate x shard); "auto": shard over the ranks of one node, replicate over nodes.
    replicate_degree: Union[int, Literal["auto"]] = "auto"
    shard_degree: Union[int, Literal["auto"]] = "auto"

    def validate(self) -> None:
        for name in ("replicate_degree", "shard_degree"):
            value = getattr(self, name)
            if value != "auto" and value < 1:
                raise ValueError(f"parallel.sharding.{name} must be >= 1 or 'auto', got {value}")
        if self.mode == "full" and (self.replicate_degree != "auto" or self.shard_degree != "auto"):
            raise ValueError(
                "parallel.sharding.replicate_degree/shard_degree apply only to mode: hybrid; "
                f"got mode: full with replicate_degree={self.replicate_degree!r}, "
                f"shard_degree={self.shard_degree!r}"
            )


@dataclass
class PrecisionConfig:
    # Compute dtype of the parameters FSDP2 all-gathers; the sharded master copy stays fp32.
    param_dtype: ParamDtype = "bf16"
    # Dtype of the gradient reduce-scatter; fp32 keeps the sum of many ranks' gradients exact enough.
    reduce_dtype: ReduceDtype = "fp32"
    # Units (patterns over unit paths) computed in fp32 whatever param_dtype says, with fp32 inputs, in
    # every mode. Upstream runs the camera, depth and point heads in fp32; blocks inside are fp32 too.
    fp32_modules: list[str] = field(default_factory=lambda: ["camera_head", "depth_head", "point_head"])
    # bf16 compute: run the forward under bf16 autocast (upstream's way: fp32 norms and softmax, casts
    # at every matmul), or not (torchtitan's way: every unit computes in its parameters' dtype, norms
    # keep fp32 statistics inside the kernel). Ignored with param_dtype fp32. See parallel/precision.py.
    # Default true, upstream's numerics: on the CPU both modes train alike (loss curves under CUDA's
    # autocast rules, benchmarks/results/2026-11-29-cpu-precision.md) and without autocast a block saves
    # less on CUDA (memory/formulas.py); the speed, the reason to switch, is a GPU measurement still owed.
    autocast: bool = True


@dataclass
class GroupCheckpoint:
    policy: CheckpointPolicy = "attention"
    n: Union[int, None] = None  # for every_n; None: the section's n
    save: Union[list[SavedTensors], None] = None  # for selective; None: the section's save


@dataclass
class CheckpointConfig:
    # none | attention (the attention sub-module of each block) | selective (whole blocks, keeping the
    # tensors named in `save`) | block (whole blocks) | every_n (whole blocks, every n-th of each group,
    # starting with the first).
    policy: CheckpointPolicy = "attention"
    n: int = 2
    # selective: what each block keeps instead of recomputing it. sdpa: the attention output and its
    # logsumexp (no attention forward in backward); qkv: the qkv projection's output (no qkv matmul).
    save: list[SavedTensors] = field(default_factory=lambda: ["sdpa"])
    # Per-group overrides; keys are group names from parallel.layout.groups.
    groups: dict[str, GroupCheckpoint] = field(default_factory=dict)
    # Heads with a `checkpoint_chunks` attribute (VGGT's DPT heads): "chunks" recomputes each chunk of
    # frames in backward instead of keeping its full-resolution activations.
    heads: HeadCheckpoint = "none"

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError(f"parallel.checkpoint.n must be >= 1, got {self.n}")
        _check_save(self.save, "parallel.checkpoint.save")
        for name, group in self.groups.items():
            if group.n is not None and group.n < 1:
                raise ValueError(f"parallel.checkpoint.groups.{name}.n must be >= 1, got {group.n}")
            if group.save is not None:
                _check_save(group.save, f"parallel.checkpoint.groups.{name}.save")
                if group.policy != "selective":
                    raise ValueError(f"parallel.checkpoint.groups.{name}.save applies to policy selective, "
                                     f"but the group's policy is {group.policy!r}; remove save or set "
                                     f"parallel.checkpoint.groups.{name}.policy=selective")


def _check_save(save: list[str], key: str) -> None:
    if not save:
        raise ValueError(f"{key} is empty: a selective block must keep something (choose from "
                         f"{list(SAVE_ORDER)}), or use policy block to keep only the block input")
    if len(set(save)) != len(save):
        raise ValueError(f"{key} names a tensor twice: {save}")


def policy_label(policy: str, save: tuple[str, ...] | list[str] = ()) -> str:
    """The name of a block's checkpoint policy in plans and tables: `none`, `attention`, `block`, or
    `selective(sdpa)`, `selective(sdpa+qkv)`: the saved tensors in SAVE_ORDER, joined by `+`."""
    if policy != "selective":
        return policy
    return f"selective({'+'.join(name for name in SAVE_ORDER if name in save)})"


def parse_policy_label(label: str) -> tuple[str, tuple[str, ...]]:
    """(policy, saved tensors) of a `policy_label`; raises on anything else."""
    if label in ("none", "attention", "block"):
        return label, ()
    if label.startswith("selective(") and label.endswith(")"):
        save = tuple(label[len("selective("):-1].split("+"))
        if save and all(name in SAVE_ORDER for name in save) and policy_label("selective", save) == label:
            return "selective", save
    raise ValueError(f"block checkpoint policy {label!r}; valid: none, attention, block, "
                     f"selective(S) with S a '+'-joined subset of {list(SAVE_ORDER)} in that order")


@dataclass
class ParallelConfig:
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # torch.compile each transformer block unit, its checkpoint wrapper inside (parallel/compiling.py),
    # with dynamic block inputs: a bounded number of graphs whatever shapes the sampler draws. Off by
    # default: on an H200 (torch 2.11) compiling inside the wrappers made the 40GB recipe's 24-frame step
    # 1.21x faster but failed with an inductor stride assertion at 48 frames (pytorch#166926,
    # benchmarks/results/2026-11-27-nvidia-h200-followup.md); the layout that fixes it (reproduced and
    # fixed on the CPU, tests/test_compile.py) has not yet been run on a GPU.
    compile: bool = False
    # Context parallelism: groups of N consecutive ranks share each scene, each rank holding S/N of its
    # frames; global attention exchanges tokens over the group (parallel/context.py). N must divide the
    # process count and the aggregator's heads; scenes then have a multiple of N frames.
    context_parallel: int = 1

    def validate(self) -> None:
        if not isinstance(self.context_parallel, int) or self.context_parallel < 1:
            raise ValueError(f"parallel.context_parallel={self.context_parallel!r} must be an int >= 1 "
                             "(1: every rank holds whole scenes)")
        self.sharding.validate()
        self.checkpoint.validate()
        unknown = sorted(set(self.checkpoint.groups) - set(self.layout.groups))
        if unknown:
            raise ValueError(
                f"parallel.checkpoint.groups has unknown group(s) {unknown}; "
                f"groups defined in parallel.layout.groups: {sorted(self.layout.groups)}"
            )
        if not self.layout.block_types and not self.layout.block_paths:
            raise ValueError("parallel.layout.block_types and block_paths are both empty: no block would "
                             "become an FSDP unit")
