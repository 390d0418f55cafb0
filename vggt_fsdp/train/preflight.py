"""Preflight: everything about a recipe that can be checked without a GPU, before any process starts.

`vggt-fsdp train` runs it before launching, and the trainer's rank 0 again before building anything
heavy (a launcher other than `vggt-fsdp train` skips the first). Recipe loading has already checked
types, ranges and combinations; preflight checks the recipe against the world and the task's model
(`vggt_fsdp.tasks.preflight` adds the task's own checks: the VGGT task's are the data, initial-weights,
freeze and frames-per-GPU ones below):

- train.output_dir: a writable directory (or creatable: tried, not guessed from permission bits, which
  root passes everywhere, /proc included), not held by a live trainer (lock.py);
- the model's size: its fp32 parameters, gradients and AdamW state (the planner's state terms, from the
  meta-device model) must fit the card the recipe states and this host's memory;
- data roots, model.init_weights and a train.resume path: present and readable;
- resuming: no change against the checkpoint's recipe that a resume cannot honour (resume_check.py);
- model.init_weights: tensor names and shapes against the model, from the file's header only;
- model.freeze, parallel.layout (block and attention types, units, groups), parallel.precision.fp32_modules
  and parallel.checkpoint.n against the model built on the meta device (no memory);
- data.frames_per_gpu: auto only where there is a GPU to plan for.

A pattern that matches nothing is an error unless it names a module the recipe disabled (a head set to
None): a typo would otherwise silently train what it meant to freeze, or compute a head in bf16. Each
problem is one line: the recipe key, what is wrong and the fix.
"""
from __future__ import annotations

import difflib
import os
from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn

from vggt_fsdp.parallel.config import ParallelConfig


@dataclass(frozen=True)
class Problem:
    key: str  # dotted recipe key
    message: str  # what is wrong and the fix

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class PreflightError(ValueError):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))

    def __reduce__(self):  # pickled to reach every rank
        return PreflightError, (self.problems,)


def preflight(recipe, model: nn.Module, *, cuda: bool | None = None, check_lock: bool = True) -> list[Problem]:
    """The problems of the world and the layout (empty: go); the task's own (data, frozen parameters,
    initial weights: tasks/vggt.py) come from `vggt_fsdp.tasks.preflight`, which calls this. `model`:
    the task's model, untouched (not frozen or sharded), on any device. `cuda`: whether the run gets
    CUDA devices (default: the recipe's accelerate.use_cpu and this machine). `check_lock`: report a live
    trainer holding output_dir (the trainer itself takes the lock instead)."""
    problems = output_dir_problems(recipe.train.output_dir, check_lock)
    problems += device_problems(recipe, cuda)
    problems += resume_problems(recipe.train.resume)
    problems += resume_recipe_problems(recipe)
    layout = layout_problems(model, recipe.parallel)
    problems += layout or model_state_problems(recipe, model)  # sizing needs a valid layout
    problems += tracker_problems(recipe.train.log_with)
    return problems


def tracker_problems(log_with: list[str]) -> list[Problem]:
    from vggt_fsdp.train import metrics

    return [Problem("train.log_with", text) for text in metrics.tracker_problems(log_with)]


def check(problems: list[Problem]) -> None:
    """Raise PreflightError with every problem, if any."""
    if problems:
        raise PreflightError(problems)


# ------------------------------------------------------------------------------------- the world
def output_dir_problems(output_dir: str, check_lock: bool = True) -> list[Problem]:
    key, path = "train.output_dir", Path(output_dir)
    if path.exists() and not path.is_dir():
        return [Problem(key, f"{path} is a file, not a directory; name a directory")]
    existing = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        return [Problem(key, f"{path} cannot be created: {existing} is a file")]
    writable = os.access(existing, os.W_OK | os.X_OK)
    error = _cannot_write_in(existing) if writable else None
    if not writable or error:
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        why = f" ({error})" if error else " by this user"
        return [Problem(key, f"{path} {what}{why}; choose another directory or fix its permissions")]
    if check_lock and path.is_dir():
        from vggt_fsdp.train.lock import LockError, check_free

        try:
            busy = check_free(path)
        except LockError as err:
            busy = str(err)
        if busy:
            return [Problem(key, busy)]
    return []


