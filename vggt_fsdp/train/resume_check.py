"""What a resume does with a recipe that differs from the checkpoint's: the documented rule.

Every checkpoint records the recipe in effect when it was written (its COMPLETE marker, plain JSON;
checkpoints of earlier versions: the run directory's recipe.yaml). Before launch (preflight) and again
when the trainer loads the checkpoint, the new recipe is compared with it key by key, and each changed
key gets the verdict of the first rule below that names it:

- train.resume, train.output_dir: not compared (they name the run, not the training);
- model.init_weights: not used (the weights come from the checkpoint);
- model.* (preset, overrides, heads, freeze): refused (the checkpoint's parameters and optimizer
  state fit its model only);
- optim.no_decay, optim.no_decay_1d: refused (they decide which parameters share an optimizer group);
- optim.*, schedule.*, train.max_steps: applied (the optimizer's hyperparameters and the lr schedule
  are this recipe's, continued at the checkpoint's step);
- train.seed: not used (the RNG streams continue from the checkpoint; from the seed only with another
  world size);
- data.*: applied (the sampler continues at the checkpoint's position of the new data order: not the
  batches an uninterrupted run would have drawn);
- anything else (loss, parallel, accelerate, hardware, train): applied from the next step.

A refused change stops the run before anything starts, naming each key with both values; applied and
unused ones are announced in one line each. The run directory's `recipe.yaml` is then the recipe in
effect, and `recipe-history.jsonl` gets one line per run: when, from which checkpoint and step, and
what changed (`record_recipe`).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HISTORY = "recipe-history.jsonl"

# (key or key prefix ending in "."), verdict, why: the first match wins.
RULES: tuple[tuple[str, str, str], ...] = (
    ("train.resume", "ignored", ""),
    ("train.output_dir", "ignored", ""),
    ("model.init_weights", "not used", "the weights come from the checkpoint"),
    ("model.", "refused", "the checkpoint's parameters and optimizer state fit its model only"),
    ("optim.no_decay", "refused", "it decides which parameters share an optimizer group"),
    ("optim.no_decay_1d", "refused", "it decides which parameters share an optimizer group"),
    ("optim.", "applied", "the optimizer's hyperparameters are this recipe's"),
    ("schedule.", "applied", "the lr schedule is this recipe's, continued at the checkpoint's step"),
    ("train.max_steps", "applied", "the lr schedule runs over the new length"),
    ("train.seed", "not used", "the RNG streams continue from the checkpoint (from the seed only with another "
                               "world size)"),
    ("data.", "applied", "the sampler continues at the checkpoint's position of the new data order, not with "
                         "the batches an uninterrupted run would have drawn"),
    ("", "applied", "from the next step"),
)


@dataclass(frozen=True)
class Change:
    key: str
    before: Any  # the checkpoint's value
    now: Any  # this recipe's
    verdict: str  # "refused", "applied" or "not used"
    why: str

    def __str__(self) -> str:
        return f"{self.key} {_show(self.before)} -> {_show(self.now)} ({self.verdict}: {self.why})"


def plain(recipe: Any) -> Any:
    """A recipe (dataclass) or any part of it as JSON data: what a marker records and what is compared."""
    import dataclasses

    data = dataclasses.asdict(recipe) if dataclasses.is_dataclass(recipe) else recipe
    return json.loads(json.dumps(data, default=str))


def leaves(recipe: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> plain value for every field of a recipe's dataclasses; a mapping field (e.g.
    model.overrides, accelerate) gives one key per entry."""
    import dataclasses

    out: dict[str, Any] = {}
    for f in dataclasses.fields(recipe):
        value, key = getattr(recipe, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            out.update(leaves(value, key + "."))
        else:
            out[key] = plain(value)
    return out


_UNSET = "(unset)"


def _lookup(data: Any, key: str) -> tuple[bool, Any]:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return False, None
        data = data[part]
    return True, data


def rule_for(key: str) -> tuple[str, str]:
    for name, verdict, why in RULES:
        if key == name or (name.endswith(".") and key.startswith(name)) or name == "":
            return verdict, why
    raise AssertionError("the last rule matches every key")


def compare(saved: dict, recipe: Any) -> list[Change]:
    """The keys whose value in `recipe` (the dataclass) differs from the checkpoint's recorded recipe
    `saved`, with their verdicts, in key order. A field the checkpoint's version did not record is not
    compared; within a mapping field an entry one side lacks is "(unset)"."""
    pairs: list[tuple[str, Any, Any]] = []
    for key, now in leaves(recipe).items():
        found, before = _lookup(saved, key)
        if not found:
            continue
        if isinstance(before, dict) and isinstance(now, dict):
            pairs += [(f"{key}.{k}", before.get(k, _UNSET), now.get(k, _UNSET))
                      for k in sorted(before.keys() | now.keys())]
        else:
            pairs.append((key, before, now))
    changes = []
    for key, before, now in sorted(pairs):
        if before != now:
            verdict, why = rule_for(key)
            if verdict != "ignored":
                changes.append(Change(key, before, now, verdict, why))
    return changes


_REFUSED_FIX = ("keep the checkpoint's value to resume; or start a new run (train.resume=none, or another "
                "train.output_dir), e.g. from its weights: vggt-fsdp export CHECKPOINT OUT.safetensors, then "
                "model.init_weights=OUT.safetensors")


def refused(checkpoint: Path, changes: list[Change]) -> list[tuple[str, str]]:
    """(key, message) for each change a resume cannot honour."""
    return [(c.key, f"{_show(c.before)} in checkpoint {checkpoint}, {_show(c.now)} in this recipe: a resume cannot "
             f"change it ({c.why}); {_REFUSED_FIX}") for c in changes if c.verdict == "refused"]


def refusal(checkpoint: Path, changes: list[Change]) -> str | None:
    """The message refusing a resume, or None when no change is refused."""
    lines = refused(checkpoint, changes)
    if not lines:
        return None
    listed = "; ".join(f"{c.key}: {_show(c.before)} in the checkpoint, {_show(c.now)} now"
                       for c in changes if c.verdict == "refused")
    return (f"checkpoint {checkpoint} cannot be resumed with this recipe: {listed}. A resume cannot change the "
            f"model or its optimizer grouping: {_REFUSED_FIX}")


def announcements(checkpoint: Path, changes: list[Change]) -> list[str]:
    return [f"recipe changed since checkpoint {checkpoint.name}: {c}" for c in changes if c.verdict != "refused"]


def saved_recipe(checkpoint: Path, marker: dict) -> tuple[dict | None, str]:
    """The recipe `checkpoint` was written with and where it was read: the marker's record, else (a
    checkpoint of an earlier version) the run directory's recipe.yaml; (None, why) when neither."""
    if isinstance(marker.get("recipe"), dict):
        return marker["recipe"], f"{checkpoint}'s marker"
    run_yaml = checkpoint.parent.parent / "recipe.yaml"
    if run_yaml.is_file():
        import yaml

        try:
            data = yaml.safe_load(run_yaml.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            data = None
        if isinstance(data, dict):
            return data, str(run_yaml)
    return None, (f"checkpoint {checkpoint} records no recipe (written by an earlier version) and {run_yaml} is "
                  "unreadable or absent: changes since it cannot be checked")


def record_recipe(output_dir: Path, recipe_yaml: str, resumed_from: Path | None, step: int,
                  changes: list[Change]) -> None:
    """Rank 0, once the run has resumed (or started fresh): recipe.yaml is the recipe in effect from
    `step`, and recipe-history.jsonl gets this run's line."""
    source = f"resumed from {resumed_from}" if resumed_from else "started fresh"
    header = (f"# The recipe in effect from step {step} ({source}, {time.strftime('%Y-%m-%d %H:%M:%S')}).\n"
              f"# What changed between runs of this directory: {HISTORY}\n")
    (output_dir / "recipe.yaml").write_text(header + recipe_yaml)
    entry = {"time": time.time(), "step": step, "resumed_from": str(resumed_from) if resumed_from else None,
             "changes": {c.key: {"before": c.before, "now": c.now, "verdict": c.verdict} for c in changes}}
    with open(output_dir / HISTORY, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)
