"""Tasks: what the trainer trains, so that the trainer never needs to know which model that is.

A recipe's `task: MODULE:CALLABLE` (a dotted module, or a `.py` path) names a callable, and
`CALLABLE(recipe)` returns a task: any object with

    model     an nn.Module, built either on the meta device (`with torch.device("meta"): ...`: no
              memory, any size; the trainer allocates only each rank's shards and initialises them, see
              `materialize`) or on the CPU (every rank builds the same weights: the trainer seeds with
              train.seed first; each rank holds the whole model until it is sharded)
    dataset   a map-style torch Dataset (len() and [i]) whose items torch's default collate stacks
    loss(model, batch) -> a scalar tensor, or (scalar, {term: scalar tensor}) to log the terms too;
              the batch is already on the device, the model is the sharded one

and optionally
    collate(items) -> batch              instead of torch's default collate
    init_weights(model)                  a meta-built model's initialisation (see `materialize`)
    load_weights(model)                  after initialisation, on every rank (e.g. pretrained weights);
                                         collectives allowed
    val_dataset, metrics(model, batch) -> {name: scalar tensor}
                                         validation every train.val_every steps: the means over
                                         train.val_batches batches of every rank (default metric: loss)
    tokens(batch) -> int                 the throughput unit of tokens_per_s (default: items in the batch)
    num_workers: int                     DataLoader worker processes (default 0)

The trainer does the rest as it does for VGGT (the built-in task, tasks/vggt.py): sharding per the
recipe's `parallel:` layout, precision, checkpointing with exact resume (the data order is a function
of train.seed, the epoch and the position, which checkpoints hold), integrity checks, the output
directory's lock, faults, metrics and the final export. The batch per process is train.batch_size.

Internally the trainer drives a `TrainingTask` (below): `UserTask` wraps a user's task into one, and the
built-in VGGT task is one.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, default_collate

from vggt_fsdp.train.faults import StepShape
from vggt_fsdp.train.preflight import Problem


class TaskError(ValueError):
    """A task that cannot be loaded or does not keep the protocol; the message names it and the fix."""


# ---------------------------------------------------------------------------------------- what the trainer drives
@dataclass
class Started:
    """A task ready to train: the loop's Task (train/loop.py), its validation, extra static metrics."""

    task: Any
    validate: Callable[[int], dict[str, float]] | None = None
    static: dict[str, Any] = field(default_factory=dict)


class TrainingTask(Protocol):
    name: str  # for the log
    model: nn.Module  # as built: untouched, on the meta device or a real one

    def problems(self, cuda: bool) -> list[Problem]:
        """Preflight: what is wrong with the recipe for this task (before any process starts)."""

    def before_sharding(self) -> None:
        """After preflight, before sharding (e.g. freezing parameters)."""

    def materialize(self, model: nn.Module, device: torch.device) -> None:
        """The sharded model: allocate what is on the meta device, initialise it, load weights."""

    def start(self, model: nn.Module, device: torch.device, rank: int, world: int) -> Started:
        """Data, loss and validation over the prepared model."""


