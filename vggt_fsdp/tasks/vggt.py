"""The built-in task: VGGT on the recipe's `model:`, `data:` and `loss:` sections.

Everything the trainer does that is particular to VGGT is here: the model built on the meta device
from the preset and its overrides, frozen parameters, the initial weights (rank 0 reads, the others
receive their shards), the scene loader and its frames-per-GPU budget, the multi-task loss, the
validation metrics (camera AUC, depth AbsRel) and the out-of-memory advice. A task that extends VGGT
(another head, another loss: examples/vggt_rgb_head.py) subclasses `VGGTBuiltin`.
"""
from __future__ import annotations

import fnmatch
import os

import torch
import torch.distributed as dist
from torch import nn

from vggt_fsdp.tasks.base import Started, TaskError
from vggt_fsdp.train.faults import StepShape
from vggt_fsdp.train.loop import log


def freeze(model: nn.Module, patterns: list[str]) -> int:
    """requires_grad=False for parameters whose name matches any fnmatch pattern; returns how many.
    A pattern that matches nothing is an error (a typo would otherwise train what it meant to freeze),
    unless it names a disabled head."""
    from vggt_fsdp.train.preflight import disabled_modules, names_disabled

    names = [name for name, _ in model.named_parameters()]
    frozen = 0
    for pattern in patterns:
        hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hits and not names_disabled(pattern, disabled_modules(model)):
            prefixes = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"model.freeze: pattern {pattern!r} matches no parameter; parameter names "
                             f"start with {prefixes} (e.g. 'aggregator.patch_embed.*')")
        for name, param in model.named_parameters():
            if name in hits and param.requires_grad:
                param.requires_grad_(False)
                frozen += param.numel()
    return frozen


class InitWeightsError(TaskError, RuntimeError):
    """Initial weights that do not fit the model or hold NaN/Inf (every rank raises it)."""


