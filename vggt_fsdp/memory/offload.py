"""CPU offload (`parallel.sharding.cpu_offload`): what the host holds, and the time offloading adds.

With FSDP2's CPUOffloadPolicy the sharded fp32 parameters and gradients live in host memory (pinned on
a GPU machine, so copies need no staging) and AdamW's state is created there, next to them: the
optimizer step runs on the host. The device keeps only what is in flight, which `planner.plan` already
charges: the unsharded parameters of the running unit (each parameter copied to the device in fp32,
cast to the compute dtype, the fp32 copy freed), the root unit's unsharded parameters from forward to
backward, a unit's unsharded gradients and FSDP2's reduce buffers in backward until their copy to the
host, activations and batches. So `planner.plan` is the device; this module is the host and the clock:

- `host_plan`: sharded parameters, gradients, AdamW state (and its temporaries), plus the process
  itself (an estimate, stated as such); `check_host_memory` refuses a plan above the host's RAM.
- `offload_time`: per micro-batch, the host-to-device copies of parameters (forward, and again in
  backward for resharded units that run backward) and the device-to-host copies of gradients; per extra
  micro-batch of accumulation, the host adding them up; per optimizer step, AdamW on the host. Copy
  time comes from an assumed PCIe bandwidth (`PCIE_BYTES_PER_S`, stated as an assumption); host time
  from `calibrate`, a short AdamW and add measured on the planning machine (labelled as such: the
  training machine's CPU may differ). No overlap with compute is assumed: an upper bound.

With gradient accumulation the trainer lets every micro-batch's gradients go to the host (FSDP2 adds
them to the offloaded gradients there; see `train/loop.py`): Accelerate's no_sync would instead keep
the whole model's unsharded gradients on the device, the memory offloading exists to free.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch

from vggt_fsdp.memory import planner
from vggt_fsdp.memory.planner import GiB, Term, UnitInfo

# Host memory of the training process besides the model states: Python, torch, the CUDA runtime's
# host-side allocations and pinned staging (an estimate, not measured by this project: the GPU stage
# benchmarks/gpu_stages/50_single_gpu.sh measures the process's peak RSS).
PROCESS_BYTES = 6 * GiB
# Each data-loader worker process (an estimate, as above).
WORKER_BYTES = 1 * GiB
# Host-device copy bandwidth, one direction: PCIe 4.0 x16 moves about 25 GB/s from pinned memory in
# practice (32 GB/s nominal). An assumption, not a measurement.
PCIE_BYTES_PER_S = 25e9


# ======================================================================================== host memory
@dataclass
class HostPlan:
    terms: list[Term]
    pinned_bytes: int  # page-locked: cannot be swapped out, counts fully against RAM
    total_bytes: int
    ram_bytes: int | None = None  # the planning machine's RAM (psutil), if read

    @property
    def fits(self) -> bool | None:
        return None if self.ram_bytes is None else self.total_bytes <= self.ram_bytes

    def to_dict(self) -> dict:
        data = asdict(self)
        data["terms"] = [asdict(t) | {"GiB": round(t.bytes / GiB, 3)} for t in self.terms]
        data["total_GiB"] = round(self.total_bytes / GiB, 2)
        data["pinned_GiB"] = round(self.pinned_bytes / GiB, 2)
        data["ram_GiB"] = None if self.ram_bytes is None else round(self.ram_bytes / GiB, 2)
        data["fits"] = self.fits
        return data

    def table(self) -> str:
        rows = [(t.name, f"{t.bytes / GiB:.3f}", t.formula) for t in self.terms]
        width = max(len(r[0]) for r in rows)
        lines = [f"{name:<{width}}  {gib:>8} GiB  {formula}" for name, gib, formula in rows]
        lines.append(f"{'host total':<{width}}  {self.total_bytes / GiB:8.3f} GiB  (pinned {self.pinned_bytes / GiB:.2f} GiB)")
        return "\n".join(lines)


def host_plan(units: list[UnitInfo], shard: int, *, fused: bool, pinned: bool, num_workers: int,
              ram_bytes: int | None = None) -> HostPlan:
    """The host memory of one offloading process: its shard of the model states, and itself.

    `fused`: AdamW's fused kernel (no temporaries) or foreach (one fp32 list like the gradients);
    `pinned`: CUDA (FSDP2 pins the offloaded parameters, and gradients copied to the host land in pinned
    memory); `num_workers`: data-loader worker processes.
    """
    params = [p for u in units for p in u.params]
    trainable = [p for p in params if p.trainable]
    sharded = sum(p.shard_numel(shard) for p in params) * 4
    grads = sum(p.shard_numel(shard) for p in trainable) * 4
    adamw = 2 * grads + 4 * len(trainable)
    temporaries = 0 if fused else grads
    pin = " (pinned)" if pinned else ""
    terms = [
        Term("sharded parameters (fp32)", "host", sharded, f"sum_p ceil(d0/{shard}) * numel/d0 * 4 B{pin}"),
        Term("sharded gradients (fp32)", "host", grads, f"same over {len(trainable)} trainable tensors{pin}"),
        Term("AdamW state (fp32 exp_avg, exp_avg_sq, step)", "host", adamw,
             f"2 x sharded gradients + 4 B x {len(trainable)} steps"),
        Term("AdamW step temporaries", "host", temporaries,
             "fused: none; foreach: one fp32 list like the gradients"),
        Term("training process (estimate)", "host", PROCESS_BYTES,
             "Python, torch, CUDA runtime host memory: an estimate, not measured"),
        Term("data-loader workers (estimate)", "host", num_workers * WORKER_BYTES,
             f"{num_workers} workers x {WORKER_BYTES / GiB:g} GiB: an estimate"),
    ]
    total = sum(t.bytes for t in terms)
    return HostPlan(terms, sharded + grads if pinned else 0, total, ram_bytes)


def host_ram_bytes() -> int:
    """This machine's physical memory (psutil)."""
    import psutil

    return int(psutil.virtual_memory().total)


