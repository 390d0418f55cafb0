"""A model, not a measurement, of FSDP2's communication per training step and the scaling it predicts.

The benchmarks measure one GPU's share of an N-GPU run over a fake process group, whose collectives
cost nothing; this module adds what they would cost. Per step, each FSDP unit all-gathers its
parameters in the compute dtype before forward (and again before backward when it is resharded after
forward), and reduce-scatters its gradients in the reduce dtype. With ring collectives each GPU moves
(n-1)/n of a unit's full size per collective over the slowest link of the ring:
- inside a node (n <= GPUs per node): NVLink;
- across nodes: NCCL runs one ring per NIC, so the node's InfiniBand bandwidth (GPUs per node times the
  per-GPU NIC rate) is the ring's bottleneck when lower than NVLink.
Hybrid sharding (HSDP) shards over the GPUs of a node and all-reduces each GPU's gradient shard across
nodes (2 (r-1)/r of the shard over the GPU's own NIC, r nodes).

FSDP2 prefetches the next unit's all-gather during the current unit's compute and reduce-scatters during
the previous unit's backward, so the step takes about max(compute, communication) plus what cannot
overlap: the first all-gather and the last reduce-scatter (the largest unit's), plus a fixed latency per
collective. Bandwidths are nominal datasheet figures times an efficiency (NCCL reaches roughly 70-85%
of nominal bus bandwidth on large messages); every assumption is a field below and printed in the report.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

GB = 1e9  # link bandwidths are quoted in decimal GB/s


@dataclass(frozen=True)
class UnitVolume:
    """One FSDP unit's parameters as communication sees them."""

    name: str
    numel: int  # parameters the unit owns (unsharded count)
    trainable_numel: int  # those with requires_grad: only they are reduce-scattered
    param_bytes: int  # bytes per element all-gathered (the compute dtype)
    reduce_bytes: int  # bytes per element reduce-scattered (the reduce dtype)
    reshard_after_forward: bool  # True: all-gathered again before backward

    @property
    def all_gather_bytes(self) -> int:
        """Unsharded bytes all-gathered per step (forward, and backward when resharded)."""
        return self.numel * self.param_bytes * (2 if self.reshard_after_forward else 1)

    @property
    def reduce_bytes_total(self) -> int:
        return self.trainable_numel * self.reduce_bytes

    @property
    def collectives(self) -> int:
        return (2 if self.reshard_after_forward else 1) + (1 if self.trainable_numel else 0)


def unit_volumes(model: nn.Module) -> list[UnitVolume]:
    """Read each FSDP2 unit's parameter counts, dtypes and resharding from a `fully_shard`-ed model.

    Uses FSDP2's internal parameter groups (torch 2.11 to 2.13: `_get_fsdp_state()` and its
    `_fsdp_param_group(s)`): they hold the mixed-precision policy each unit was actually given, so the
    volumes follow what the sharding engine decided rather than a second copy of its rules.
    """
    from torch.distributed.fsdp import FSDPModule

    volumes = []
    for name, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch releases with a single group per state
            single = getattr(state, "_fsdp_param_group", None)
            groups = [single] if single is not None else []
        for group in groups:
            params = [fsdp_param.sharded_param for fsdp_param in group.fsdp_params]
            orig = params[0].dtype if params else torch.float32
            param_dtype = group.mp_policy.param_dtype or orig
            reduce_dtype = group.mp_policy.reduce_dtype or param_dtype
            volumes.append(
                UnitVolume(
                    name=name or "<root>",
                    numel=sum(p.numel() for p in params),  # a DTensor's numel is the global one
                    trainable_numel=sum(p.numel() for p in params if p.requires_grad),
                    param_bytes=torch.finfo(param_dtype).bits // 8,
                    reduce_bytes=torch.finfo(reduce_dtype).bits // 8,
                    reshard_after_forward=group.post_forward_mesh_info is not None,
                )
            )
    if not volumes:
        raise ValueError("the model has no FSDP2 unit (was fully_shard applied?)")
    return volumes


@dataclass(frozen=True)
class Interconnect:
    """A cluster's links, per GPU and per direction, nominal (datasheet) figures."""

    name: str
    gpus_per_node: int
    nvlink_gbs: float  # NVLink bandwidth per GPU per direction, GB/s
    nic_gbs: float  # InfiniBand bandwidth per GPU (one NIC each), GB/s
    efficiency: float = 0.75  # achieved / nominal bus bandwidth on large messages
    latency_intra_s: float = 15e-6  # per collective, inside a node
    latency_inter_s: float = 40e-6  # per collective, across nodes

    def bus_gbs(self, gpus: int) -> float:
        """Effective ring bus bandwidth per GPU for a collective over `gpus` GPUs of this cluster."""
        if gpus <= self.gpus_per_node:
            nominal = self.nvlink_gbs
        else:
            nominal = min(self.nvlink_gbs, self.gpus_per_node * self.nic_gbs)
        return nominal * self.efficiency

    def latency_s(self, gpus: int) -> float:
        return self.latency_intra_s if gpus <= self.gpus_per_node else self.latency_inter_s


