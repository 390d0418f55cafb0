"""Recipes: one YAML file that says what to train, on what, and how.

A recipe is a tree of typed dataclasses, one section per part of the toolkit; each part owns its
section's dataclass and this module owns the loading:

    model:      ModelSpec (here)                  accelerate: a raw Accelerate config (dict)
    parallel:   ParallelConfig (parallel/config)  data:       DataConfig (data/config)
    loss:       LossConfig (losses)               optim/schedule/train: train/config
    hardware:   HardwareConfig (hardware): the card the recipe is sized for

Loading is generic and strict: YAML -> plain data -> `key=value` overrides -> dataclasses by their type
hints. An unknown key, a wrong type or a value outside a Literal fails with the dotted path of the key,
what was expected and the closest valid name; then each section's `validate()` runs, then the
cross-section checks of `Recipe.validate()`.

`task:` says what is trained: left out (or `vggt`), the built-in VGGT task; otherwise MODULE:CALLABLE
(a dotted module, or a `.py` path, relative to the recipe file's directory when written in the file),
whose CALLABLE(recipe) returns the task (vggt_fsdp/tasks/base.py). The `model:`, `data:` and `loss:`
sections belong to the VGGT task (and to tasks that extend it): a recipe of another task that holds none
of them is loaded, checked and written out without them; one that holds any is checked as a VGGT recipe,
and a task that does not extend VGGT refuses it (those settings would be silently ignored).
`task_config:` is free-form, read by the task only.

One top-level key is not a section: `__script__`, which with the file's last line makes a recipe a
Python script as well, so `accelerate launch RECIPE.yaml` runs it (`vggt_fsdp/recipe_script.py`). The
loader checks that layout and drops the key.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import yaml

from vggt_fsdp import bundled, recipe_script
from vggt_fsdp.data.config import DataConfig
from vggt_fsdp.hardware import CPU, HardwareConfig
from vggt_fsdp.losses import LossConfig
from vggt_fsdp.parallel.accelerate import check_accelerate_section
from vggt_fsdp.parallel.config import ParallelConfig
from vggt_fsdp.parallel.context import check_context_recipe
from vggt_fsdp.train.config import OptimConfig, ScheduleConfig, TrainConfig


class RecipeError(ValueError):
    """A recipe that cannot be loaded; the message names the file, the dotted key and the valid choices."""


MAX_SEED = 2**63 - 1


# --------------------------------------------------------------------------------------- the model
@dataclass
class HeadsSpec:
    camera: bool = True
    depth: bool = True
    point: bool = True
    track: bool = False


@dataclass
class ModelSpec:
    preset: str = "vggt-1b"  # a name of vggt_fsdp.model.config.PRESETS
    heads: HeadsSpec = field(default_factory=HeadsSpec)
    # Parameter-name patterns (fnmatch, e.g. "aggregator.patch_embed.*") the trainer freezes.
    freeze: list[str] = field(default_factory=list)
    init_weights: Union[str, None] = None  # upstream .pt / .safetensors to start from
    # Dotted VGGTConfig fields to change on top of the preset, e.g. {"aggregator.depth": 2}.
    overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not any(dataclasses.asdict(self.heads).values()):
            raise ValueError("model.heads: every head is disabled; enable at least one")
        model_config(self)  # an unknown preset or override key fails here, at load time


def model_config(spec: ModelSpec):
    """The VGGTConfig a ModelSpec describes: preset, then enabled heads, then dotted overrides."""
    from vggt_fsdp.model.config import VGGTConfig, get_preset

    data = get_preset(spec.preset).to_dict()
    for head in ("camera", "depth", "point", "track"):
        data[f"enable_{head}"] = getattr(spec.heads, head)
    for dotted, value in _dotted_items(spec.overrides):
        try:
            _set_dotted(data, dotted.split("."), value, create=False)
        except KeyError as err:
            raise ValueError(f"model.overrides.{dotted}: {err.args[0]}") from None
    try:
        return VGGTConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model.overrides: {err}") from None


def _dotted_items(overrides: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Overrides as (dotted key, value). A nested mapping, which `model.overrides.aggregator.depth=2`
    on the command line builds, sets single fields: it never replaces a whole sub-config (which would
    put the dataclass defaults, i.e. VGGT-1B's, in place of the preset's other fields)."""
    items = []
    for key, value in overrides.items():
        if isinstance(value, dict) and value:
            items += _dotted_items(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


# --------------------------------------------------------------------------------------- the recipe
VGGT_TASK = "vggt"
VGGT_SECTIONS = ("model", "data", "loss")  # read by the built-in VGGT task only


def is_vggt_task(task: str | None) -> bool:
    return task is None or task == VGGT_TASK


@dataclass
class Recipe:
    # None / "vggt": the built-in VGGT task; else MODULE:CALLABLE returning a task (tasks/base.py).
    task: Union[str, None] = None
    task_config: dict[str, Any] = field(default_factory=dict)  # the task's own settings, free-form
    model: ModelSpec = field(default_factory=ModelSpec)
    # Written out verbatim as the Accelerate config file `accelerate launch` reads.
    accelerate: dict[str, Any] = field(default_factory=dict)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # Whether the VGGT sections are in use: the VGGT task, or a recipe that holds one (set by the loader).
    vggt_sections = True

    @property
    def vggt_task(self) -> bool:
        return is_vggt_task(self.task)

    def validate(self) -> None:
        check_accelerate_section(self.accelerate, self.parallel)
        for key, seed in (("train.seed", self.train.seed), ("data.seed", self.data.seed)):
            if not 0 <= seed <= MAX_SEED:  # numpy's generators refuse negative seeds; torch's stop at 2**64
                raise ValueError(f"{key}={seed} must be in [0, 2**63 - 1]; give a non-negative seed")
        if self.schedule.min_lr > self.optim.lr:
            raise ValueError(f"schedule.min_lr={self.schedule.min_lr:g} is above optim.lr={self.optim.lr:g}: the "
                             "cosine decay would raise the lr after warmup; set schedule.min_lr <= optim.lr")
        if self.task is not None and not self.vggt_task and ":" not in self.task:
            raise ValueError(f"task: {self.task!r} is not MODULE:CALLABLE (e.g. my_task.py:build or "
                             f"my_project.tasks:build), nor {VGGT_TASK!r} (the built-in VGGT task)")
        self._check_context_parallel()
        if self.hardware.device is not None and (self.hardware.device == CPU) != bool(self.accelerate.get("use_cpu")):
            raise ValueError(f"hardware.device is {self.hardware.device!r} but accelerate.use_cpu is "
                             f"{self.accelerate.get('use_cpu')!r}: a cpu recipe launches CPU processes "
                             "(use_cpu: true), a GPU recipe GPU ones")
        if not self.vggt_sections:
            return  # the checks below are of the VGGT task's model:, data: and loss: sections
        if self.loss.track.enabled == "auto":  # the track loss trains the track head whenever it is on
            self.loss.track.enabled = self.model.heads.track
        for head in ("camera", "depth", "point", "track"):
            # Caught here, not at the first step after minutes of model building and sharding.
            if getattr(self.loss, head).enabled and not getattr(self.model.heads, head):
                raise ValueError(f"loss.{head}.enabled is true but model.heads.{head} is false: "
                                 f"enable the head or set loss.{head}.enabled=false")
        untracked = [s.name or s.source for s in self.data.source_configs()
                     if s.source != "synthetic" or not s.synthetic.num_track_queries]
        if self.loss.track.enabled and untracked:
            raise ValueError(f"loss.track.enabled is true but data source(s) {untracked} give no ground-truth "
                             "tracks: only the synthetic source renders them (data.synthetic.num_track_queries > 0; "
                             "tracks from real depth are not built yet); use data.source=synthetic or set "
                             "loss.track.enabled=false")


    def _check_context_parallel(self) -> None:
        size = self.parallel.context_parallel
        if not self.vggt_sections:
            if size > 1:
                raise ValueError(f"parallel.context_parallel={size}: context parallelism splits VGGT's scenes over "
                                 f"ranks, and task {self.task!r} has no such split; set parallel.context_parallel=1")
            return
        agg = model_config(self.model).aggregator
        check_context_recipe(size, int(self.accelerate.get("num_processes", 1)),
                             {"the aggregator's global attention": agg.num_heads}, self.model.heads.track)
        self.data.check_frame_budget(size)


# --------------------------------------------------------------------------------------- public API
def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load, override (`train.max_steps=5`), type-check and validate a recipe file (or a bundled recipe,
    by name: `vggt_fsdp.bundled.resolve_recipe`)."""
    try:
        path = bundled.resolve_recipe(path)
    except FileNotFoundError as err:
        raise RecipeError(str(err)) from None
    text = _recipe_text(path)
    try:
        raw = yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if isinstance(raw, dict) and recipe_script.SCRIPT_KEY in raw:
        try:
            recipe_script.check_script_layout(text)
        except ValueError as err:
            raise RecipeError(f"{path}: {err}") from None
    if isinstance(raw, dict) and isinstance(raw.get("task"), str):
        raw["task"] = _task_beside(raw["task"], path.parent)
    return recipe_from_dict(raw, overrides, source=str(path))


def _recipe_text(path: Path) -> str:
    """The file's text, or a RecipeError for a file that is not text (a checkpoint, an image, a
    recipe saved in another encoding) or cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RecipeError(f"{path}: cannot be read: {err.strerror or err}") from None
    try:
        if b"\0" in data:
            raise ValueError("it holds NUL bytes")
        return data.decode("utf-8")
    except (UnicodeDecodeError, ValueError) as err:
        why = f"byte {err.start} is not UTF-8" if isinstance(err, UnicodeDecodeError) else err.args[0]
        raise RecipeError(f"{path}: not a text YAML recipe ({why}); name a recipe .yaml file") from None


