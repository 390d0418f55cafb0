"""`vggt-fsdp summary PRESET [--json]`: parameter counts of a model preset, built on the meta device.

Text: parameters per top-level module (the aggregator split into its parts) and in all.
--json: {"num_parameters": N, "tensors": {name: shape}}, the form of the state-dict manifest.
"""
from __future__ import annotations

import argparse
import json

EXAMPLES = """  vggt-fsdp summary vggt-1b
  vggt-fsdp summary vggt-tiny --disable track --json
"""

HEADS = ("camera", "depth", "point", "track")


def build_parser(parser: argparse.ArgumentParser) -> None:
    from vggt_fsdp.model.config import PRESETS

    parser.add_argument("preset", choices=sorted(PRESETS), help="model preset")
    parser.add_argument("--json", action="store_true", help="print the state-dict manifest as JSON")
    parser.add_argument("--disable", action="append", default=[], choices=HEADS, metavar="HEAD",
                        help=f"build without this head (repeatable; one of {', '.join(HEADS)})")


def _groups(model) -> dict[str, int]:
    """Parameter counts per top-level module; the aggregator's parts listed separately."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        key = parts[0]
        if key == "aggregator":
            key += f".{parts[1]}" if parts[1] in ("patch_embed", "frame_blocks", "global_blocks") else " (tokens)"
        counts[key] = counts.get(key, 0) + param.numel()
    return counts


def run(args: argparse.Namespace) -> int:
    from vggt_fsdp.model import build_model, get_preset

    config = get_preset(args.preset).replace(**{f"enable_{head}": False for head in args.disable})
    model = build_model(config, device="meta")
    total = sum(p.numel() for p in model.parameters())
    if args.json:
        tensors = {name: list(t.shape) for name, t in model.state_dict().items()}
        print(json.dumps({"num_parameters": total, "tensors": tensors}, indent=1))
        return 0
    counts = _groups(model)
    width = max(map(len, counts)) + 2
    print(f"{args.preset}: {total:,} parameters, {len(model.state_dict())} state-dict tensors")
    for key, count in counts.items():
        print(f"  {key:<{width}} {count:>15,}  {100 * count / total:5.1f}%")
    return 0