# DGX-class nodes. A100: NVLink 3 (600 GB/s both directions), 8x HDR 200 Gb/s. H100/H200: NVLink 4
# (900 GB/s both directions), 8x NDR 400 Gb/s.
A100_CLUSTER = Interconnect("A100 SXM, NVLink 3 + 8x HDR InfiniBand", 8, nvlink_gbs=300.0, nic_gbs=25.0)
H100_CLUSTER = Interconnect("H100/H200 SXM, NVLink 4 + 8x NDR InfiniBand", 8, nvlink_gbs=450.0, nic_gbs=50.0)


def cluster_for(device_name: str) -> Interconnect:
    """The cluster model matching a GPU name; A100's for anything else (the recipes' target card)."""
    name = device_name.lower()
    return H100_CLUSTER if ("h100" in name or "h200" in name) else A100_CLUSTER


@dataclass(frozen=True)
class CommPrediction:
    gpus: int
    sharding: str  # "full" or "hybrid"
    all_gather_gb: float  # per GPU per step, sent/received over the ring
    reduce_gb: float  # per GPU per step (reduce-scatter, plus the cross-node all-reduce for hybrid)
    comm_s: float
    exposed_s: float  # communication the step waits for
    step_s: float | None  # predicted step time (None without a measured compute time)
    efficiency: float | None  # compute time / predicted step time
    frames_per_s_total: float | None  # all GPUs together

    def as_dict(self) -> dict:
        return asdict(self)


def predict(
    volumes: list[UnitVolume],
    gpus: int,
    cluster: Interconnect,
    sharding: str = "full",
    compute_s: float | None = None,
    frames_per_gpu: int | None = None,
) -> CommPrediction:
    """Communication time of one step on `gpus` GPUs and, given the measured compute time, the step time."""
    if sharding not in ("full", "hybrid"):
        raise ValueError(f"sharding must be 'full' or 'hybrid', got {sharding!r}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    shard = gpus if sharding == "full" else min(gpus, cluster.gpus_per_node)
    replicas = gpus // shard
    ring = (shard - 1) / shard
    shard_bw = cluster.bus_gbs(shard) * GB

    ag_bytes = ring * sum(v.all_gather_bytes for v in volumes)
    rs_bytes = ring * sum(v.reduce_bytes_total for v in volumes)
    comm = (ag_bytes + rs_bytes) / shard_bw
    collectives = sum(v.collectives for v in volumes) if shard > 1 else 0
    # Hybrid: each GPU all-reduces its gradient shard with its peers on the other nodes, over its own NIC.
    ar_bytes = 0.0
    if replicas > 1:
        ar_bytes = 2 * (replicas - 1) / replicas * sum(v.reduce_bytes_total for v in volumes) / shard
        comm += ar_bytes / (cluster.nic_gbs * cluster.efficiency * GB)
        collectives += sum(1 for v in volumes if v.trainable_numel)
    comm += collectives * cluster.latency_s(gpus)

    largest = max(volumes, key=lambda v: v.numel * v.param_bytes)
    edges = ring * (largest.numel * largest.param_bytes + largest.trainable_numel * largest.reduce_bytes) / shard_bw
    if compute_s is None:
        exposed, step, eff, fps = comm, None, None, None
    else:
        exposed = max(0.0, comm - compute_s) + min(edges, comm)
        step = compute_s + exposed
        eff = compute_s / step
        fps = None if frames_per_gpu is None else gpus * frames_per_gpu / step
    return CommPrediction(
        gpus=gpus,
        sharding=sharding,
        all_gather_gb=ag_bytes / GB,
        reduce_gb=(rs_bytes + ar_bytes) / GB,
        comm_s=comm,
        exposed_s=exposed,
        step_s=step,
        efficiency=eff,
        frames_per_s_total=fps,
    )


def scaling_table(
    volumes: list[UnitVolume],
    cluster: Interconnect,
    compute_s: float | None,
    frames_per_gpu: int | None,
    gpu_counts: tuple[int, ...] = (8, 16, 32, 64),
) -> list[dict]:
    """Predictions for full and hybrid sharding at each GPU count (hybrid only beyond one node)."""
    rows = []
    for gpus in gpu_counts:
        for sharding in ("full", "hybrid"):
            if sharding == "hybrid" and gpus <= cluster.gpus_per_node:
                continue
            rows.append(predict(volumes, gpus, cluster, sharding, compute_s, frames_per_gpu).as_dict())
    return rows
