"""Measure one GPU's share of an N-GPU training step on one device, for checking the planner.

`measure_step` builds VGGT on the meta device, shards it with the recipe's `parallel:` policy over a fake
process group of `world_size` ranks (rank 0), materialises it on `device`, creates the AdamW state (a
zero-gradient step: the steady state of training, without spending a real step on it), then runs one
measured step (forward, backward, AdamW step, zero_grad) and returns:

- the exact saved-tensor bytes of the forward pass (total and per block group),
- on the CPU, FSDPMemTracker's model-state terms and peak,
- on CUDA, `torch.cuda.max_memory_allocated` over the measured step.

The loss is the mean of every output (cheap, touches every head); the training loss's own temporaries
are not part of what the planner predicts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch

from vggt_fsdp.memory.accounting import (
    ModelStateMeasurement,
    SavedTensorCounter,
    SavedTensorReport,
    cuda_peak_memory,
    measure_model_state,
)
from vggt_fsdp.memory.fake_pg import fake_process_group
from vggt_fsdp.model.config import VGGTConfig


@dataclass
class StepMeasurement:
    saved: SavedTensorReport
    model_state: ModelStateMeasurement | None = None  # CPU (FSDPMemTracker)
    cuda: dict[str, int] = field(default_factory=dict)  # CUDA: peak_bytes, baseline_bytes, peak_reserved_bytes
    seconds: float = 0.0

    @property
    def peak_bytes(self) -> int:
        """The step's peak: max_memory_allocated on CUDA, FSDPMemTracker's total on the CPU."""
        if self.cuda:
            return self.cuda["peak_bytes"]
        assert self.model_state is not None
        return self.model_state.peak_total


def block_groups(model) -> dict[str, list]:
    """The saved-tensor groups the planner's block terms correspond to (and its track head terms)."""
    agg = model.aggregator
    groups = {"dino": list(agg.patch_embed.blocks), "frame": list(agg.frame_blocks), "global": list(agg.global_blocks)}
    if model.track_head is not None:
        groups["track"] = [model.track_head]
    return groups


def _mesh(parallel_cfg, world_size: int, device_type: str, gpus_per_node: int):
    from torch.distributed.device_mesh import init_device_mesh

    from vggt_fsdp.parallel.sharding import mesh_shape

    shape = mesh_shape(parallel_cfg.sharding, world_size, min(world_size, gpus_per_node))
    names = ("shard",) if len(shape) == 1 else ("replicate", "shard")
    return init_device_mesh(device_type, shape, mesh_dim_names=names)


def _loss(outputs: dict) -> torch.Tensor:
    tensors = [v for v in outputs.values() if torch.is_tensor(v) and v.is_floating_point() and v.requires_grad]
    tensors += [t for t in outputs.get("pose_enc_list", [])]
    return sum(t.float().mean() for t in tensors)


def _create_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """One AdamW step on zero gradients: the state every later step has, at no compute cost."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.requires_grad:
                param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_step(
    model_cfg: VGGTConfig,
    parallel_cfg,
    world_size: int,
    scenes: int,
    frames: int,
    image_hw: tuple[int, int],
    device: str | torch.device = "cpu",
    *,
    gpus_per_node: int = 8,
    seed: int = 0,
    freeze: tuple[str, ...] = (),
    track_points: int = 0,
) -> StepMeasurement:
    """`freeze`: parameter-name patterns (fnmatch) made non-trainable, as the recipe's model.freeze.
    `track_points`: query points per scene for the track head (random pixels of the first frame)."""
    from vggt_fsdp.model.init import materialize
    from vggt_fsdp.model.vggt import build_model
    from vggt_fsdp.parallel import apply_parallelism

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # memory statistics want an explicit index
        device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(seed)
    start = time.perf_counter()
    with fake_process_group(world_size, device):
        model = build_model(model_cfg, device="meta")
        for name, param in model.named_parameters():
            if any(fnmatchcase(name, pattern) for pattern in freeze):
                param.requires_grad_(False)
        apply_parallelism(model, parallel_cfg, mesh=_mesh(parallel_cfg, world_size, device.type, gpus_per_node))
        materialize(model, device)
        model.train()
        # Fused AdamW on CUDA as the trainer uses it; foreach on the CPU (no fused CPU kernel assumed).
        cuda = device.type == "cuda"
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6,
                                      fused=cuda, foreach=None if cuda else True)
        images = torch.rand(scenes, frames, 3, *image_hw, device=device)
        scale = torch.tensor([image_hw[1] - 1.0, image_hw[0] - 1.0], device=device)
        queries = torch.rand(scenes, track_points, 2, device=device) * scale if track_points else None

        def step(counter: SavedTensorCounter | None = None) -> None:
            if counter is not None:
                with counter:
                    outputs = model(images, query_points=queries)
            else:
                outputs = model(images, query_points=queries)
            _loss(outputs).backward()
            del outputs
            optimizer.step()

        _create_optimizer_state(optimizer)
        counter = SavedTensorCounter(block_groups(model))
        result = StepMeasurement(saved=counter.report)
        if cuda:
            with cuda_peak_memory(device) as peak:
                step(counter)
                optimizer.zero_grad(set_to_none=True)
            result.cuda = peak
        else:
            result.model_state = measure_model_state(model, optimizer, lambda: step(counter), device)
            optimizer.zero_grad(set_to_none=True)
        del model, optimizer
    result.seconds = time.perf_counter() - start
    return result
