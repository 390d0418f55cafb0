"""Exact measurements the planner's formulas are checked against.

Two instruments, both usable on the CPU:

- `SavedTensorCounter`: the bytes the autograd graph keeps for backward (activations), counted with
  `torch.autograd.graph.saved_tensors_hooks`. Every saved tensor is charged by its *storage*, once: a view
  of a larger buffer keeps the whole buffer alive, and two views of one buffer cost it once. Parameters
  (and views of them) are not activations and are skipped. With non-reentrant checkpointing the
  checkpoint's inputs are saved through the same hooks, while the tensors inside a checkpointed region
  are not saved at all (the checkpoint's own hooks take over there), so the count is what stays alive
  between forward and backward under the active policy. A selective checkpoint's cache (the outputs its
  policy keeps) lives beside autograd, not in saved tensors: the counter adds what each cache holds after
  its block's forward (`parallel.checkpointing.observe_selective_cache`), charged like a saved tensor.
- `measure_model_state`: FSDP2's model-state buffers (sharded parameters, sharded gradients, optimizer
  state, and the peaks of unsharded parameters, all-gather and reduce-scatter buffers) from
  `torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker`, for one training step.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from vggt_fsdp.parallel.checkpointing import observe_selective_cache


def _is_parameter(t: torch.Tensor) -> bool:
    """True for a parameter or a view of one (e.g. `weight.t()` saved by a linear layer)."""
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


@dataclass
class SavedTensorReport:
    """Bytes held for backward, total and per module group (the innermost active group that saved it)."""

    total_bytes: int = 0
    by_group: dict[str, int] = field(default_factory=dict)
    num_storages: int = 0


class SavedTensorCounter:
    """Counts the distinct storages saved for backward while the context is active.

    `groups` maps a name to a module or a list of modules; a saved storage is charged to the innermost
    group whose forward is running when it is first saved, or to "other". Use it around the forward pass
    only; the report is in `.report` after exit::

        counter = SavedTensorCounter({"frame": model.aggregator.frame_blocks[0]})
        with counter:
            loss = model(images)["depth"].sum()
        counter.report.total_bytes
    """

    OTHER = "other"

    def __init__(self, groups: Mapping[str, nn.Module | Sequence[nn.Module]] | None = None) -> None:
        self._groups = {name: [mods] if isinstance(mods, nn.Module) else list(mods)
                        for name, mods in (groups or {}).items()}
        self._stack: list[str] = []
        self._seen: set[int] = set()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._hooks: contextlib.AbstractContextManager | None = None
        self._sac: contextlib.AbstractContextManager | None = None
        self.report = SavedTensorReport(by_group={name: 0 for name in [*self._groups, self.OTHER]})

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._charge(t)
        return t  # keep the tensor itself: the graph holds it exactly as it would without the counter

    def _charge_all(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            self._charge(t)

    def _charge(self, t: torch.Tensor) -> None:
        if not _is_parameter(t):
            storage = t.untyped_storage()
            key = storage._cdata  # the StorageImpl: unique per live storage, also for meta tensors
            if storage.nbytes() > 0 and key not in self._seen:
                self._seen.add(key)
                group = self._stack[-1] if self._stack else self.OTHER
                self.report.by_group[group] += storage.nbytes()
                self.report.total_bytes += storage.nbytes()
                self.report.num_storages += 1

    def _enter_group(self, name: str) -> Callable:
        def hook(module: nn.Module, args: object) -> None:
            self._stack.append(name)

        return hook

    def _exit_group(self, name: str) -> Callable:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if not self._stack or self._stack[-1] != name:
                raise RuntimeError(f"module group {name!r} exited out of order (stack {self._stack})")
            self._stack.pop()

        return hook

    def __enter__(self) -> SavedTensorCounter:
        for name, modules in self._groups.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._enter_group(name)))
                self._handles.append(module.register_forward_hook(self._exit_group(name), always_call=True))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        self._sac = observe_selective_cache(self._charge_all)
        self._sac.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._hooks is not None and self._sac is not None
        self._sac.__exit__(*exc)
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def count_saved_bytes(
    fn: Callable[[], object], groups: Mapping[str, nn.Module | Sequence[nn.Module]] | None = None
) -> tuple[SavedTensorReport, object]:
    """Run `fn()` (a forward pass) under a `SavedTensorCounter`; return the report and `fn`'s result."""
    counter = SavedTensorCounter(groups)
    with counter:
        result = fn()
    return counter.report, result


