"""The selective checkpoint policy's per-op cost on the CPU: one transformer block's forward + backward
at vggt-mid size under the block policy, under SAC with a policy that decides nothing (torch's own
selective-checkpoint machinery), and under the selective policies.

    python -m benchmarks.selective_overhead --out benchmarks/results/X [--policy-module FILE]

selective minus block is what the policy costs in all (SAC's dispatch mode on every op, plus the policy's
Python call); `sac, trivial policy` separates the two. `--policy-module` times another implementation of
vggt_fsdp.parallel.checkpointing (for example the file at an older commit, `git show C:path > FILE`)
beside the current one, in the same process. CPU figures: on a GPU the same Python cost sits beside
kernels that take less time, so the share there is larger (a GPU measurement is owed).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from benchmarks.provenance import git_commit
from vggt_fsdp.model.layers import Block, RotaryPositionEmbedding2D, patch_positions

# An aggregator block with qk-norm and RoPE, in a frame-attention call: (width, heads, frames, patch grid).
# mid: vggt-mid's block, 4 frames of 14 x 14 patches (196 px); tiny: vggt-tiny's, 2 frames of 8 x 8.
SIZES = {"mid": (384, 6, 4, 14), "tiny": (96, 4, 2, 8)}
SPECIAL = 5  # camera + 4 register tokens


def _load(path: str):
    spec = importlib.util.spec_from_file_location("checkpointing_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _trivial(ctx, op, *args, **kwargs):
    return CheckpointPolicy.PREFER_RECOMPUTE


def _runners(block: Block, modules: dict[str, object]) -> dict[str, callable]:
    """name -> f(x, pos) that runs the block's forward under that policy."""
    runners = {"block": lambda x, pos: checkpoint(block, x, pos, use_reentrant=False),
               "sac, trivial policy": lambda x, pos: checkpoint(
                   block, x, pos, use_reentrant=False,
                   context_fn=lambda: create_selective_checkpoint_contexts(_trivial))}
    for label, module in modules.items():
        for save in (("sdpa",), ("sdpa", "qkv")):
            def run(x, pos, module=module, save=save):
                policy = module.SelectivePolicy(save)
                contexts = create_selective_checkpoint_contexts(policy)
                out = checkpoint(block, x, pos, use_reentrant=False, context_fn=lambda: contexts)
                policy.check(block)
                return out
            runners[f"selective({'+'.join(save)}){label}"] = run
    return runners


def measure(modules: dict[str, object], repeats: int, dtype: torch.dtype, size: str) -> dict:
    width, heads, frames, grid = SIZES[size]
    torch.manual_seed(0)
    block = Block(width, heads, init_values=0.01, qk_norm=True, rope=RotaryPositionEmbedding2D()).to(dtype)
    pos = patch_positions(grid, grid, SPECIAL, "cpu")
    x = torch.randn(frames, pos.shape[1], width, dtype=dtype, requires_grad=True)
    runners = _runners(block, modules)
    times = {name: [] for name in runners}
    for round_ in range(repeats + 1):  # round 0 warms up; the order rotates so load drifts spread evenly
        for name in list(runners)[round_ % len(runners):] + list(runners)[:round_ % len(runners)]:
            started = time.process_time()  # CPU time of this process: less sensitive to a loaded machine
            runners[name](x, pos).float().square().mean().backward()
            if round_:
                times[name].append(time.process_time() - started)
            x.grad = None
            block.zero_grad(set_to_none=True)
    ops = _forward_ops(block, x, pos)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"size": size, "width": width, "heads": heads, "tokens": list(x.shape), "dtype": str(dtype), "repeats": repeats, "forward_ops": len(ops),
            "policy_call_us": _policy_calls(modules, ops),
            "median_s": median, "min_s": {name: min(t) for name, t in times.items()},
            "over_block_ms": {name: 1e3 * (m - median["block"]) for name, m in median.items()},
            "per_op_us_over_block": {name: 1e6 * (m - median["block"]) / (2 * len(ops)) for name, m in median.items()}}


def _forward_ops(block, x, pos) -> list:
    """The ops one block forward runs (the policy runs on each of them, in the forward and the recompute)."""
    ops = []

    def logging(ctx, op, *args, **kwargs):
        if not ctx.is_recompute:
            ops.append(op)
        return CheckpointPolicy.PREFER_RECOMPUTE

    checkpoint(block, x, pos, use_reentrant=False, context_fn=lambda: create_selective_checkpoint_contexts(logging))
    return ops


def _policy_calls(modules: dict[str, object], ops: list, rounds: int = 2000) -> dict[str, float]:
    """The policy alone: microseconds a call, replaying one block's forward and recompute op stream
    through a fresh policy `rounds` times (minimum of 5 tries, CPU time)."""
    from types import SimpleNamespace

    passes = [SimpleNamespace(is_recompute=False), SimpleNamespace(is_recompute=True)]
    result = {}
    for label, module in modules.items():
        for save in (("sdpa",), ("sdpa", "qkv")):
            tries = []
            for _ in range(5):
                started = time.process_time()
                for _ in range(rounds):
                    policy = module.SelectivePolicy(save)
                    for ctx in passes:
                        for op in ops:
                            policy(ctx, op)
                tries.append(time.process_time() - started)
            result[f"selective({'+'.join(save)}){label}"] = 1e6 * min(tries) / (rounds * 2 * len(ops))
    return result


def markdown(doc: dict) -> str:
    prov = doc["provenance"]
    lines = ["# Selective checkpointing's per-op cost (CPU)", "",
             f"- command: `{prov['command']}`", f"- device: {prov['device']}; torch {prov['torch']}; date {prov['date']}; "
             f"commit {prov['commit']}",
             f"- one vggt-{doc['size']} aggregator block (width {doc['width']}, {doc['heads']} heads, qk-norm, RoPE), tokens "
             f"{doc['tokens']}, {doc['dtype']}; forward + backward, median of {doc['repeats']} (order rotated); "
             f"{doc['forward_ops']} aten ops a forward, so 2 x {doc['forward_ops']} policy calls a step", "",
             "| configuration | median ms (CPU time) | min ms | over block policy, ms | over block per policy call, us "
             "| the policy alone, us a call |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, median in doc["median_s"].items():
        alone = doc["policy_call_us"].get(name)
        lines.append(f"| {name} | {1e3 * median:.1f} | {1e3 * doc['min_s'][name]:.1f} | {doc['over_block_ms'][name]:+.1f} "
                     f"| {doc['per_op_us_over_block'][name]:+.1f} | {'' if alone is None else f'{alone:.2f}'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output path without suffix (.json and .md)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--size", choices=sorted(SIZES), default="mid")
    parser.add_argument("--policy-module", action="append", default=[],
                        help="LABEL=FILE: another checkpointing.py to time beside the current one")
    args = parser.parse_args(argv)
    from vggt_fsdp.parallel import checkpointing

    modules = {"": checkpointing, **{f" [{item.split('=', 1)[0]}]": _load(item.split("=", 1)[1])
                                     for item in args.policy_module}}
    prov = {"command": "python -m benchmarks.selective_overhead " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "commit": git_commit()}
    doc = {"provenance": prov, **measure(modules, args.repeats, torch.float32 if args.dtype == "fp32" else torch.bfloat16,
                                           args.size)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
