"""Measure training steps of one recipe at one fixed shape on the current device.

    python -m benchmarks.bench_step RECIPE --frames 24 --image 518x518 [--world-size 8] [--gpu-memory 40]
        [--warmup 2] [--steps 5] [--json OUT.json] [key=value ...]

What one run reports (as JSON, also on stdout):
- step time after warm-up (median, min, max, standard deviation), frames/s and tokens/s per GPU;
- model FLOPs per step (forward + backward, counted once on a plain copy of the model without
  checkpointing, so recompute is excluded: see `benchmarks.flops`), achieved TFLOP/s and MFU against
  the card's dense BF16 peak;
- memory. On CUDA: peak allocated and reserved device memory from the first step on (warm-up included:
  the optimizer state appears at the first step; the sharded model is already there). On the CPU there
  is no device allocator to read, so it reports one rank's model states (FSDPMemTracker), the bytes the
  autograd graph saves for backward in one forward (activations) and the process's peak resident
  memory; all labelled CPU, none a GPU figure;
- the FSDP units' communication volumes, for the communication model of the report.

`--world-size N` runs the model sharded as rank 0 of N over a fake process group: every buffer has its
true size and collectives cost nothing, so memory is one GPU's share of an N-GPU run and step time is
its compute without communication. `--gpu-memory G` caps the process's CUDA allocator at G GiB to
emulate a smaller card on a larger one. Running out of memory is a result (status "oom"), not a crash.

The batch is fixed: `--frames` frames per GPU as `frames / frames-per-scene` scenes of
`--frames-per-scene` frames (default: the largest whole-scene split with at most 24 frames a scene,
upstream's largest scene: 48 frames are 2 scenes of 24),
made once by the synthetic data source and reused, so the loader is not measured here.

`--mix N` measures a realistic mix instead: the first N batches the recipe's own sampler draws at
`--frames` frames per GPU and the image width of `--image` (scenes of S frames over data.frames_range,
batch = floor(frames / S) scenes, aspect ratios over data.aspect_range, as in training; the draw is
fixed by data.seed, so two configurations of one run see the same sequence). The timed steps are the N
batches once each, after one untimed step on each of them (every shape warmed up) and `--warmup` more;
frames/s and MFU are totals over the sequence.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

from benchmarks.comm_model import unit_volumes
from benchmarks.flops import count_step_flops, mfu, peak_tflops

GIB = 2**30
MAX_FRAMES_PER_SCENE = 24  # upstream draws 2..24 frames per scene
GPUS_PER_NODE = 8


@dataclass
class BenchSpec:
    """One configuration to measure."""

    recipe: str
    frames_per_gpu: int
    height: int
    width: int
    overrides: list[str] = field(default_factory=list)
    frames_per_scene: int | None = None  # None: the largest divisor of frames_per_gpu up to 24
    world_size: int = 1
    gpu_memory_gib: float | None = None
    warmup: int = 2
    steps: int = 5
    device: str = "auto"  # auto: cuda when available, else cpu
    peak_tflops: float | None = None  # None: from the device name (benchmarks.flops table)
    name: str = ""
    flops_cache: str | None = None  # JSON file of FLOP counts shared by the runs of one comparison
    profile: str | None = None  # CUDA only: profile one extra step, kernel time by kind, to this JSON file
    mix: int = 0  # 0: one fixed batch at the spec's shape; N: the recipe sampler's first N batches

    def __post_init__(self) -> None:
        if self.frames_per_scene is None and self.frames_per_gpu >= 1:
            # Whole scenes, as large as upstream draws them: 48 -> 2 x 24, 64 -> 4 x 16.
            self.frames_per_scene = max(d for d in range(1, MAX_FRAMES_PER_SCENE + 1) if self.frames_per_gpu % d == 0)
        if self.mix < 0:
            raise ValueError(f"mix must be >= 0 (0: one fixed batch), got {self.mix}")
        for key in ("frames_per_gpu", "frames_per_scene", "height", "width", "world_size", "steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not self.mix and self.frames_per_gpu % self.frames_per_scene:
            raise ValueError(
                f"frames_per_gpu={self.frames_per_gpu} is not a multiple of frames_per_scene="
                f"{self.frames_per_scene}; the batch is frames_per_gpu / frames_per_scene whole scenes"
            )
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise ValueError(f"gpu_memory_gib must be > 0, got {self.gpu_memory_gib}")

    @property
    def scenes(self) -> int:
        return self.frames_per_gpu // self.frames_per_scene


# --------------------------------------------------------------------------------------- environment
def resolve_device(name: str) -> torch.device:
    """The device to measure on, with its index (CUDA memory calls refuse a bare "cuda")."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be auto, cpu or cuda[:i], got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but torch {torch.__version__} sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def describe_device(device: torch.device) -> dict:
    """Provenance of a result: which device, which software."""
    info = {
        "type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device.index)
        info.update(name=props.name, total_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}")
    else:
        info.update(name=f"CPU ({platform.processor() or platform.machine()})", total_memory_bytes=None)
    return info


def device_slug(info: dict) -> str:
    """A file-name-friendly device name: 'cpu', 'nvidia-h200', ..."""
    if info["type"] == "cpu":
        return "cpu"
    return "-".join("".join(c if c.isalnum() else " " for c in info["name"].lower()).split())


def cap_device_memory(device: torch.device, gib: float) -> dict:
    """Cap this process's CUDA caching allocator at `gib` GiB, to emulate a card of that size.

    A card with no more memory than the cap needs none (an 80 GiB cap on an 80 GB card): its own memory
    is the limit, and the result says so.
    """
    if device.type != "cuda":
        raise ValueError(f"--gpu-memory caps a CUDA device's allocator; the device here is {device}")
    total = torch.cuda.get_device_properties(device.index).total_memory
    cap = int(gib * GIB)
    if cap >= total:
        return {"requested_bytes": cap, "cap_bytes": total, "applied": False,
                "note": f"the card has {total / GIB:.1f} GiB, not more than the {gib:g} GiB asked: no cap needed"}
    torch.cuda.set_per_process_memory_fraction(cap / total, device.index)
    return {"requested_bytes": cap, "cap_bytes": cap, "applied": True}


# --------------------------------------------------------------------------------------- the run
@dataclass
class Workload:
    """What the timed steps run: a sharded model, its optimizer and its batches (one fixed batch, or
    the sampler's sequence with --mix), taken in turn."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    update: Callable[[int], None]  # batch i: forward, loss, backward, clipping, optimizer step (gradients kept)
    forward: Callable[[], object]  # the first batch's forward alone
    shapes: list  # StepShape of each batch (vggt_fsdp.train.faults): scenes, frames, image size, tokens
    params_total: int
    params_trainable: int
    taken: int = 0  # steps taken so far: the next step uses batch taken % len(shapes)

    def step(self) -> None:
        """One training step, as the trainer takes it: the update, then gradients freed."""
        self.update(self.taken % len(self.shapes))
        self.taken += 1
        self.optimizer.zero_grad(set_to_none=True)


def _recipe(spec: BenchSpec):
    from vggt_fsdp.recipe import load_recipe

    return load_recipe(spec.recipe, spec.overrides)


def autocast_context(recipe, device: torch.device):
    """bf16 autocast around forward when the recipe's Accelerate section asks for bf16 mixed precision,
    as `accelerator.prepare` does in the trainer (FSDP2 casts the parameters; autocast the activations)."""
    mixed = recipe.accelerate.get("mixed_precision", "no")
    if mixed == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if mixed in ("no", None):
        return contextlib.nullcontext()
    raise ValueError(f"accelerate.mixed_precision={mixed!r} is not benchmarked; valid: bf16, no")


def flops_key(spec: BenchSpec, recipe, device: torch.device) -> str:
    """What model FLOPs depend on: the architecture, the frozen parameters, the batch shape, the device
    type (which attention kernels are counted); not the sharding, precision or checkpointing."""
    from vggt_fsdp.recipe import model_config

    arch = model_config(recipe.model).to_dict()
    arch.pop("keep_all_layers")  # which layer outputs stay alive changes memory, not FLOPs
    return json.dumps({"model": arch, "freeze": recipe.model.freeze, "device": device.type,
                       "scenes": spec.scenes, "frames_per_scene": spec.frames_per_scene,
                       "image": [spec.height, spec.width], "context_parallel": recipe.parallel.context_parallel},
                      sort_keys=True)


def context_stand_in(recipe):
    """With parallel.context_parallel N > 1 the benchmark is one rank's share: `frames_per_scene` are its
    frames of scenes N times longer, its global attention runs over all of them with H/N heads, and the
    other ranks' frames are stood in for by its own (parallel.context.StandInGroup; no exchange is
    measured). None for N = 1."""
    from vggt_fsdp.parallel.context import StandInGroup

    size = recipe.parallel.context_parallel
    return StandInGroup(size) if size > 1 else None


def count_flops(spec: BenchSpec, recipe, device: torch.device) -> dict:
    """Model FLOPs of one step at the spec's shape, on a plain un-checkpointed copy of the model.

    Runs before the memory cap and before the measured model exists; everything it allocates is freed.
    With `spec.flops_cache` (a JSON file), a count made for the same `flops_key` by an earlier run is
    reused: a comparison measures several configurations of one model at one shape.
    """
    cache = Path(spec.flops_cache) if spec.flops_cache else None
    key = flops_key(spec, recipe, device)
    known = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    if key in known:
        return {**known[key], "cached": True}
    counted = _count_flops(spec, recipe, device)
    if cache is not None:
        cache.write_text(json.dumps({**known, key: counted}))
    return counted


def _count_flops(spec: BenchSpec, recipe, device: torch.device) -> dict:
    from vggt_fsdp.model import build_model
    from vggt_fsdp.recipe import model_config
    from vggt_fsdp.tasks.vggt import freeze

    model = build_model(model_config(recipe.model), device)
    freeze(model, recipe.model.freeze)
    model.set_context(context_stand_in(recipe))

    def images(scenes: int, frames: int) -> torch.Tensor:
        return torch.rand(scenes, frames, 3, spec.height, spec.width, device=device)

    with autocast_context(recipe, device):
        flops = count_step_flops(model, images, spec.scenes, spec.frames_per_scene)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"forward": flops.forward, "backward": flops.backward, "total": flops.total}


def batches_for(spec: BenchSpec, recipe) -> list[dict[str, torch.Tensor]]:
    """The host batches the timed steps take: `fixed_batch`, or with --mix the sampler's sequence."""
    return sampled_batches(spec, recipe) if spec.mix else [fixed_batch(spec, recipe)]


