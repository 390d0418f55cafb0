"""A starter task: your own model, trained by `vggt-fsdp train` (copy it: `vggt-fsdp recipe copy own_model DIR`).

Everything here is yours to replace; nothing imports the toolkit. The recipe beside it
(own_model.yaml) names `task: own_model.py:build_task`, and the trainer calls `build_task(recipe)`,
which returns a task: the model, a map-style dataset of (input, target) pairs that torch's default
collate stacks, and `loss(model, batch)`. Optional hooks the trainer uses when present (`val_dataset`
with `metrics`, `collate`, `init_weights`, `load_weights`, `tokens`, `num_workers`) are described in
vggt_fsdp/tasks/base.py; this one has a validation set and a metric.

The model has its own attention, block and head classes (the recipe's `parallel.layout` names them),
a learned position table and a non-persistent buffer computed in `__init__`. It is built on the meta
device (no memory, any size): the trainer allocates each rank's shards only and initialises them by
the model's own methods, as torch's layers do: every module initialises its parameters in
`reset_parameters()` and recomputes the buffers its `__init__` computes in `reset_buffers()` (which
`__init__` calls, so a CPU build and a meta build give the same weights for the same seed). A model
without such methods (a library's) is initialised by its own `init_weights()` / `_init_weights(module)`
(transformers' models), by a task hook `init_weights(model)`, or built on the CPU instead of meta.

`vggt-fsdp recipe show own_model.yaml --model own_model.py:build` shows its FSDP units and
`vggt-fsdp plan own_model.yaml --model own_model.py:build --size 64` its memory (`example_inputs`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class OwnConfig:
    in_dim: int = 12  # features per input token
    dim: int = 64
    heads: int = 4
    depth: int = 4
    mlp_ratio: int = 4
    seq_len: int = 32
    out_dim: int = 3


SEQ_LEN = OwnConfig.seq_len


class SelfAttention(nn.Module):
    """Multi-head self-attention over the tokens (fused SDPA)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class TransformerLayer(nn.Module):
    """Pre-norm block: attention, then an MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SinusoidalPositions(nn.Module):
    """A fixed sinusoidal table added to the tokens: a non-persistent buffer (in no state dict), so on
    the meta device `reset_buffers()` is its only source."""

    def __init__(self, seq_len: int, dim: int):
        super().__init__()
        self.register_buffer("table", torch.empty(seq_len, dim), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        seq_len, dim = self.table.shape
        position = torch.arange(seq_len, dtype=torch.float32, device=self.table.device)[:, None]
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=self.table.device)
                         * (-math.log(10000.0) / dim))
        self.table[:, 0::2] = torch.sin(position * freq)
        self.table[:, 1::2] = torch.cos(position * freq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[: x.shape[1]].to(x.dtype)


class Head(nn.Module):
    """Per-token regression head (its own FSDP unit in own_model.yaml)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


class OwnModel(nn.Module):
    def __init__(self, cfg: OwnConfig = OwnConfig()):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.in_dim, cfg.dim)
        self.positions = SinusoidalPositions(cfg.seq_len, cfg.dim)
        self.layers = nn.ModuleList(TransformerLayer(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.head = Head(cfg.dim, cfg.out_dim)
        # A learned per-position offset: a parameter of this module itself, so this module inits it.
        self.pos = nn.Parameter(torch.empty(cfg.seq_len, cfg.dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.positions(self.embed(x)) + self.pos[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def build(cfg: OwnConfig = OwnConfig()) -> OwnModel:
    """The model alone, for `--model own_model.py:build` (`recipe show`, `plan`: built on the meta device)."""
    return OwnModel(cfg)


def example_inputs(size: int) -> tuple[torch.Tensor]:
    """One forward's inputs at `size` sequences (the per-GPU batch `plan --size` scales over)."""
    return (torch.randn(size, SEQ_LEN, OwnConfig.in_dim),)


class Regression(torch.utils.data.Dataset):
    """`items` (input, target) pairs: target = a fixed random linear map of each token (drawn from
    `seed`) plus a sine of its position, which the model can learn. Item i is drawn from (seed, i)
    alone: any process makes the same item, and nothing is held in memory."""

    def __init__(self, cfg: OwnConfig, items: int, seed: int):
        self.cfg, self.items, self.seed = cfg, items, seed
        generator = torch.Generator().manual_seed(seed)
        self.teacher = torch.randn(cfg.in_dim, cfg.out_dim, generator=generator) / cfg.in_dim ** 0.5
        self.position = torch.sin(torch.arange(cfg.seq_len, dtype=torch.float32) / 4)[:, None]

    def __len__(self) -> int:
        return self.items

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        x = torch.randn(self.cfg.seq_len, self.cfg.in_dim, generator=generator)
        return x, x @ self.teacher + self.position


class OwnTask:
    """What the trainer needs: model, dataset, loss; and a validation set with a metric."""

    def __init__(self, cfg: OwnConfig, items: int, val_items: int, seed: int):
        with torch.device("meta"):  # shapes only: the trainer allocates each rank's shards
            self.model = OwnModel(cfg)
        self.dataset = Regression(cfg, items, seed)
        self.val_dataset = Regression(cfg, val_items, seed + 1)
        self.val_dataset.teacher = self.dataset.teacher  # the same task on held-out inputs

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(model(x).float(), y)

    def metrics(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        error = model(x).float() - y
        return {"loss": error.square().mean(), "mean_abs_error": error.abs().mean()}


def build_task(recipe) -> OwnTask:
    """`task: own_model.py:build_task`. recipe.task_config: `model` (OwnConfig fields), `items` and
    `val_items` (dataset sizes)."""
    options = dict(recipe.task_config)
    model = options.pop("model", {})
    items, val_items = options.pop("items", 4096), options.pop("val_items", 256)
    if options:
        raise ValueError(f"task_config: unknown key(s) {sorted(options)}; valid: model, items, val_items")
    known = {f.name for f in fields(OwnConfig)}
    if set(model) - known:
        raise ValueError(f"task_config.model: unknown key(s) {sorted(set(model) - known)}; valid: {sorted(known)}")
    return OwnTask(OwnConfig(**model), items, val_items, recipe.train.seed)