def check_host_memory(plan: HostPlan) -> None:
    """Raise when the host plan exceeds the RAM it was checked against."""
    if plan.fits is False:
        raise ValueError(
            f"parallel.sharding.cpu_offload: the host needs about {plan.total_bytes / GiB:.1f} GiB "
            f"({plan.pinned_bytes / GiB:.1f} GiB of it pinned) but this machine has {plan.ram_bytes / GiB:.1f} GiB "
            "of RAM; freeze more of the model (model.freeze), use fewer data.num_workers, or plan on the "
            "training machine")


# ======================================================================================== time
@dataclass(frozen=True)
class Calibration:
    """Host throughput measured on the planning machine (not the training machine's, unless they are one)."""

    adamw_params_per_s: float  # AdamW (fused or foreach, as the trainer builds it) over fp32 tensors
    add_bytes_per_s: float  # `a += b` over fp32 tensors: gradient accumulation on the host, per byte of b
    fused: bool
    threads: int
    numel: int
    cpu: str
    label: str = "measured on the planning machine"


def _fastest(run, budget_s: float, most: int) -> float:
    """The shortest of repeated wall-clock timings of `run()` (at least 3, until `budget_s` or `most`):
    other work sharing the CPU only ever makes a run slower, so many short runs find an undisturbed one."""
    best, spent, count = float("inf"), 0.0, 0
    while count < 3 or (spent < budget_s and count < most):
        start = time.perf_counter()
        run()
        took = time.perf_counter() - start
        best, spent, count = min(best, took), spent + took, count + 1
    return best