def load_initial_weights(model: nn.Module, path: str, new_modules: tuple[str, ...] = ()) -> None:
    """Load an upstream .pt/.safetensors into the already sharded model.

    `new_modules`: module paths the file may lack (a head added to VGGT): their tensors keep the
    initialisation they have, and are reported; every other tensor is loaded strictly.

    Only rank 0 reads the file; `set_model_state_dict(full_state_dict, broadcast_from_rank0)` sends
    each tensor to the other ranks, which keep just their shard. Names are checked strictly on rank 0
    first (a disabled head's tensors in the file are dropped and reported), then that the tensors are
    finite, and every rank raises the same error when either fails.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from vggt_fsdp.model.weights import compare_state_dict, read_state_dict
    from vggt_fsdp.train.integrity import describe_names, nonfinite_names

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    state, message, ignored, new = {}, None, 0, []
    if rank0:
        report, state = compare_state_dict(model, read_state_dict(path), ignore_disabled_heads=True)
        new = [n for n in report.missing if n.startswith(tuple(m + "." for m in new_modules))]
        report.missing = [n for n in report.missing if n not in new]
        message = None if report.ok else f"weights {path} do not match the model: {report.describe()}"
        bad = nonfinite_names(state.items(), collective=False) if report.ok else []
        if bad:
            message = (f"model.init_weights {path} holds NaN or Inf in {describe_names(bad)}; training from it "
                       "would only produce non-finite losses: use an intact file")
        ignored = len(report.ignored)
    if dist.is_initialized():
        box = [message, ignored, new]
        dist.broadcast_object_list(box, src=0)
        message, ignored, new = box
    if message is not None:  # raised on every rank, so none waits in the broadcast below
        raise InitWeightsError(message)
    set_model_state_dict(model, state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=dist.is_initialized(), strict=not new))
    log(f"initial weights from {path}" + (f" ({ignored} tensors of disabled heads ignored)" if ignored else ""))
    if new:
        heads = sorted({m for m in new_modules if any(n.startswith(m + ".") for n in new)})
        params = dict(model.named_parameters())
        count = sum(params[n].numel() for n in new if n in params)  # global sizes (DTensor numel)
        log(f"{heads}: {len(new)} tensors ({count:,} parameters) are not in {path} and keep their "
            "initialisation")


class VGGTTask:
    """Batches from helper D's loader, VGGT forward and `compute_loss`."""

    def __init__(self, loader, loss_cfg, patch_size: int, special_tokens: int, tracks: bool, recipe=None,
                 context=None):
        self.context = context  # parallel.context.ContextGroup: the model sees this rank's frames only
        self.sampler = loader  # SceneLoader: state_dict() is the position after the last batch consumed
        self.loader, self.loss_cfg = loader, loss_cfg
        # No autocast here: the sharded model's forward carries the recipe's precision (input casts, and
        # autocast where parallel.precision.autocast asks for it: parallel/precision.py). The loss runs
        # outside it, in fp32.
        self.patch_size, self.special_tokens, self.tracks = patch_size, special_tokens, tracks
        self.recipe = recipe
        self._scenes_without_depth = None  # context groups: a device count, read where the trainer syncs

    def batches(self):
        return iter(self.loader)

    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        # Under context parallelism `images` is this rank's share of the frames; the predictions come back
        # whole (gathered over the group), like the ground truth (to_device).
        query = batch.get("query_points") if self.tracks else None
        return model(batch["images"], query_points=query)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        from vggt_fsdp.losses import compute_loss

        return compute_loss(self.predict(model, batch), batch, self.loss_cfg)

    def shape(self, batch: dict[str, torch.Tensor]) -> StepShape:
        b, s, _, h, w = batch["images"].shape
        per_frame = (h // self.patch_size) * (w // self.patch_size) + self.special_tokens
        return StepShape(scenes=b, frames_per_scene=s, height=h, width=w, tokens=b * s * per_frame)

    def to_device(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        from vggt_fsdp.data import move_batch

        batch = move_batch(batch, device)
        if self.context is not None:  # this rank built its frames only: the group completes the scenes
            from vggt_fsdp.data.split_scenes import complete_split_batch

            batch, has_depth = complete_split_batch(batch, self.context)
            missing = (~has_depth).sum()  # no host sync here: checked in data_counts
            self._scenes_without_depth = missing if self._scenes_without_depth is None else \
                self._scenes_without_depth + missing
        return batch

    def data_counts(self) -> dict[str, dict[str, int]]:
        """The loader's counts (read at log steps). Under context parallelism also where a group's scenes
        without valid depth are reported: one host read per log step, not per step."""
        if self._scenes_without_depth is not None and int(self._scenes_without_depth):
            from vggt_fsdp.data.split_scenes import no_depth_error

            raise no_depth_error(int(self._scenes_without_depth))
        return self.loader.data_counts()

    def oom_report(self, step: int, shape: StepShape | None) -> str:
        from vggt_fsdp.train.faults import oom_report

        return oom_report(step, shape, self.recipe)


def fit_frames_per_gpu(recipe, world: int, device_bytes: int, gpus_per_node: int) -> int:
    """The largest frames per GPU the memory planner fits in `device_bytes` (worst scene split of
    data.frames_range at the tallest aspect); raises when not even the largest scene fits."""
    from vggt_fsdp.memory.planner import resolve_frames_per_gpu

    return resolve_frames_per_gpu(recipe, device_bytes, "cuda", gpus=world, gpus_per_node=gpus_per_node)


def frames_per_gpu(recipe, device: torch.device, world: int) -> int:
    value = recipe.data.frames_per_gpu
    if value != "auto":
        return value
    if device.type != "cuda":
        raise ValueError("data.frames_per_gpu=auto plans GPU memory and needs a CUDA device; on "
                         f"{device.type} set data.frames_per_gpu=N")
    gpus_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))
    total = torch.cuda.get_device_properties(device).total_memory
    frames = torch.tensor(fit_frames_per_gpu(recipe, world, total, gpus_per_node), device=device)
    if dist.is_initialized():  # every rank must take the same batch shapes: the smallest GPU decides
        dist.all_reduce(frames, op=dist.ReduceOp.MIN)
    log(f"data.frames_per_gpu=auto: the memory planner fits {int(frames)} frames per GPU")
    return int(frames)