def _task_beside(task: str, directory: Path) -> str:
    """A relative `.py` path in a recipe file's `task:` is relative to the file's directory (so a copied
    recipe and its task module train from any working directory)."""
    module, sep, attr = task.rpartition(":")
    if sep and module.endswith(".py") and not Path(module).is_absolute():
        return f"{(directory / module).resolve()}{sep}{attr}"
    return task


def load_recipe_or_exit(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """`load_recipe` for commands: an invalid recipe prints one `error:` line and exits with status 2."""
    try:
        return load_recipe(path, overrides)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def recipe_from_dict(raw: Any, overrides: Sequence[str] = (), source: str = "<recipe>") -> Recipe:
    raw = {} if raw is None else copy.deepcopy(raw)
    try:
        if not isinstance(raw, dict):
            raise ValueError(f"a recipe is a mapping of sections, got {type(raw).__name__}")
        recipe_script.pop_script_key(raw)
        for keys, value in parse_overrides(overrides):
            _set_dotted(raw, keys, value, create=True)
        _check_finite(raw, "")
        recipe = from_data(Recipe, raw, "")
        recipe.vggt_sections = is_vggt_task(raw.get("task")) or any(name in raw for name in VGGT_SECTIONS)
        for section in dataclasses.fields(recipe):
            validate = getattr(getattr(recipe, section.name), "validate", None)
            if validate is not None:
                validate()
        recipe.validate()
    except (TypeError, ValueError, KeyError) as err:
        raise RecipeError(f"{source}: {err.args[0] if err.args else err}") from None
    return recipe


def parse_overrides(items: Sequence[str]) -> list[tuple[list[str], Any]]:
    """`a.b.c=value` -> (["a", "b", "c"], value); the value is a YAML scalar or flow collection."""
    parsed = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {item!r} must look like dotted.key=value (e.g. train.max_steps=5)")
        try:
            value = yaml.load(text, Loader=_RecipeLoader)
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: value is not valid YAML: {err}") from None
        parsed.append((key.split("."), value))
    return parsed


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain data; the VGGT task's sections only where they are in use."""
    data = dataclasses.asdict(recipe)
    if not recipe.vggt_sections:
        for name in VGGT_SECTIONS:
            data.pop(name)
    return data


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML; loading it again gives an equal Recipe."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=False)


def _check_finite(value: Any, path: str) -> None:
    """Every number of the recipe, typed sections and free-form ones (accelerate:, model.overrides) alike,
    is finite: YAML reads `.nan` and `.inf`, and a NaN lr or loss weight would only show as a non-finite
    loss after the model is built, sharded and stepped."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path or 'the recipe'}: {value} is not a finite number; give a finite value")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, _join(path, str(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(item, f"{path}[{i}]")


# --------------------------------------------------------------------------------------- YAML
class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars where 1.1 surprises: `1e-4` is a float (1.1 wants `1.0e-4`), only
    true/false are booleans (`mixed_precision: no` stays the string "no"); duplicate keys are errors."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _set_dotted(data: dict, keys: list[str], value: Any, create: bool) -> None:
    node = data
    for depth, key in enumerate(keys[:-1]):
        if key not in node:
            if not create:
                raise KeyError(f"unknown key {key!r}; valid keys: {sorted(node)}")
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            where = ".".join(keys[: depth + 1])
            raise ValueError(f"cannot set {'.'.join(keys)}: {where} is a {type(node).__name__}, not a mapping")
    if not create and keys[-1] not in node:
        raise KeyError(f"unknown key {keys[-1]!r}; valid keys: {sorted(node)}")
    node[keys[-1]] = value


# --------------------------------------------------------------------------------------- typed conversion
def from_data(tp: Any, value: Any, path: str) -> Any:
    """Convert plain YAML data to `tp` (dataclass, Literal, Union, list, tuple, dict, scalar) or raise
    a ValueError naming the dotted `path`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _to_dataclass(tp, value, path)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or type(value) is not type(_match(choices, value)):
            raise ValueError(f"{_where(path)}{value!r} is not one of {_choices(choices)}{_suggest(value, choices)}")
        return value
    if origin in (Union, types.UnionType):
        return _to_union(typing.get_args(tp), value, path)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{_where(path)}expected a list, got {_describe(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length: tuple[int, str]
            if len(value) != len(args):
                raise ValueError(f"{_where(path)}expected {len(args)} items, got {len(value)}")
            item_tps = list(args)
        else:
            item_tps = [args[0] if args else Any] * len(value)
        items = [from_data(t, item, f"{path}[{i}]") for i, (t, item) in enumerate(zip(item_tps, value))]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ValueError(f"{_where(path)}expected a mapping, got {_describe(value)}")
        return {from_data(key_tp, k, _join(path, str(k))): from_data(value_tp, v, _join(path, str(k)))
                for k, v in value.items()}
    return _to_scalar(tp, value, path)


def _to_dataclass(cls: type, value: Any, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"{_where(path)}expected a mapping with keys {sorted(fields)}, got {_describe(value)}")
    unknown = [key for key in value if key not in fields]
    if unknown:
        key = unknown[0]
        raise ValueError(f"{_join(path, str(key))}: unknown key{_suggest(key, fields)}; "
                         f"valid keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = from_data(hints[name], value[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{_join(path, name)}: required key is missing")
    return cls(**kwargs)


def _to_union(options: tuple, value: Any, path: str) -> Any:
    if value is None and type(None) in options:
        return None
    candidates = [option for option in options if option is not type(None)]
    if len(candidates) == 1:  # Optional[X]: X's own message is the precise one
        return from_data(candidates[0], value, path)
    for option in candidates:
        try:
            return from_data(option, value, path)
        except ValueError:
            pass
    expected = " or ".join(_type_name(option) for option in options)
    literal_values = [c for o in options if typing.get_origin(o) is Literal for c in typing.get_args(o)]
    raise ValueError(f"{_where(path)}expected {expected}, got {_describe(value)}{_suggest(value, literal_values)}")


def _to_scalar(tp: Any, value: Any, path: str) -> Any:
    if tp is type(None):
        if value is not None:
            raise ValueError(f"{_where(path)}expected null, got {_describe(value)}")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is an int in Python; a recipe's `true` is never a number.
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ValueError(f"{_where(path)}expected {tp.__name__}, got {_describe(value)}")
    if tp not in (int, float, str, bool):
        raise TypeError(f"{_where(path)}unsupported field type {tp!r} in a recipe dataclass")
    return value


# --------------------------------------------------------------------------------------- messages
def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _where(path: str) -> str:
    return f"{path}: " if path else ""


def _describe(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return type(value).__name__
    return f"{type(value).__name__} {value!r}"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(c) for c in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _choices(choices: Sequence[Any]) -> str:
    return "[" + ", ".join(repr(c) for c in choices) + "]"


def _match(choices: Sequence[Any], value: Any) -> Any:
    return next(c for c in choices if c == value)


def _suggest(value: Any, candidates: Any) -> str:
    names = [str(c) for c in candidates]
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
