"""Loading and saving VGGT weights in upstream's format (names as facebookresearch/vggt).

Accepted files: `.safetensors`, or `.pt`/`.pth`/`.bin` holding a raw state dict or {"model": sd}, read
weights-only (tensors and plain data; anything else is refused unread: `UnsafeWeightsError`).
Loading is strict by default: any missing, unexpected or wrongly shaped tensor raises
`WeightsMismatchError`, whose message lists the first few names of each kind with counts.

Disabled heads: a model built without, say, the track head does not expect `track_head.*`. A full
upstream checkpoint still holds them; by default that is an error (strict means strict), and
`ignore_disabled_heads=True` drops exactly those keys -- only keys under a head the model has
disabled, never anything else -- and reports them in `LoadReport.ignored`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

HEAD_PREFIXES = ("camera_head.", "depth_head.", "point_head.", "track_head.")
_SHOW = 5  # names listed per kind in an error message


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "name: checkpoint (a, b) vs model (c, d)"
    ignored: list[str] = field(default_factory=list)  # keys of disabled heads dropped on request

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = []
        for kind, names in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("wrongly shaped", self.mismatched)):
            if names:
                shown = ", ".join(names[:_SHOW]) + (f", ... ({len(names) - _SHOW} more)" if len(names) > _SHOW else "")
                parts.append(f"{len(names)} {kind}: {shown}")
        return "; ".join(parts) or "all tensors match"


class WeightsMismatchError(RuntimeError):
    def __init__(self, path: str | Path, report: LoadReport, hint: str = ""):
        self.report = report
        super().__init__(f"weights {path} do not match the model: {report.describe()}{hint}")


class UnsafeWeightsError(ValueError):
    """A weights file holding objects other than tensors and plain data: refused, never run."""


def load_tensors_only(path: str | Path, **kwargs):
    """`torch.load(weights_only=True)`, its refusal said without torch's advice to turn the restriction
    off (that would run whatever the file holds)."""
    import pickle

    try:
        return torch.load(str(path), weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        found = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        raise UnsafeWeightsError(f"{path} holds objects other than tensors and plain data "
                                 f"({found[0] if found else 'not a tensor file'}): refused unread (a weights file "
                                 "is data, never code); use a .safetensors file or a plain state dict") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file on the CPU, upstream names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix in (".pt", ".pth", ".bin"):
        obj = load_tensors_only(path, map_location="cpu")
        if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
            obj = obj["model"]
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{path} holds neither a state dict nor {{'model': state_dict}}")
        return dict(obj)
    raise ValueError(f"unsupported weights file {path}; valid suffixes: .safetensors, .pt, .pth, .bin")


def compare_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                       ignore_disabled_heads: bool = False) -> tuple[LoadReport, dict[str, torch.Tensor]]:
    """What loading `state_dict` into `model` would find; returns the report and the keys to load."""
    expected = model.state_dict()
    disabled = tuple(p for p in HEAD_PREFIXES if getattr(model, p[:-1], "absent") is None)
    report = LoadReport()
    to_load = {}
    for name, tensor in state_dict.items():
        if name not in expected:
            if ignore_disabled_heads and name.startswith(disabled):
                report.ignored.append(name)
            else:
                report.unexpected.append(name)
        elif tuple(tensor.shape) != tuple(expected[name].shape):
            report.mismatched.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[name].shape)}")
        else:
            to_load[name] = tensor
    report.missing = [name for name in expected if name not in state_dict]
    return report, to_load


def load_weights(model: nn.Module, path: str | Path, strict: bool = True,
                 ignore_disabled_heads: bool = False) -> LoadReport:
    """Copy a checkpoint's tensors into `model` (on its device and dtype, meta excluded).

    strict=False loads every tensor whose name and shape match and returns the report of the rest.
    """
    state_dict = read_state_dict(path)
    report, to_load = compare_state_dict(model, state_dict, ignore_disabled_heads)
    if strict and not report.ok:
        hint = ""
        if any(n.startswith(HEAD_PREFIXES) for n in report.unexpected):
            hint = " (checkpoint has heads the model disabled: pass ignore_disabled_heads=True to drop them)"
        raise WeightsMismatchError(path, report, hint)
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("model is on the meta device; materialise it (materialize()) before loading weights")
    model.load_state_dict(to_load, strict=False)
    return report


def save_weights(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a `.safetensors` file with upstream names (contiguous CPU copies)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"export path {path} must end in .safetensors")
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