class VGGTBuiltin:
    """The VGGT task as the trainer drives it (tasks/base.py's TrainingTask). `model`: a VGGT (or a
    subclass with more heads) built on the meta device; `new_modules`: its modules that
    model.init_weights lacks (initialised, reported)."""

    def __init__(self, recipe, model: nn.Module | None = None, new_modules: tuple[str, ...] = ()):
        from vggt_fsdp.model import build_model
        from vggt_fsdp.recipe import model_config

        self.recipe = recipe
        self.model_cfg = model_config(recipe.model)
        self.model = model if model is not None else build_model(self.model_cfg, device="meta")
        self.new_modules = tuple(new_modules)
        self.context = None  # the context-parallel group, made with the sharded model (materialize)
        self.name = recipe.model.preset + (" (+overrides)" if recipe.model.overrides else "")

    def problems(self, cuda: bool) -> list:
        from vggt_fsdp.train import preflight as checks

        recipe = self.recipe
        problems = checks.data_problems(recipe.data) + checks.freeze_problems(self.model, recipe.model.freeze)
        if recipe.data.frames_per_gpu == "auto" and not cuda:
            problems.append(checks.Problem("data.frames_per_gpu", "'auto' plans GPU memory, but this run has no "
                                           "GPU; set a number (e.g. data.frames_per_gpu=4)"))
        if recipe.model.init_weights:
            problems += checks.init_weights_problems(self.model, recipe.model.init_weights, self.new_modules)
        if recipe.train.batch_size is not None:
            problems.append(checks.Problem("train.batch_size", "the VGGT task batches by data.frames_per_gpu; "
                                           "remove train.batch_size"))
        return problems

    def before_sharding(self) -> None:
        freeze(self.model, self.recipe.model.freeze)

    def materialize(self, model: nn.Module, device: torch.device) -> None:
        from vggt_fsdp.model import materialize
        from vggt_fsdp.parallel.context import new_context_group
        from vggt_fsdp.parallel.materialize import one_process_init

        self.context = new_context_group(self.recipe.parallel.context_parallel)  # None for N = 1
        model.set_context(self.context)

        # As one process would with rank 0's random state, each rank keeping its shards (on the CPU, DTensor
        # alone draws every shard of a weight from the same local generator state: repeated rows).
        with one_process_init(device):
            materialize(model, device)
        if self.recipe.model.init_weights:
            load_initial_weights(model, self.recipe.model.init_weights, self.new_modules)

    def make_task(self, loader) -> "VGGTTask":
        agg = self.model_cfg.aggregator
        return VGGTTask(loader, self.recipe.loss, agg.patch_size, 1 + agg.num_register_tokens,
                        tracks=bool(self.recipe.model.heads.track), recipe=self.recipe, context=self.context)

    def start(self, model: nn.Module, device: torch.device, rank: int, world: int) -> Started:
        from vggt_fsdp.data import build_dataloader

        recipe = self.recipe
        budget = frames_per_gpu(recipe, device, world)
        loader = build_dataloader(recipe.data, rank=rank, world_size=world, split="train",
                                  frames_per_gpu=budget, pin_memory=device.type == "cuda",
                                  context_parallel=recipe.parallel.context_parallel)
        task = self.make_task(loader)
        validate = None
        if recipe.train.val_every:
            from vggt_fsdp.train.validation import Validator

            validate = Validator(recipe, model, task, device, rank, world, budget)
        return Started(task, validate, {"checkpoint_heads": recipe.parallel.checkpoint.heads,
                                        "frames_per_gpu": budget,
                                        "context_parallel": recipe.parallel.context_parallel})
