"""A library's model through a task: transformers' `Dinov2Model` (random init) with a linear head, trained
by `vggt-fsdp train examples/hf_dinov2.yaml`, no change to its classes.

Needs `transformers` (`pip install transformers --constraint <(echo torch==$(python -c 'import torch;
print(torch.__version__)'))` keeps your torch; transformers itself does not depend on torch).

The model is built on the meta device; after sharding the trainer initialises it by the modules' own
`reset_parameters()` and then by Dinov2's own `init_weights()` (transformers' `_init_weights`: truncated
normal weights, the CLS and position tokens, the layer-scale lambdas), which the trainer finds on the
`backbone` sub-module (vggt_fsdp/tasks/base.py: model_init). The recipe's `parallel.layout` names
transformers' classes: `Dinov2Layer` blocks, their `Dinov2Attention`.

The data: random images whose target is each image's mean colour, a task a few steps learn.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Dinov2Regressor(nn.Module):
    """Dinov2Model, then a linear head on its pooled (CLS) output."""

    def __init__(self, config, outputs: int = 3):
        super().__init__()
        from transformers import Dinov2Model

        self.backbone = Dinov2Model(config)
        self.head = nn.Linear(config.hidden_size, outputs)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(pixel_values=pixel_values).pooler_output)


class MeanColour(torch.utils.data.Dataset):
    """`items` random images (3, size, size), item i drawn from (seed, i); the target is its mean colour."""

    def __init__(self, items: int, size: int, seed: int):
        self.items, self.size, self.seed = items, size, seed

    def __len__(self) -> int:
        return self.items

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        tint = torch.rand(3, 1, 1, generator=generator)
        image = tint + 0.25 * torch.randn(3, self.size, self.size, generator=generator)
        return {"pixel_values": image, "target": image.mean(dim=(1, 2))}


class Dinov2Task:
    def __init__(self, config, items: int, seed: int):
        with torch.device("meta"):
            self.model = Dinov2Regressor(config)
        self.dataset = MeanColour(items, config.image_size, seed)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(model(batch["pixel_values"]).float(), batch["target"])


def build(recipe) -> Dinov2Task:
    """`task: examples/hf_dinov2.py:build`; task_config.dinov2: Dinov2Config fields, task_config.items."""
    from transformers import Dinov2Config

    options = dict(recipe.task_config)
    config = Dinov2Config(**{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32,
                             "patch_size": 8, **options.get("dinov2", {})})
    return Dinov2Task(config, int(options.get("items", 1024)), recipe.train.seed)