def _cannot_write_in(directory: Path) -> str | None:
    """Why a directory cannot be made in `directory` (tried, then removed), or None."""
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".vggt-fsdp-preflight-", dir=directory))
    except OSError as err:
        return err.strerror or str(err)
    return None


def _readable_dir(path: str) -> str | None:
    p = Path(path)
    if not p.exists():
        return f"{p} does not exist"
    if not p.is_dir():
        return f"{p} is not a directory"
    if not os.access(p, os.R_OK | os.X_OK):
        return f"{p} is not readable by this user"
    return None


def _readable_file(path: str) -> str | None:
    p = Path(path)
    if not p.is_file():
        return f"{p} does not exist" if not p.exists() else f"{p} is not a file"
    if not os.access(p, os.R_OK):
        return f"{p} is not readable by this user"
    return None


def data_problems(data) -> list[Problem]:
    problems = []
    sources = data.source_configs()
    for i, source in enumerate(sources):
        where = "data" if len(sources) == 1 and not data.sources else f"data.sources[{i}]"
        if source.source == "synthetic":
            continue
        error = _readable_dir(source.root)
        if error:
            problems.append(Problem(f"{where}.root", f"{error}; point it at the {source.source} dataset"))
        annotations = source.co3d.annotation_dir if source.source == "co3d" else None
        if annotations and (error := _readable_dir(annotations)):
            problems.append(Problem(f"{where}.co3d.annotation_dir", f"{error}; point it at the folder of "
                                    "<category>_{train,test}.jgz files, or null for the source's root"))
    return problems


def device_problems(recipe, cuda: bool | None) -> list[Problem]:
    use_cpu = bool(recipe.accelerate.get("use_cpu", False))
    if cuda is None:
        cuda = not use_cpu and torch.cuda.is_available()
    problems = []
    if not use_cpu and not cuda:
        problems.append(Problem("accelerate.use_cpu", "false, but this machine has no CUDA device; run on a GPU "
                                "machine, or set accelerate.use_cpu=true with a CPU recipe"))
    return problems


def resume_problems(resume: str) -> list[Problem]:
    """A named checkpoint must be complete with its files present at their recorded sizes (the
    checksums are verified by the trainer, spread over its ranks)."""
    if resume in ("auto", "none"):
        return []
    from vggt_fsdp.train.checkpoint import MARKER, CheckpointError, marker_trust_problems, read_marker

    path, key = Path(resume), "train.resume"
    if error := _readable_dir(resume):
        return [Problem(key, f"{error}; valid: auto, none or a complete step-* checkpoint directory")]
    if not (path / MARKER).is_file():
        return [Problem(key, f"{path} is not a complete checkpoint (no {MARKER} marker); valid: auto, none or "
                        "a complete step-* directory")]
    try:
        marker = read_marker(path)
    except CheckpointError as err:
        return [Problem(key, f"{err}; name another checkpoint or train.resume=auto")]
    if untrusted := marker_trust_problems(marker):
        return [Problem(key, f"checkpoint {path} is not trusted: {'; '.join(untrusted)}; name another checkpoint "
                        "or train.resume=auto")]
    files = marker["files"]
    wrong = [name for name, record in files.items()
             if not (path / name).is_file() or (path / name).stat().st_size != record["size"]]
    if wrong:
        return [Problem(key, f"checkpoint {path} is damaged: {', '.join(sorted(wrong))} missing or of the wrong "
                        "size; name another checkpoint or train.resume=auto")]
    return []