@dataclass
class ModelStateMeasurement:
    """FSDPMemTracker's model-state categories for one device, in bytes.

    `sharded_*` and `optimizer_state` are read after the optimizer step (before zeroing gradients), when
    all of them exist; the `peak_*` fields are the largest value each category reached during the step.
    """

    sharded_params: int
    sharded_grads: int
    optimizer_state: int
    peak_unsharded_params: int
    peak_all_gather: int
    peak_reduce_scatter: int
    peak_total: int
    peak_snapshot: dict[str, int]  # every category at the instant of the total peak


def _fsdp_mem_tracker_cls() -> type:
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    class _CategoryPeakTracker(FSDPMemTracker):
        """FSDPMemTracker that also keeps each category's own maximum (its peak snapshot is one instant)."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.category_peaks: dict[str, int] = {}

        def _update_peak_stats(self, peak_state: object) -> None:
            super()._update_peak_stats(peak_state)
            for dev_snap in self._curr_mem_snap.values():
                for key, value in dev_snap.items():
                    name = getattr(key, "value", key)
                    self.category_peaks[name] = max(self.category_peaks.get(name, 0), value)

    return _CategoryPeakTracker


def measure_model_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: Callable[[], None],
    device: torch.device | str,
) -> ModelStateMeasurement:
    """Run `step()` (forward, backward, `optimizer.step()`, no zero_grad) once under FSDPMemTracker.

    `model` must be an FSDP2 module (`fully_shard` applied to it); it may live on a fake process group.
    Optimizer state is created lazily by the first step: for the steady state, run one step (and
    `zero_grad(set_to_none=True)`) before measuring.
    """
    tracker = _fsdp_mem_tracker_cls()(model, optimizer)
    with tracker:
        step()
    device = torch.device(device)
    snaps = tracker.get_tracker_snapshot("current")
    current = next((snap for dev, snap in snaps.items() if dev.type == device.type), None)
    if current is None:
        raise RuntimeError(f"FSDPMemTracker saw no memory on {device}; devices seen: {list(snaps)}")
    current = {getattr(k, "value", k): v for k, v in current.items()}
    peaks = tracker.category_peaks
    peak_snapshot = tracker.get_tracker_snapshot("peak").get(device, {})
    return ModelStateMeasurement(
        sharded_params=current["Sharded Param"],
        sharded_grads=current["Sharded Grad"],
        optimizer_state=current["OptState"],
        peak_unsharded_params=peaks.get("Unsharded Param", 0),
        peak_all_gather=peaks.get("All Gather", 0),
        peak_reduce_scatter=peaks.get("Reduce Scatter", 0),
        peak_total=peaks.get("Total", 0),
        peak_snapshot={getattr(k, "value", k): v for k, v in peak_snapshot.items()},
    )


@contextlib.contextmanager
def cuda_peak_memory(device: torch.device | str) -> Iterator[dict[str, int]]:
    """Measure `torch.cuda.max_memory_allocated` over the block; the dict is filled on exit.

    `peak_bytes` is the absolute peak (what an OOM is decided against); `baseline_bytes` what was
    allocated on entry.
    """
    device = torch.device(device)
    result: dict[str, int] = {}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    result["baseline_bytes"] = torch.cuda.memory_allocated(device)
    yield result
    torch.cuda.synchronize(device)
    result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