def sampled_batches(spec: BenchSpec, recipe) -> list[dict[str, torch.Tensor]]:
    """The first `spec.mix` batches of the recipe's sampler at `spec.frames_per_gpu` frames per GPU and
    `spec.width` pixels wide: scene lengths, batch sizes and aspect ratios vary as in training, the
    contents come from the synthetic source (no dataset on the benchmark machine), without augmentation."""
    import itertools

    from vggt_fsdp.data import build_dataloader

    # Scenes no longer than the frame budget (the planner's clip_range), as a trainer at this budget draws them.
    low, high = recipe.data.frames_range
    frames_range = [min(low, spec.frames_per_gpu), min(high, spec.frames_per_gpu)]
    cfg = dataclasses.replace(recipe.data, source="synthetic", root=None, image_width=spec.width, num_workers=0,
                              frames_range=frames_range,
                              augment=dataclasses.replace(recipe.data.augment, enabled=False))
    loader = build_dataloader(cfg, frames_per_gpu=spec.frames_per_gpu, num_workers=0)
    return list(itertools.islice(iter(loader), spec.mix))


def fixed_batch(spec: BenchSpec, recipe) -> dict[str, torch.Tensor]:
    """One batch of the recipe's data source at exactly the spec's shape, on the host.

    The built-in synthetic source (whatever the recipe reads: no dataset needed on the benchmark
    machine) with the recipe's other data settings, the frame count, aspect ratio and width pinned to
    the spec's, no augmentation and no worker processes: its contents are realistic inputs for the losses, its cost
    is not measured (benchmarks/bench_data.py measures the loader).
    """
    from vggt_fsdp.data import build_dataloader

    data = recipe.data
    if spec.height % data.patch_size:
        raise ValueError(f"height {spec.height} is not a multiple of data.patch_size {data.patch_size}")
    aspect = spec.height / spec.width
    cfg = dataclasses.replace(
        data, source="synthetic", root=None, frames_range=[spec.frames_per_scene, spec.frames_per_scene],
        aspect_range=[aspect, aspect],
        image_width=spec.width, num_workers=0, augment=dataclasses.replace(data.augment, enabled=False))
    batch = next(iter(build_dataloader(cfg, frames_per_gpu=spec.frames_per_gpu, num_workers=0)))
    got = tuple(batch["images"].shape)
    want = (spec.scenes, spec.frames_per_scene, 3, spec.height, spec.width)
    if got != want:
        raise RuntimeError(f"the data source made a batch of shape {got}, expected {want}")
    return batch


