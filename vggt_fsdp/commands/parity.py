"""`vggt-fsdp parity FIXTURE_DIR`: compare this VGGT with the reference implementation's recording.

The fixture (tests/fixtures/README.md) holds the architecture, the weights, the inputs, the eval
outputs and the training-mode loss and gradients of the reference. This command rebuilds the model
from the fixture's config, loads the weights strictly, and checks, in fp32 on the CPU:
  - every eval output within 1e-4 of the reference relative to that output's largest magnitude
    (the track head's outputs track/vis/conf within 1e-3), plus the aggregator's first and last layer;
  - the training loss within 1e-4 relative, the same set of parameters receiving a gradient, and
    every gradient within 1e-3 relative L2 error.
Exit status: 0 all within tolerance, 1 otherwise, 2 when the directory is not a fixture.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

EXAMPLES = """  vggt-fsdp parity tests/fixtures/vggt_tiny
"""

FIXTURE_FILES = ("config.json", "weights.safetensors", "io.safetensors")
OUTPUT_TOL = 1e-4
TRACK_TOL = 1e-3
GRAD_TOL = 1e-3
TRACK_OUTPUTS = ("track", "vis", "conf")


@dataclass
class Check:
    name: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance  # NaN fails


class NotAFixtureError(ValueError):
    pass


def _max_rel_error(value: torch.Tensor, ref: torch.Tensor) -> float:
    if value.shape != ref.shape:
        return float("inf")
    scale = ref.abs().max().double().clamp_min(torch.finfo(torch.float32).tiny)
    return ((value.double() - ref.double()).abs().max() / scale).item()


def _rel_l2_error(value: torch.Tensor, ref: torch.Tensor) -> float:
    if value.shape != ref.shape:
        return float("inf")
    diff = (value.double() - ref.double()).norm()
    norm = ref.double().norm()
    return (diff / norm).item() if norm > 0 else diff.item()


def _flatten_outputs(out: dict) -> dict[str, torch.Tensor]:
    flat = {k: v for k, v in out.items() if k not in ("pose_enc_list", "images")}
    flat.update({f"pose_enc_list.{i}": v for i, v in enumerate(out.get("pose_enc_list", []))})
    return flat


def load_fixture(fixture_dir: str | Path):
    """(config, weights path, io tensors); NotAFixtureError for anything that is not a fixture."""
    from safetensors.torch import load_file

    from vggt_fsdp.model.config import VGGTConfig

    root = Path(fixture_dir)
    if not root.is_dir():
        raise NotAFixtureError(f"{root} is not a directory")
    missing = [name for name in FIXTURE_FILES if not (root / name).is_file()]
    if missing:
        raise NotAFixtureError(f"{root} is not a parity fixture: missing {', '.join(missing)} "
                               f"(a fixture holds {', '.join(FIXTURE_FILES)})")
    try:
        config = VGGTConfig.from_fixture(root / "config.json")
    except (ValueError, TypeError, KeyError) as err:
        raise NotAFixtureError(f"{root / 'config.json'} is not a fixture config: {err}") from err
    return config, root / "weights.safetensors", load_file(str(root / "io.safetensors"))


def run_parity(fixture_dir: str | Path) -> list[Check]:
    from vggt_fsdp.model import VGGT, load_weights

    config, weights, io = load_fixture(fixture_dir)
    model = VGGT(config)
    load_weights(model, weights, strict=True)
    images, query_points = io["input.images"], io.get("input.query_points")
    return _eval_checks(model, io, images, query_points) + _train_checks(model, io, images)


def _eval_checks(model, io, images, query_points) -> list[Check]:
    model.eval()
    agg = model.aggregator
    kept = agg.kept_layers
    with torch.no_grad():
        out = _flatten_outputs(model(images, query_points=query_points))
        agg.kept_layers = [0, -1]
        try:
            layers, _ = agg(images)
        finally:
            agg.kept_layers = kept
    out["aggregator.tokens_first"], out["aggregator.tokens_last"] = layers[0], layers[-1]
    checks = []
    for key in sorted(k for k in io if k.startswith("eval.")):
        name = key[len("eval."):]
        tol = TRACK_TOL if name in TRACK_OUTPUTS else OUTPUT_TOL
        error = _max_rel_error(out[name], io[key]) if name in out else float("inf")
        checks.append(Check(f"eval {name}", error, tol))
    return checks


def _train_checks(model, io, images) -> list[Check]:
    model.train()
    model.zero_grad(set_to_none=True)
    out = _flatten_outputs(model(images))
    weights = {k[len("train.weight."):]: v for k, v in io.items() if k.startswith("train.weight.")}
    missing = sorted(set(weights) - set(out))
    if missing:
        return [Check(f"train output {name}", float("inf"), 0.0) for name in missing]
    loss = sum((out[k] * w).sum() / out[k].numel() for k, w in sorted(weights.items()))
    loss.backward()
    checks = [Check("train loss", _rel_l2_error(loss.detach().reshape(io["train.loss"].shape), io["train.loss"]), OUTPUT_TOL)]

    refs = {k[len("train.grad."):]: v for k, v in io.items() if k.startswith("train.grad.")}
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    extra, absent = sorted(set(grads) - set(refs)), sorted(set(refs) - set(grads))
    checks.append(Check(f"train gradient set (extra {extra[:3]}, absent {absent[:3]})", float(len(extra) + len(absent)), 0.0))
    checks += [Check(f"grad {name}", _rel_l2_error(grads[name], ref), GRAD_TOL)
               for name, ref in sorted(refs.items()) if name in grads]
    return checks


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("fixture_dir", help="a fixture directory (config.json, weights.safetensors, io.safetensors)")
    parser.add_argument("--all-grads", action="store_true", help="print every gradient's error, not only the worst")


def run(args: argparse.Namespace) -> int:
    try:
        checks = run_parity(args.fixture_dir)
    except NotAFixtureError as err:
        print(f"vggt-fsdp parity: {err}", file=sys.stderr)
        return 2
    grads = [c for c in checks if c.name.startswith("grad ")]
    shown = [c for c in checks if not c.name.startswith("grad ")]
    shown += grads if args.all_grads else sorted(grads, key=lambda c: -c.error)[:3]
    for check in shown:
        mark = "ok  " if check.passed else "FAIL"
        print(f"{mark} {check.name:<48} max error {check.error:.3e} (tolerance {check.tolerance:.0e})")
    failed = [c for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks within tolerance "
          f"({len(grads)} gradients, worst {max((c.error for c in grads), default=0.0):.3e})")
    return 1 if failed else 0