def resume_recipe_problems(recipe) -> list[Problem]:
    """Changes against the recipe of the checkpoint this run would resume from that a resume cannot
    honour (resume_check.py's rule), one per key with both values. The trainer compares again with the
    checkpoint it actually loads (a damaged newest one falls back to an older one)."""
    from vggt_fsdp.train import resume_check
    from vggt_fsdp.train.checkpoint import CheckpointError, complete_checkpoints, is_complete, read_marker

    resume = recipe.train.resume
    if resume == "none":
        return []
    found = ([path for _, path in complete_checkpoints(Path(recipe.train.output_dir) / "checkpoints")]
             if resume == "auto" else [Path(resume)] if is_complete(Path(resume)) else [])
    if not found:
        return []
    try:
        marker = read_marker(found[-1])
    except CheckpointError:
        return []  # named by resume_problems or, with auto, by the trainer, which falls back
    saved, _ = resume_check.saved_recipe(found[-1], marker)
    if saved is None:
        return []
    changes = resume_check.compare(saved, recipe)
    return [Problem(key, message) for key, message in resume_check.refused(found[-1], changes)]


# ------------------------------------------------------------------------------------- the model
def disabled_modules(model: nn.Module) -> list[str]:
    """Paths of the sub-modules a model left out: attributes set to None (VGGT: the heads a recipe
    disables), registered as modules or not."""
    found = []
    for path, module in model.named_modules():
        slots = {**{k: v for k, v in vars(module).items() if not k.startswith("_")}, **module._modules}
        found += [f"{path}.{name}" if path else name for name, value in slots.items() if value is None]
    return found


def names_disabled(pattern: str, disabled: list[str]) -> bool:
    """Whether `pattern` names a disabled module or something inside one."""
    return any(fnmatchcase(path, pattern) or pattern.startswith(path + ".") for path in disabled)


def freeze_problems(model: nn.Module, patterns: list[str]) -> list[Problem]:
    names = [name for name, _ in model.named_parameters()]
    disabled, frozen, problems = disabled_modules(model), set(), []
    for i, pattern in enumerate(patterns):
        hits = {n for n in names if fnmatchcase(n, pattern)}
        frozen |= hits
        if not hits and not names_disabled(pattern, disabled):
            prefixes = sorted({n.split(".")[0] for n in names})
            problems.append(Problem(f"model.freeze[{i}]", f"{pattern!r} matches no parameter; parameter names "
                                    f"start with {prefixes} (e.g. 'aggregator.patch_embed.*')"))
    if names and frozen >= set(names):
        problems.append(Problem("model.freeze", f"{patterns} freeze every parameter: nothing would train; "
                                "narrow the patterns"))
    return problems


def layout_problems(model: nn.Module, cfg: ParallelConfig) -> list[Problem]:
    """The layout's patterns against the model, and what the plan would refuse at sharding time. A class
    or pattern that matches nothing is named with the closest name the model has ("did you mean") and,
    for classes, the model's repeated classes (the candidates for blocks and attention)."""
    from vggt_fsdp.parallel.sharding import find_blocks, plan_parallelism

    problems = type_problems(model, cfg)
    if problems:
        return problems  # the plan would only repeat the first of them
    try:
        blocks = find_blocks(model, cfg)
        plan = plan_parallelism(model, cfg)
    except ValueError as err:
        return [Problem("parallel.layout", str(err))]
    disabled = disabled_modules(model)
    modules = [path for path, _ in model.named_modules() if path]
    for i, pattern in enumerate(cfg.layout.units):
        if not any(fnmatchcase(p, pattern) for p in modules) and not names_disabled(pattern, disabled):
            problems.append(Problem(f"parallel.layout.units[{i}]", f"{pattern!r} matches no module"
                                    f"{did_you_mean(pattern, modules)}; top-level modules: "
                                    f"{[n for n, _ in model.named_children()]}"))
    for name, pattern in cfg.layout.groups.items():
        if not any(fnmatchcase(b, pattern) for b in blocks) and not names_disabled(pattern, disabled):
            problems.append(Problem(f"parallel.layout.groups.{name}", f"{pattern!r} matches no block"
                                    f"{did_you_mean(pattern, blocks)}; blocks are e.g. {blocks[0]}, {blocks[-1]}"))
    problems += _fp32_problems(model, cfg, plan, modules, disabled)
    problems += _every_n_problems(cfg, plan)
    return problems