def build_workload(spec: BenchSpec, recipe, device: torch.device,
                   host_batches: list[dict[str, torch.Tensor]] | None = None) -> Workload:
    """The trainer's pieces in the trainer's order, for one fixed batch: meta build, freeze, shard,
    materialise, AdamW, the trainer's forward and loss (`VGGTTask`), per-group clipping.

    Call inside the (fake) process group: sharding builds its device mesh from it.
    """
    from vggt_fsdp.data import move_batch
    from vggt_fsdp.model import build_model, materialize
    from vggt_fsdp.parallel import apply_parallelism, build_mesh
    from vggt_fsdp.recipe import model_config
    from vggt_fsdp.tasks.vggt import VGGTTask, freeze
    from vggt_fsdp.train.optim import build_optimizer, clip_grad_norms, clip_groups

    cfg = model_config(recipe.model)
    model = build_model(cfg, "meta")
    freeze(model, recipe.model.freeze)
    params_total = sum(p.numel() for p in model.parameters())
    params_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    apply_parallelism(model, recipe.parallel, build_mesh(recipe.parallel.sharding, device.type))
    materialize(model, device)
    stand_in = context_stand_in(recipe)
    model.set_context(stand_in)
    optimizer = build_optimizer(model, recipe.optim, device.type)
    groups = clip_groups(model, recipe.optim.clip_groups)
    task = VGGTTask(None, recipe.loss, cfg.aggregator.patch_size, 1 + cfg.aggregator.num_register_tokens,
                    tracks=bool(recipe.model.heads.track))
    host_batches = batches_for(spec, recipe) if host_batches is None else host_batches
    batches = [move_batch(batch, device) for batch in host_batches]
    if stand_in is not None:  # the whole scenes' ground truth a rank holds for the loss (data/split_scenes.py)
        from vggt_fsdp.data.split_scenes import FRAME_KEYS

        batches = [{k: stand_in.gather_frames(v) if k in FRAME_KEYS else v for k, v in b.items()} for b in batches]

    def update(index: int) -> None:
        loss, _ = task.loss(model, batches[index])
        loss.backward()
        clip_grad_norms(groups, torch.nn.utils.clip_grad_norm_)
        optimizer.step()

    return Workload(model, optimizer, update, lambda: task.predict(model, batches[0]),
                    [task.shape(batch) for batch in batches], params_total, params_trainable)


