"""Several nodes without SLURM: `torchrun --nnodes 2` started twice on this host (two agents, one per
"node", 2 processes each, c10d rendezvous on a free port) trains with hybrid sharding, replicate 2 x
shard 2 (shard_degree auto = the processes of a node), fp32, and a run on a different number of nodes
continues it exactly.

A: two agents train 3 steps, saving at step 2 and 3.
B: one agent of 4 processes (one node, the same 2 x 2 mesh: shard_degree=2) resumes a copy of A's run
   cut back to its step-2 checkpoint and trains step 3: the same scenes (world size 4, ranks 0-3 draw
   what they drew in A) give A's step-3 loss and A's final weights, bit for bit.

One process cannot be the reference: the sampler seeds each rank's camera draws with its rank
(vggt_fsdp/data/sampler.py), so a world of 1 never draws a world of 4's scenes; a one-node run of the
same world size does.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from processes import finish, start

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "cpu_tiny.yaml")
# Exact and small: fp32 everywhere, 56 px, 2 frames a scene, one scene a rank, no loader workers.
TINY = ["data.image_width=56", "data.frames_range=[2,2]", "data.frames_per_gpu=2", "data.num_workers=0",
        "parallel.precision.param_dtype=fp32", "accelerate.mixed_precision=no", "train.log_every=1",
        "train.progress_bar=false", "schedule.warmup_steps=1", "parallel.sharding.mode=hybrid",
        "train.max_steps=3", "train.checkpoint_every=2", "train.keep_last=3"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(nnodes: int, nproc: int, port: int, out: Path, *overrides: str):
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"multinode-{port}",
               "-m", "vggt_fsdp.train", RECIPE, *TINY, f"train.output_dir={out}", *overrides]
    return start(command, dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))


def _check(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-4000:]}"
    return result.stderr


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    port = _free_port()
    agents = [_torchrun(2, 2, port, root / "a") for _ in range(2)]
    a_logs = [_check(finish(agent, 240)) for agent in agents]
    # B: A's run as it stood after step 2 (its later checkpoint and records are what B must reproduce)
    shutil.copytree(root / "a", root / "b", ignore=shutil.ignore_patterns("step-0000003", "model.safetensors"))
    b_log = _check(finish(_torchrun(1, 4, _free_port(), root / "b", "parallel.sharding.shard_degree=2"), 240))
    return {"root": root, "a_logs": a_logs, "b_log": b_log}


def test_two_agents_train_one_world_of_four_with_a_two_by_two_hybrid_mesh(runs):
    records = [json.loads(line) for line in (runs["root"] / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {(r["world_size"], r["sharding"]) for r in records} == {(4, "hybrid")}
    assert sum("over 4 cpu process(es)" in log for log in runs["a_logs"]) == 1  # rank 0 is on one agent only
    assert (runs["root"] / "a" / "checkpoints" / "step-0000003").is_dir()


def test_one_node_resumes_the_two_node_run_exactly(runs):
    a, b = runs["root"] / "a", runs["root"] / "b"
    assert "step-0000002 at step 2" in runs["b_log"]
    assert _losses(b) == _losses(a)  # steps 1-2 kept from A, step 3 trained again on one node: equal
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