def model_state_problems(recipe, model: nn.Module) -> list[Problem]:
    """The model's fp32 parameters, gradients and AdamW state (nothing else: activations come on top)
    against the card the recipe states and this host's memory. They are sharded over the ranks of a
    shard group; on the card unless parallel.sharding.cpu_offload, and a CPU recipe's processes all hold
    theirs in this host's memory."""
    import psutil

    from vggt_fsdp.hardware import CPU, GiB, card
    from vggt_fsdp.memory.generic import model_state_bytes

    acc, hardware = recipe.accelerate, recipe.hardware
    processes, machines = acc.get("num_processes", 1), acc.get("num_machines", 1)
    frozen = tuple(recipe.model.freeze) if recipe.vggt_sections else ()  # another task trains every parameter
    per_rank, shard = model_state_bytes(model, recipe.parallel, processes, processes // machines, frozen)
    on_host = bool(acc.get("use_cpu")) or recipe.parallel.sharding.cpu_offload
    params = sum(p.numel() for p in model.parameters())
    need = (f"{params:,} parameters: their fp32 values, gradients and AdamW state take {per_rank / GiB:.1f} "
            f"GiB per process (sharded over {shard})")
    if recipe.vggt_sections:
        fix = "choose a smaller model (model.preset, model.overrides) or more processes"
        key = "model.overrides" if recipe.model.overrides else "model.preset"
    else:
        fix, key = "build a smaller model in the task or use more processes", "task"
    if hardware.device is not None and not (on_host and hardware.device != CPU):
        budget = hardware.memory_gib if hardware.memory_gib is not None else card(hardware.device).memory_gib
        if per_rank > budget * GiB:
            where = "hardware.memory_gib" if hardware.memory_gib is not None else f"card {hardware.device!r}"
            offload = "" if hardware.device == CPU else ", or parallel.sharding.cpu_offload=true"
            return [Problem(key, f"{need}, above the {budget:g} GiB of {where} a process has; {fix}{offload}")]
    host, local = psutil.virtual_memory().total, processes // machines
    if on_host and per_rank * local > host:
        return [Problem(key, f"{need}, {per_rank * local / GiB:.1f} GiB for this host's {local} process(es) "
                        f"in host memory, above its {host / GiB:.1f} GiB; {fix}")]
    return []


def did_you_mean(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def repeated_classes(model: nn.Module, limit: int = 8) -> str:
    """The model's own classes (not torch's) that occur more than once, most frequent first: where its
    transformer blocks and their attention are."""
    counts = Counter(type(m).__name__ for m in model.modules() if not type(m).__module__.startswith("torch."))
    repeated = [f"{name} (x{n})" for name, n in counts.most_common() if n > 1][:limit]
    return ", ".join(repeated) or "none"


def type_problems(model: nn.Module, cfg: ParallelConfig) -> list[Problem]:
    """Each block or attention class name that no module of the model has."""
    from vggt_fsdp.parallel.sharding import type_matches

    modules = list(model.modules())
    names = sorted({type(m).__name__ for m in modules} | {f"{type(m).__module__}.{type(m).__qualname__}"
                                                          for m in modules})
    problems = []
    for key in ("block_types", "attention_types"):
        for i, name in enumerate(getattr(cfg.layout, key)):
            if not any(type_matches(m, [name]) for m in modules):
                problems.append(Problem(f"parallel.layout.{key}[{i}]", f"{name!r} matches no module class of the "
                                        f"model{did_you_mean(name, names)}; the model's repeated classes: "
                                        f"{repeated_classes(model)}"))
    return problems


def _fp32_problems(model, cfg: ParallelConfig, plan, modules, disabled) -> list[Problem]:
    """An fp32 pattern must match a module, and that module's parameters must belong to fp32 units:
    a module that is not a unit computes in its enclosing unit's dtype (bf16), whatever it says."""
    unit_dtype = {u.path: u.param_dtype for u in plan.units}
    units_by_depth = sorted(unit_dtype, key=lambda p: -p.count(".") if p else 1)
    problems = []
    for i, pattern in enumerate(cfg.precision.fp32_modules):
        key = f"parallel.precision.fp32_modules[{i}]"
        matched = [p for p in modules if fnmatchcase(p, pattern)]
        if not matched:
            if not names_disabled(pattern, disabled):
                problems.append(Problem(key, f"{pattern!r} matches no module{did_you_mean(pattern, modules)}; "
                                        f"top-level modules: {[n for n, _ in model.named_children()]}"))
            continue
        for path in matched:
            owners = {next(u for u in units_by_depth if not u or name.startswith(u + "."))
                      for name, _ in model.get_submodule(path).named_parameters(prefix=path)}
            wrong = sorted(u or "<root>" for u in owners if unit_dtype[u] != "fp32")
            if wrong:
                problems.append(Problem(key, f"{path} is not an FSDP unit: its parameters in unit(s) {wrong} "
                                        f"would compute in {cfg.precision.param_dtype}; add {path!r} to "
                                        "parallel.layout.units"))
                break
    return problems


def _every_n_problems(cfg: ParallelConfig, plan) -> list[Problem]:
    """every_n with n above the block count checkpoints only the first block: a typo for `block` or
    `none`, or a wrong n. A group's own n is checked against its blocks; the section's n against the
    largest group it applies to (a small group, e.g. a 1-block camera trunk, is fine with any n)."""
    counts: dict[str | None, int] = {}
    for unit in plan.units:
        if unit.kind == "block":
            counts[unit.group] = counts.get(unit.group, 0) + 1
    problems, shared = [], {}
    for group, count in counts.items():
        override = cfg.checkpoint.groups.get(group) if group is not None else None
        if (override.policy if override is not None else cfg.checkpoint.policy) != "every_n":
            continue
        if override is not None and override.n is not None:
            if override.n > count:
                problems.append(Problem(f"parallel.checkpoint.groups.{group}.n", f"{override.n} exceeds the {count} "
                                        f"blocks of group {group!r}: every_n would checkpoint only the first; use "
                                        f"n <= {count}, or policy block / none"))
        else:
            shared[group] = count
    if shared and cfg.checkpoint.n > max(shared.values()):
        largest = max(shared.values())
        problems.append(Problem("parallel.checkpoint.n", f"{cfg.checkpoint.n} exceeds the {largest} blocks of the "
                                "largest group it applies to: every_n would checkpoint only the first block of "
                                f"each; use n <= {largest}, or policy block / none"))
    return problems


def _header_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors as meta tensors (names and shapes; no data read)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    from vggt_fsdp.model.weights import load_tensors_only

    obj = load_tensors_only(path, mmap=True, map_location="meta")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("it holds neither a state dict nor {'model': state_dict}")
    return obj


def init_weights_problems(model: nn.Module, path_text: str, new_modules: tuple[str, ...] = ()) -> list[Problem]:
    """`new_modules`: module paths the file may lack (a head added to VGGT)."""
    from vggt_fsdp.model.weights import compare_state_dict

    key, path = "model.init_weights", Path(path_text)
    if error := _readable_file(path_text):
        return [Problem(key, f"{error}; give an upstream model.pt / model.safetensors or null")]
    if path.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        return [Problem(key, f"{path}: unsupported suffix; valid: .safetensors, .pt, .pth, .bin")]
    try:
        shapes = _header_shapes(path)
    except Exception as err:  # a damaged header, a pickle that is not a state dict
        return [Problem(key, f"{path} cannot be read: {type(err).__name__}: {err}")]
    report, _ = compare_state_dict(model, shapes, ignore_disabled_heads=True)
    report.missing = [n for n in report.missing if not n.startswith(tuple(m + "." for m in new_modules))]
    if not report.ok:
        return [Problem(key, f"{path} does not match the model: {report.describe()}; check model.preset, "
                        "model.overrides and model.heads")]
    return []