def volumes_only(spec: BenchSpec) -> dict:
    """The FSDP units' communication volumes of the recipe's model at the spec's world size, without
    running it: built on the meta device and sharded over a fake process group (no memory, seconds)."""
    from vggt_fsdp.memory.fake_pg import fake_process_group
    from vggt_fsdp.model import build_model
    from vggt_fsdp.parallel import apply_parallelism, build_mesh
    from vggt_fsdp.recipe import model_config
    from vggt_fsdp.tasks.vggt import freeze

    result: dict = {"name": spec.name, "spec": asdict(spec), "status": "ok", "kind": "volumes"}
    try:
        recipe = _recipe(spec)
        model = build_model(model_config(recipe.model), "meta")
        freeze(model, recipe.model.freeze)
        result["model"] = {"preset": recipe.model.preset, "params": sum(p.numel() for p in model.parameters())}
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(min(spec.world_size, GPUS_PER_NODE)))
        with fake_process_group(spec.world_size, "cpu"):
            apply_parallelism(model, recipe.parallel, build_mesh(recipe.parallel.sharding, "cpu"))
            result["comm_units"] = [asdict(v) for v in unit_volumes(model)]
    except Exception as err:
        result.update(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Run `warmup` untimed steps, then time `steps` steps one by one (device synchronised)."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def warm_each_batch(workload: Workload, device: torch.device) -> None:
    """One untimed step on every batch of a mix, then back to its first batch: each shape's first-call
    costs (cuDNN plans, compiled graphs, allocator growth) stay out of the timed pass."""
    for _ in workload.shapes:
        workload.step()
    _sync(device)
    workload.taken = 0


def summarise_times(times: list[float]) -> dict:
    return {
        "all": times,
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "stdev": statistics.stdev(times) if len(times) > 1 else 0.0,
    }


def _peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def run_benchmark(spec: BenchSpec) -> dict:
    """Measure one configuration. Out of memory gives status "oom"; any other failure status "error";
    `phase` says how far the run got."""
    device = resolve_device(spec.device)
    result: dict = {"name": spec.name, "spec": asdict(spec), "device": describe_device(device), "status": "ok"}
    try:
        _measure(spec, device, result)
    except torch.OutOfMemoryError as err:
        result.update(status="oom", error=str(err).splitlines()[0])
        result["memory"] = _memory(device)
    except Exception as err:  # recorded, so that one broken configuration does not hide the others
        result.update(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    return result


def _measure(spec: BenchSpec, device: torch.device, result: dict) -> None:
    from vggt_fsdp.memory.fake_pg import fake_process_group

    result["phase"] = "setup"
    recipe = _recipe(spec)
    result["parallel"] = _parallel_summary(recipe, spec)
    result["phase"] = "batches"
    host_batches = batches_for(spec, recipe)
    result["phase"] = "flop count"
    result["flops"] = _batch_flops(spec, recipe, device, host_batches)
    if spec.gpu_memory_gib is not None:
        result["memory_cap"] = cap_device_memory(device, spec.gpu_memory_gib)
    # Hybrid sharding shards over the GPUs of a node, which a launcher announces; the fake group's
    # "node" is up to GPUS_PER_NODE of its ranks.
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(min(spec.world_size, GPUS_PER_NODE)))
    with fake_process_group(spec.world_size, device):
        result["phase"] = "build"
        workload = build_workload(spec, recipe, device, host_batches)
        result["model"] = {"preset": recipe.model.preset, "params": workload.params_total,
                           "trainable_params": workload.params_trainable}
        result.update(_comm_units(workload.model))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        if spec.mix:
            result["phase"] = "warm-up per shape"
            warm_each_batch(workload, device)
        result["phase"] = "steps"
        times = time_steps(workload.step, spec.warmup, spec.steps, device)
        result["memory"] = _memory(device)
        if "memory_cap" in result:
            # The cap binds the caching allocator; a run that reserved more did not emulate the card.
            peak_reserved = result["memory"]["peak_reserved_bytes"]
            result["memory"]["cap_respected"] = peak_reserved <= result["memory_cap"]["cap_bytes"]
        if spec.profile is not None:
            from benchmarks.kernel_profile import profile_step

            result["phase"] = "profile"
            result["profile"] = profile_step(workload.step, device, Path(spec.profile))
        if device.type == "cpu":
            result["phase"] = "CPU memory counts"
            result["memory"].update(_cpu_memory(workload, device))
    result.update(_throughput(spec, result, times, workload, device))
    result["phase"] = "done"


def _batch_flops(spec: BenchSpec, recipe, device: torch.device, host_batches: list[dict]) -> dict:
    """Model FLOPs of the first batch (`forward`, `backward`, `total`) and, with --mix, of every batch of
    the sequence (`per_batch`), each shape counted once."""
    if not spec.mix:
        return _flops_or_none(spec, recipe, device)
    per_batch = []
    for batch in host_batches:
        b, s, _, h, w = batch["images"].shape
        shape_spec = dataclasses.replace(spec, frames_per_gpu=b * s, frames_per_scene=s, height=h, width=w, mix=0)
        per_batch.append(_flops_or_none(shape_spec, recipe, device))
    totals = [f["total"] for f in per_batch]
    return {**per_batch[0], "per_batch": totals, "sequence_total": None if None in totals else sum(totals)}


def _flops_or_none(spec: BenchSpec, recipe, device: torch.device) -> dict:
    """The FLOP count, or why there is none: a count that runs out of memory (its un-checkpointed model
    is larger than the measured one) leaves the run without MFU, not without a measurement."""
    try:
        return count_flops(spec, recipe, device)
    except torch.OutOfMemoryError as err:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"forward": None, "backward": None, "total": None,
                "error": f"out of memory while counting: {str(err).splitlines()[0]}"}