@functools.lru_cache(maxsize=4)
def calibrate(fused: bool, numel: int = 1 << 24, budget_s: float = 1.0) -> Calibration:
    """Time AdamW steps and gradient adds over `numel` fp32 parameters (in 8 tensors; 16 M by default,
    1 GiB of parameters, gradients and moments: far beyond any cache, as a model's are) on this CPU."""
    sizes = [numel // 8] * 8
    params = [torch.zeros(n, requires_grad=True) for n in sizes]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused, foreach=None if fused else True)
    optimizer.step()  # creates the state; the timed steps are the steady state
    step = _fastest(optimizer.step, budget_s, 500)
    grads = [p.grad for p in params]
    other = [g.clone() for g in grads]
    add = _fastest(lambda: torch._foreach_add_(grads, other), budget_s, 500)
    return Calibration(adamw_params_per_s=numel / step, add_bytes_per_s=numel * 4 / add, fused=fused,
                       threads=torch.get_num_threads(), numel=numel,
                       cpu=platform.processor() or platform.machine() or os.uname().machine)


@dataclass
class OffloadTime:
    """Seconds CPU offload adds to one optimizer step of `grad_accum_steps` micro-batches (no overlap)."""

    h2d_bytes_per_micro: int  # parameters copied to the device, fp32
    d2h_bytes_per_micro: int  # gradients copied to the host, reduce dtype
    pcie_bytes_per_s: float
    host_adamw_s: float
    host_accumulate_s: float  # adding the gradients of micro-batches 2..N on the host
    transfer_s: float  # all micro-batches' copies
    grad_accum_steps: int
    calibration: Calibration
    assumptions: list[str] = field(default_factory=list)

    @property
    def added_s(self) -> float:
        return self.transfer_s + self.host_accumulate_s + self.host_adamw_s

    def to_dict(self) -> dict:
        data = asdict(self)
        data["added_s"] = round(self.added_s, 4)
        return data


def offload_time(model_cfg, units: list[UnitInfo], grad_accum_steps: int, calibration: Calibration,
                 pcie_bytes_per_s: float = PCIE_BYTES_PER_S) -> OffloadTime:
    """The time offloading adds to an optimizer step (see the module docstring for what is assumed).

    Parameters go to the device in fp32 (FSDP2 casts them there) once in forward and, for units
    resharded after forward whose backward runs, again in backward; trainable parameters' gradients come
    back in the unit's reduce dtype every micro-batch. A frozen unit before anything trainable runs no
    backward (`planner._grad_flow`), so it is not gathered again.
    """
    backward = _units_with_backward(model_cfg, units)
    h2d = 0
    for unit in units:
        numel = sum(p.numel for p in unit.params)
        gathers = 1 + (1 if unit.reshard and unit.path in backward else 0)
        h2d += gathers * numel * 4
    d2h = sum(p.numel * u.reduce_bytes for u in units for p in u.params if p.trainable)
    trainable = sum(p.numel for u in units for p in u.params if p.trainable)
    transfer = grad_accum_steps * (h2d + d2h) / pcie_bytes_per_s
    accumulate = (grad_accum_steps - 1) * trainable * 4 / calibration.add_bytes_per_s
    adamw = trainable / calibration.adamw_params_per_s
    assumptions = [
        f"host-device copies at {pcie_bytes_per_s / 1e9:g} GB/s each way (PCIe 4.0 x16 in practice): an assumption",
        f"host AdamW {calibration.adamw_params_per_s / 1e6:.0f} M params/s and add {calibration.add_bytes_per_s / 1e9:.1f} "
        f"GB/s: {calibration.label} ({calibration.cpu}, {calibration.threads} threads)",
        "no overlap of copies or host work with the device's compute: an upper bound",
    ]
    return OffloadTime(h2d, d2h, pcie_bytes_per_s, adamw, accumulate, transfer, grad_accum_steps, calibration,
                       assumptions)


