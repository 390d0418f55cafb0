"""The parallel plan as data: which modules become FSDP units, in which precision, and what is recomputed.

`sharding.plan_parallelism` computes it from the module tree; `sharding.apply_parallelism` and
`precision.py` apply it; `vggt-fsdp recipe show` and the memory planner read it. Kept apart from both so
that neither imports the other for its types.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class UnitPlan:
    path: str  # dotted module path; "" is the root
    kind: str  # block | module | root
    group: str | None  # block group (parallel.layout.groups) or None
    param_dtype: str  # bf16 | fp32: compute dtype of the all-gathered parameters
    reduce_dtype: str  # bf16 | fp32: gradient reduce-scatter dtype
    reshard_after_forward: bool
    checkpoint: str  # none | attention | selective(...) | block | chunks: what of this unit is recomputed
    num_params: int  # parameters this unit owns (not those of units nested in it)


@dataclass
class ParallelPlan:
    units: list[UnitPlan]
    checkpoint_wrapped: list[str] = field(default_factory=list)  # modules given a checkpoint wrapper
    chunk_checkpointed: list[str] = field(default_factory=list)  # modules whose checkpoint_chunks is set
    selective: dict[str, tuple[str, ...]] = field(default_factory=dict)  # wrapped block -> tensors it saves

    def table(self) -> str:
        header = ("unit", "kind", "group", "params", "param", "reduce", "reshard", "checkpoint")
        rows = [header] + [
            (u.path or "<root>", u.kind, u.group or "-", f"{u.num_params:,}", u.param_dtype, u.reduce_dtype,
             "yes" if u.reshard_after_forward else "no", u.checkpoint)
            for u in self.units
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