def _comm_units(model: torch.nn.Module) -> dict:
    """The units' communication volumes, or why they could not be read (FSDP2 internals changed)."""
    try:
        return {"comm_units": [asdict(v) for v in unit_volumes(model)]}
    except (AttributeError, ValueError) as err:
        return {"comm_units": None, "comm_units_error": f"{type(err).__name__}: {err}"}


def _cpu_memory(workload: Workload, device: torch.device) -> dict:
    """No device allocator to read on the CPU. Instead, exactly: the model states one rank holds
    (FSDPMemTracker over one more step) and the activations one forward keeps for backward."""
    from vggt_fsdp.memory.accounting import count_saved_bytes, measure_model_state

    states = measure_model_state(workload.model, workload.optimizer, lambda: workload.update(0), device)
    workload.optimizer.zero_grad(set_to_none=True)
    saved, _ = count_saved_bytes(workload.forward)  # last: a forward without its backward
    return {"model_state_bytes": states.sharded_params + states.sharded_grads + states.optimizer_state,
            "saved_tensor_bytes": saved.total_bytes}


def _parallel_summary(recipe, spec: BenchSpec) -> dict:
    from vggt_fsdp.recipe import model_config

    par = recipe.parallel
    return {
        "world_size": spec.world_size,
        "sharding": par.sharding.mode,
        "reshard_after_forward": par.sharding.reshard_after_forward,
        "cpu_offload": par.sharding.cpu_offload,
        "param_dtype": par.precision.param_dtype,
        "reduce_dtype": par.precision.reduce_dtype,
        "checkpoint": par.checkpoint.policy,
        "checkpoint_n": par.checkpoint.n,
        "checkpoint_groups": {k: asdict(v) for k, v in par.checkpoint.groups.items()},
        "checkpoint_heads": par.checkpoint.heads,
        "keep_all_layers": model_config(recipe.model).keep_all_layers,
        # N > 1: one rank's share, the exchange stood in for by local copies (context_stand_in)
        "context_parallel": par.context_parallel,
    }