# ---------------------------------------------------------------------------------------- loading
def import_callable(spec: str, what: str = "task") -> tuple[Callable, Any]:
    """(CALLABLE, its module) for MODULE:CALLABLE; a ValueError says what is wrong."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {spec!r}: expected MODULE:CALLABLE, e.g. my_project.model:build or "
                         "my_task.py:build")
    module = _import(module_name, spec, what)
    found = getattr(module, attr, None)
    if not callable(found):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"{what} {spec!r}: {module_name} has no callable {attr!r}; callables there: {names}")
    return found, module


def _import(module_name: str, spec: str, what: str):
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"{what} {spec!r}: no file {path}")
        name = path.stem
        loaded = sys.modules.get(name)
        if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path.resolve():
            return loaded  # imported once per process: its classes stay the same objects
        found = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(found)
        sys.modules[name] = module  # classes defined there get a findable __module__ (and pickle)
        found.loader.exec_module(module)
        return module
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` does: the user's project is importable
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"{what} {spec!r}: cannot import {module_name} ({err}); run from the directory that "
                         "holds it or give the path of its .py file") from None


# ---------------------------------------------------------------------------------------- a user's task
REQUIRED = ("model", "dataset", "loss")


class UserTask:
    """A task that `task: MODULE:CALLABLE` returned, as the trainer drives it."""

    def __init__(self, task: Any, recipe):
        spec = recipe.task
        missing = [name for name in REQUIRED if not hasattr(task, name)]
        if missing:
            raise TaskError(f"task {spec!r} returned a {type(task).__name__} without {missing}: a task has "
                            "model (nn.Module), dataset (map-style Dataset) and loss(model, batch) "
                            "(vggt_fsdp/tasks/base.py)")
        if not isinstance(task.model, nn.Module):
            raise TaskError(f"task {spec!r}: its model is a {type(task.model).__name__}, not a torch.nn.Module")
        if not (hasattr(task.dataset, "__getitem__") and hasattr(task.dataset, "__len__")):
            raise TaskError(f"task {spec!r}: its dataset ({type(task.dataset).__name__}) is not map-style: it "
                            "needs __len__ and __getitem__")
        if not callable(task.loss):
            raise TaskError(f"task {spec!r}: its loss is not callable: loss(model, batch) -> scalar tensor")
        self.user, self.recipe, self.spec = task, recipe, spec
        self.model = task.model
        cls = type(task.model)
        self.name = f"task {spec} ({cls.__module__}.{cls.__qualname__})"

    def problems(self, cuda: bool) -> list[Problem]:
        batch = self.recipe.train.batch_size
        if batch is None:
            return [Problem("train.batch_size", f"task {self.spec} draws batches of train.batch_size items per "
                            "process; set it (e.g. train.batch_size=8)")]
        processes = int(self.recipe.accelerate.get("num_processes", 1)) * int(
            self.recipe.accelerate.get("num_machines", 1))
        problems = []
        if len(self.user.dataset) < batch * processes:
            problems.append(Problem("train.batch_size", f"{batch} items per process x {processes} process(es) "
                                    f"exceed the task's {len(self.user.dataset)} dataset items: lower it"))
        val = getattr(self.user, "val_dataset", None)
        if self.recipe.train.val_every and val is None:
            problems.append(Problem("train.val_every", f"{self.recipe.train.val_every}, but task {self.spec} has "
                                    "no val_dataset: give it one or set train.val_every=0"))
        elif self.recipe.train.val_every and len(val) < batch * processes:
            problems.append(Problem("train.val_every", f"the task's val_dataset has {len(val)} items, fewer than one "
                                    f"batch of {batch} per process x {processes}: enlarge it or set train.val_every=0"))
        return problems

    def before_sharding(self) -> None:
        pass

    def materialize(self, model: nn.Module, device: torch.device) -> None:
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            from vggt_fsdp.parallel.materialize import materialize_module

            materialize_module(model, device, model_init=model_init(self.user, model))
        load = getattr(self.user, "load_weights", None)
        if load is not None:
            load(model)

    def start(self, model: nn.Module, device: torch.device, rank: int, world: int) -> Started:
        cfg = self.recipe.train
        sampler = ShardedSampler(len(self.user.dataset), cfg.batch_size, rank, world, cfg.seed)
        task = MapTask(self.user, sampler)
        validate = None
        if cfg.val_every:
            validate = MapValidator(self.user, model, device, rank, world, cfg.batch_size, cfg.val_batches)
        return Started(task, validate, {"batch_size": cfg.batch_size})


def model_init(task: Any, model: nn.Module) -> Callable[[], None] | None:
    """The whole-model initialisation a meta-built model gets after its modules' own
    `reset_parameters()`/`reset_buffers()`: the task's `init_weights(model)` where it names one; else,
    for the model and each outermost sub-module that has one (a library's model inside yours), its own
    `init_weights()` (transformers' PreTrainedModel: its `_init_weights` over every module, then tied
    weights; timm's models) or else its `_init_weights(module)` applied to each of its modules."""
    hook = getattr(task, "init_weights", None)
    if callable(hook):
        return lambda: hook(model)
    inits, owners = [], []
    for path, module in model.named_modules():
        if any(path.startswith(owner + ".") or owner == "" for owner in owners):
            continue  # inside a module whose own init covers it
        own, per_module = getattr(module, "init_weights", None), getattr(module, "_init_weights", None)
        if callable(own):
            inits.append(own)
        elif callable(per_module):
            inits.append(lambda m=module, f=per_module: m.apply(f))
        else:
            continue
        owners.append(path)
    if not inits:
        return None
    return lambda: [init() for init in inits] and None


# ---------------------------------------------------------------------------------------- data
class ShardedSampler:
    """Each rank's batches of a map-style dataset, resumable exactly.

    Epoch e's order is a permutation drawn from (seed, e) alone, dealt to the ranks in turn and cut to a
    whole number of batches on every rank (every rank takes the same number of steps). The position
    (epoch, batches consumed) is what checkpoints save: a resumed run continues with the next batch.
    """

    def __init__(self, length: int, batch_size: int, rank: int, world: int, seed: int):
        self.length, self.batch_size, self.rank, self.world, self.seed = length, batch_size, rank, world, seed
        self.per_rank = length // world // batch_size  # batches per rank and epoch
        if self.per_rank < 1:
            raise ValueError(f"the dataset's {length} items make no batch of {batch_size} on each of {world} "
                             "processes: lower train.batch_size")
        self.epoch = 0
        self.position = 0  # batches of this epoch consumed

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        mine = order[self.rank::self.world][: self.per_rank * self.batch_size].tolist()
        return [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def move_to(batch: Any, device: torch.device) -> Any:
    """Tensors of a batch (nested in dicts, lists, tuples) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def batch_items(batch: Any) -> int:
    """Items in a collated batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        n = batch_items(value)
        if n:
            return n
    return 0


def split_loss(output: Any, where: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A task's loss(...) result as (scalar, terms); anything else is an error naming the task."""
    loss, terms = output if isinstance(output, tuple) else (output, {})
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not isinstance(terms, dict):
        raise TaskError(f"{where}: loss(model, batch) must return a scalar tensor or (scalar, {{name: tensor}}), "
                        f"got {type(loss).__name__}" + (f" of shape {tuple(loss.shape)}"
                                                        if isinstance(loss, torch.Tensor) else ""))
    return loss.reshape(()), terms


class MapTask:
    """The loop's Task (train/loop.py) over a user's task and a ShardedSampler."""

    def __init__(self, user: Any, sampler: ShardedSampler):
        self.user, self.sampler = user, sampler
        self.collate = getattr(user, "collate", None) or default_collate
        self.workers = int(getattr(user, "num_workers", 0))
        self.count_tokens = getattr(user, "tokens", None)

    def batches(self) -> Iterator[Any]:
        sampler = self.sampler
        while True:
            remaining = sampler.epoch_batches(sampler.epoch)[sampler.position:]
            loader = DataLoader(self.user.dataset, batch_sampler=remaining, collate_fn=self.collate,
                                num_workers=self.workers)
            for batch in loader:
                sampler.position += 1  # consumed: a checkpoint after this step resumes with the next one
                yield batch
            sampler.epoch, sampler.position = sampler.epoch + 1, 0

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return split_loss(self.user.loss(model, batch), "task")

    def shape(self, batch: Any) -> StepShape:
        items = batch_items(batch)
        tokens = int(self.count_tokens(batch)) if self.count_tokens is not None else items
        return StepShape(scenes=items, frames_per_scene=1, height=0, width=0, tokens=tokens)

    def to_device(self, batch: Any, device: torch.device) -> Any:
        return move_to(batch, device)


class MapValidator:
    """Callable(step) -> the task's validation metrics (default: its loss), averaged over
    `batches` batches of every rank's share of val_dataset (the same batches every time)."""

    def __init__(self, user: Any, model: nn.Module, device: torch.device, rank: int, world: int,
                 batch_size: int, batches: int):
        self.user, self.model, self.device, self.batches = user, model, device, batches
        length = len(user.val_dataset)
        mine = list(range(rank, length, world))[: (length // world // batch_size) * batch_size]
        self.order = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)][:batches]
        self.collate = getattr(user, "collate", None) or default_collate

    @torch.no_grad()
    def __call__(self, step: int) -> dict[str, float]:
        metrics = getattr(self.user, "metrics", None)
        sums: dict[str, torch.Tensor] = {}
        loader = DataLoader(self.user.val_dataset, batch_sampler=self.order, collate_fn=self.collate)
        for batch in loader:
            batch = move_to(batch, self.device)
            if metrics is not None:
                values = metrics(self.model, batch)
            else:
                values = {"loss": split_loss(self.user.loss(self.model, batch), "task")[0]}
            for key, value in values.items():
                sums[key] = sums.get(key, 0) + value.detach().double().reshape(())
        keys = sorted(sums)
        if not keys:
            return {}
        count = torch.tensor(float(len(self.order)), dtype=torch.float64, device=self.device)
        totals = torch.stack([sums[k] for k in keys] + [count])
        if dist.is_initialized():
            dist.all_reduce(totals)
        return dict(zip(keys, (totals[:-1] / totals[-1]).tolist()))  # one host sync, not one per metric