def _units_with_backward(model_cfg, units: list[UnitInfo]) -> set[str]:
    """Paths of the units whose backward runs: those at or after the first trainable stage."""
    flow = planner._grad_flow(model_cfg, units)
    out = set()
    for unit in units:
        path = unit.path
        for prefix, key in (("aggregator.patch_embed.blocks.", "dino."), ("aggregator.frame_blocks.", "frame."),
                            ("aggregator.global_blocks.", "global.")):
            if path.startswith(prefix):
                if flow[key + path[len(prefix):].split(".")[0]]:
                    out.add(path)
                break
        else:
            head = path.split(".")[0]
            if path == "" or flow.get(head, flow["aggregator"]):
                out.add(path)
    return out


# ======================================================================================== the plan command
def summary(recipe, model_cfg, freeze: tuple[str, ...], world_size: int, gpus_per_node: int, device_kind: str,
            micro_step_s: float | None, host_memory_bytes: int | None = None) -> dict:
    """What `vggt-fsdp plan` reports for a recipe with CPU offload: the host memory of the node (each of its
    processes holds its own shard and itself), checked against `host_memory_bytes` or this machine's RAM
    (raises when it does not fit), and the time offloading adds to an optimizer step.

    `micro_step_s`: the device's predicted time of one micro-batch (None without a card): with it, the
    predicted optimizer step and the share of it spent in the host optimizer."""
    from vggt_fsdp.train.optim import resolve_fused

    units = planner.unit_layout(model_cfg, recipe.parallel, freeze)
    shard = planner.shard_size(recipe.parallel, world_size, gpus_per_node)
    fused = resolve_fused(recipe.optim, "cpu")  # the optimizer steps where the parameters are: the host
    per_process = host_plan(units, shard, fused=fused, pinned=device_kind == "cuda",
                            num_workers=recipe.data.num_workers)
    processes = min(world_size, gpus_per_node)
    ram = host_memory_bytes if host_memory_bytes is not None else host_ram_bytes()
    node = HostPlan([dataclasses.replace(t, bytes=processes * t.bytes, formula=f"{processes} process(es) x: {t.formula}")
                     for t in per_process.terms] if processes > 1 else per_process.terms,
                    processes * per_process.pinned_bytes, processes * per_process.total_bytes, ram)
    check_host_memory(node)
    added = offload_time(model_cfg, units, recipe.train.grad_accum_steps, calibrate(fused))
    out = {"host": node.to_dict(), "processes_per_host": processes,
           "ram_source": "--host-memory" if host_memory_bytes is not None else "this machine (psutil)",
           "time": added.to_dict()}
    if micro_step_s is not None:
        step = recipe.train.grad_accum_steps * micro_step_s + added.added_s
        out["predicted_optimizer_step_s"] = round(step, 3)
        out["host_optimizer_share"] = round(added.host_adamw_s / step, 4)
        out["offload_share"] = round(added.added_s / step, 4)
    return out


def print_summary(data: dict) -> None:
    host, t = data["host"], data["time"]
    print()
    print(f"CPU offload: host memory of one node ({data['processes_per_host']} process(es)), "
          f"checked against {host['ram_GiB']} GiB ({data['ram_source']})")
    print(HostPlan([Term(**{k: v for k, v in term.items() if k != "GiB"}) for term in host["terms"]],
                   host["pinned_bytes"], host["total_bytes"]).table())
    accum = t["grad_accum_steps"]
    print(f"time offloading adds to an optimizer step of {accum} micro-batch(es): copies {t['transfer_s']:.2f} s "
          f"({t['h2d_bytes_per_micro'] / 1e9:.2f} GB to the device, {t['d2h_bytes_per_micro'] / 1e9:.2f} GB back, "
          f"per micro-batch), host gradient adds {t['host_accumulate_s']:.2f} s, host AdamW {t['host_adamw_s']:.2f} s: "
          f"{t['added_s']:.2f} s")
    for line in t["assumptions"]:
        print(f"  - {line}")
    if "predicted_optimizer_step_s" in data:
        print(f"predicted optimizer step {data['predicted_optimizer_step_s']:.1f} s (device compute x {accum} + the "
              f"above): host AdamW {data['host_optimizer_share']:.1%} of it, offloading in all "
              f"{data['offload_share']:.1%} (estimates)")