def _memory(device: torch.device) -> dict:
    memory = {"kind": device.type, "host_rss_bytes": psutil.Process().memory_info().rss,
              "host_peak_rss_bytes": _peak_rss_bytes()}
    if device.type == "cuda":
        memory.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(device.index),
                      peak_reserved_bytes=torch.cuda.max_memory_reserved(device.index))
    return memory


def _throughput(spec: BenchSpec, result: dict, times: list[float], workload: Workload,
                device: torch.device) -> dict:
    timing = summarise_times(times)
    peak = spec.peak_tflops if spec.peak_tflops is not None else (
        peak_tflops(result["device"]["name"]) if device.type == "cuda" else None)
    if spec.mix:
        return {"timing": timing, **_mix_throughput(spec, result, times, workload, peak)}
    median = timing["median"]
    first = workload.shapes[0]
    flops = result["flops"]["total"]
    achieved = None if flops is None else flops / median / 1e12
    return {
        "timing": timing,
        "shape": {"frames_per_gpu": spec.frames_per_gpu, "scenes": spec.scenes,
                  "frames_per_scene": spec.frames_per_scene, "height": spec.height, "width": spec.width,
                  "tokens_per_frame": first.tokens // first.frames},
        "throughput": {
            "frames_per_s": spec.frames_per_gpu / median,
            "tokens_per_s": first.tokens / median,
            "achieved_tflops": achieved,
            "peak_tflops": peak,
            "mfu": None if flops is None else mfu(flops, median, peak),
        },
    }


def _mix_throughput(spec: BenchSpec, result: dict, times: list[float], workload: Workload,
                    peak: float | None) -> dict:
    """Totals over the timed sequence (the timed steps took batches warmup, warmup + 1, ... in turn)."""
    n = len(workload.shapes)
    order = [(spec.warmup + i) % n for i in range(len(times))]
    elapsed = sum(times)
    frames = sum(workload.shapes[i].frames for i in order)
    tokens = sum(workload.shapes[i].tokens for i in order)
    per_batch = result["flops"].get("per_batch")
    flops = None if per_batch is None or None in per_batch else sum(per_batch[i] for i in order)
    return {
        "shape": {"frames_per_gpu": spec.frames_per_gpu, "mix": [asdict(workload.shapes[i]) for i in order]},
        "throughput": {
            "frames_per_s": frames / elapsed,
            "tokens_per_s": tokens / elapsed,
            "achieved_tflops": None if flops is None else flops / elapsed / 1e12,
            "peak_tflops": peak,
            "mfu": None if flops is None else mfu(flops, elapsed, peak),
        },
    }


# --------------------------------------------------------------------------------------- CLI
def parse_image(text: str) -> tuple[int, int]:
    """'518x518' or '518' -> (height, width)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values, default=0) < 1:
        raise argparse.ArgumentTypeError(f"image size must be HxW or S (e.g. 518x518), got {text!r}")
    return (values[0], values[-1])


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m benchmarks.bench_step",
                                               description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    parser.add_argument("--frames", type=int, required=True, help="frames per GPU per step")
    parser.add_argument("--frames-per-scene", type=int, default=None,
                        help="frames per scene (default: the largest divisor of --frames up to "
                             f"{MAX_FRAMES_PER_SCENE})")
    parser.add_argument("--image", type=parse_image, default=(518, 518), help="HxW (default 518x518)")
    parser.add_argument("--world-size", type=int, default=1,
                        help="measure one GPU's share of an N-GPU run (fake process group)")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                        help="cap this process's CUDA memory at GIB GiB (emulate a smaller card)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense BF16 peak of the device for MFU (default: from the device name)")
    parser.add_argument("--name", default="", help="label of this configuration in reports")
    parser.add_argument("--json", type=Path, default=None, help="also write the result to this file")
    parser.add_argument("--flops-cache", default=None, metavar="JSON",
                        help="reuse/record FLOP counts in this file (same model and shape: counted once)")
    parser.add_argument("--profile", default=None, metavar="JSON",
                        help="CUDA: profile one more step and write its device time by kernel kind here")
    parser.add_argument("--mix", type=int, default=0, metavar="N",
                        help="time the recipe sampler's first N batches (scene lengths and aspect ratios as "
                             "in training) instead of one fixed batch; --steps is then N")
    parser.add_argument("--volumes-only", action="store_true",
                        help="only the FSDP units' communication volumes at --world-size (meta device, no steps)")
    return parser


def spec_from_args(args: argparse.Namespace) -> BenchSpec:
    return BenchSpec(recipe=args.recipe, overrides=list(args.overrides), frames_per_gpu=args.frames,
                     frames_per_scene=args.frames_per_scene, height=args.image[0], width=args.image[1],
                     world_size=args.world_size, gpu_memory_gib=args.gpu_memory, warmup=args.warmup,
                     steps=args.mix or args.steps, device=args.device, peak_tflops=args.peak_tflops, name=args.name,
                     flops_cache=args.flops_cache, profile=args.profile, mix=args.mix)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
    except ValueError as err:
        print(f"bench_step: {err}", file=sys.stderr)
        return 2
    result = volumes_only(spec) if args.volumes_only else run_benchmark(spec)
    result["command"] = shlex.join(["python", "-m", "benchmarks.bench_step", *(sys.argv[1:] if argv is None else argv)])
    text = json.dumps(result, indent=1, default=str)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(text)
    if result["status"] == "error":
        print(result.get("traceback", ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
