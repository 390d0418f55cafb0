"""Materialising a meta-device model (vggt_fsdp.parallel.materialize): the weights a CPU build has,
errors that name what no method initialises, and, on 2 processes with different seeds, the weights one
process would make with rank 0's seed, sharded (full and hybrid) or not, for a user's model and VGGT."""
from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from vggt_fsdp.parallel.materialize import MaterializeError, materialize_module

REPO = Path(__file__).resolve().parents[1]
from vggt_fsdp.tasks import own_model  # noqa: E402  (the starter task's model: a user's own classes)

SEED = 100  # rank r of the 2-process test seeds SEED + r


def encoder_stack() -> nn.Module:
    """Only torch's own layers, MultiheadAttention among them (its init is a private method). Built in
    the order the modules are registered, as the comparison with a CPU build needs (nn.TransformerEncoder
    would not be: it deep-copies one layer built before it)."""
    return nn.Sequential(nn.Linear(5, 16), *(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True) for _ in range(2)),
                         nn.LayerNorm(16), nn.Linear(16, 3))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, non-persistent ones included, as full tensors (collective if sharded)."""
    from vggt_fsdp.parallel.checkpointing import canonical_name

    out = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        out[canonical_name(name)] = full.detach().clone()
    return out


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


# --------------------------------------------------------------------------------------- one process
@pytest.mark.parametrize("build", [own_model.build, encoder_stack], ids=["own_model", "torch_encoder"])
def test_a_meta_build_gets_the_weights_a_cpu_build_has(build):
    torch.manual_seed(SEED)
    want = state(build())
    with torch.device("meta"):
        model = build()
    torch.manual_seed(SEED)
    materialize_module(model, "cpu")
    assert_same(state(model), want)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


class _Unruly(nn.Module):
    """What the protocol cannot see: a parameter, a computed float buffer and an int buffer with no
    method that writes them, and a parameter its reset_parameters only half writes."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(4, 8))
        self.register_buffer("table", torch.arange(8.0), persistent=False)
        self.register_buffer("index", torch.arange(8))


class _HalfInit(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(4, 8))

    def reset_parameters(self):
        with torch.no_grad():
            self.weight[:2].normal_()


def test_the_error_names_each_uninitialised_tensor_its_class_and_the_method_to_add():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), _Unruly(), _HalfInit())
    with pytest.raises(MaterializeError) as err:
        materialize_module(model, "cpu")
    message = str(err.value)
    assert "3 tensor(s)" not in message and "4 tensor(s) were not initialised" in message
    for line in [f"1.pos: parameter of {__name__}._Unruly; give that class a reset_parameters()",
                 f"1.table: buffer of {__name__}._Unruly; give that class a reset_buffers()",
                 f"1.index: buffer of {__name__}._Unruly; give that class a reset_buffers()",
                 f"2.weight: parameter of {__name__}._HalfInit; give that class a reset_parameters()"]:
        assert line in message
    assert "0.weight" not in message and "0.bias" not in message  # nn.Linear initialised itself


def test_an_integer_buffer_counts_as_written_inside_a_module_with_an_init_method():
    class Counted(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))

        def reset_buffers(self):
            self.steps.zero_()

    with torch.device("meta"):
        model = nn.Sequential(Counted())
    materialize_module(model, "cpu")
    assert model[0].steps.item() == 0


# --------------------------------------------------------------------------------------- 2 processes, gloo
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _own_parallel(mode: str):
    from vggt_fsdp.parallel.config import LayoutConfig, ParallelConfig

    cfg = ParallelConfig(layout=LayoutConfig(block_types=["TransformerLayer"], attention_types=["SelfAttention"],
                                             units=["head"], groups={}))
    cfg.precision.param_dtype, cfg.precision.fp32_modules = "fp32", []
    if mode == "hybrid":
        cfg.sharding.mode, cfg.sharding.shard_degree = "hybrid", 1
    return cfg


def _tiny_vggt_cfg():
    from vggt_fsdp.recipe import load_recipe, model_config

    return model_config(load_recipe(REPO / "recipes" / "cpu_tiny.yaml").model)


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from vggt_fsdp.model import build_model, materialize
    from vggt_fsdp.parallel import apply_parallelism, build_mesh
    from vggt_fsdp.parallel.materialize import one_process_init

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    result = {}
    for mode in ("full", "hybrid"):
        cfg = _own_parallel(mode)
        with torch.device("meta"):
            model = own_model.build()
        apply_parallelism(model, cfg, build_mesh(cfg.sharding, "cpu"))
        torch.manual_seed(SEED + rank)  # per-rank seeds, as a loop seeding its data streams would
        materialize_module(model, "cpu")
        result[f"rng_after_{mode}"] = torch.rand(4)  # the rank's own stream, untouched by the init
        result[f"own_{mode}"] = state(model)
        result[f"own_{mode}_local_rows"] = model.layers[0].fc1.weight.to_local().shape[0]

    # VGGT as the trainer materialises it: its own init rules, inside one_process_init.
    cfg = _tiny_vggt_cfg()
    fp32 = _own_parallel("full")
    fp32.layout = type(fp32.layout)()  # VGGT's default layout
    for inside in (True, False):
        model = build_model(cfg, device="meta")
        apply_parallelism(model, fp32, build_mesh(fp32.sharding, "cpu"))
        torch.manual_seed(SEED + rank)
        if inside:
            with one_process_init("cpu"):
                materialize(model, "cpu")
        else:
            materialize(model, "cpu")
        result[f"vggt_{'one_process' if inside else 'plain'}"] = state(model)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("materialize")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("mode", ["full", "hybrid"])
def test_every_rank_gets_rank_0s_single_process_init_whatever_its_seed(two_ranks, mode):
    torch.manual_seed(SEED)
    want = state(own_model.build())
    for rank in two_ranks:
        assert_same(rank[f"own_{mode}"], want)
    # Full sharding really split the weights (each rank held half the rows); hybrid replicated them.
    assert two_ranks[0]["own_full_local_rows"] == want["layers.0.fc1.weight"].shape[0] // 2
    assert two_ranks[0]["own_hybrid_local_rows"] == want["layers.0.fc1.weight"].shape[0]


def test_the_init_leaves_each_ranks_random_stream_where_it_was(two_ranks):
    for r, rank in enumerate(two_ranks):
        torch.manual_seed(SEED + r)
        want = torch.rand(4)
        assert torch.equal(rank["rng_after_full"], want) and torch.equal(rank["rng_after_hybrid"], want)


def test_vggt_materialised_inside_one_process_init_matches_one_process(two_ranks):
    """The trainer's path. Without the context, DTensor on the CPU draws each shard from the rank's own
    generator, so the sharded model is not the one a single process makes (the defect it fixes)."""
    from vggt_fsdp.model import build_model, materialize

    model = build_model(_tiny_vggt_cfg(), device="meta")
    torch.manual_seed(SEED)
    want = state(materialize(model, "cpu"))
    for rank in two_ranks:
        assert_same(rank["vggt_one_process"], want)
    plain = two_ranks[0]["vggt_plain"]
    assert any(not torch.equal(plain[name], want[name]) for name in want)
