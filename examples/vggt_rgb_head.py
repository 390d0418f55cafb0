"""VGGT extended through a task: one more DPT head that predicts each pixel's colour (as vggt#230 adds an RGB
head for view synthesis), with its loss, fine-tuned from VGGT weights.

    vggt-fsdp train examples/vggt_rgb_head.yaml model.init_weights=PATH/TO/model.safetensors

- The model: `VGGTWithRGB`, a VGGT subclass with `rgb_head`, a DPT head like the depth head with three
  sigmoid colour channels and a confidence. Its other tensors keep VGGT's names, so VGGT weights load.
- The weights: `model.init_weights` loads strictly for everything VGGT has (a missing, extra or wrongly
  shaped tensor is an error) while `rgb_head` keeps its initialisation, and the log says how many
  tensors and parameters that is (`new_modules` of the built-in task, vggt_fsdp/tasks/vggt.py).
- The loss: VGGT's (the recipe's `loss:` section) plus `task_config.rgb_weight` x the confidence-weighted L1
  between the predicted and the input colours, logged as the `loss_rgb` term.
- Everything else is the built-in VGGT task's: the recipe's model:, data: and loss: sections, the scene
  loader, validation, sharding (the recipe adds `rgb_head` to the FSDP units and the fp32 modules).
"""
from __future__ import annotations

import torch
from torch import nn

from vggt_fsdp.model.vggt import VGGT, _at_least_fp32, _build_dpt_head
from vggt_fsdp.recipe import model_config
from vggt_fsdp.tasks.vggt import VGGTBuiltin, VGGTTask


class VGGTWithRGB(VGGT):
    def __init__(self, config):
        super().__init__(config)
        self.rgb_head = _build_dpt_head(config, 4, "sigmoid")  # 3 colour channels + confidence

    def forward(self, images: torch.Tensor, query_points: torch.Tensor | None = None) -> dict:
        captured = {}
        # The aggregator's tokens, which VGGT's forward keeps to itself: taken as it returns them.
        hook = self.aggregator.register_forward_hook(lambda module, args, out: captured.update(out=out))
        try:
            predictions = super().forward(images, query_points)
        finally:
            hook.remove()
        tokens_list, patch_start_idx = captured["out"]
        images = images if images.ndim == 5 else images.unsqueeze(0)
        with torch.autocast(device_type=images.device.type, enabled=False):  # a head computes in fp32
            rgb, rgb_conf = self.rgb_head(tokens_list, images=_at_least_fp32(images), patch_start_idx=patch_start_idx)
        predictions["rgb"], predictions["rgb_conf"] = rgb, rgb_conf
        return predictions


class RGBLossTask(VGGTTask):
    """VGGT's loss plus the colour term."""

    rgb_weight = 1.0

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        from vggt_fsdp.losses import compute_loss

        predictions = self.predict(model, batch)
        loss, terms = compute_loss(predictions, batch, self.loss_cfg)
        target = batch["images"].permute(0, 1, 3, 4, 2).float()  # (B, S, H, W, 3) in [0, 1]
        conf = predictions["rgb_conf"].float()
        l1 = (predictions["rgb"].float() - target).abs().sum(-1)
        rgb = (conf * l1 - 0.05 * torch.log(conf)).mean()  # confidence-weighted, as VGGT's dense losses
        terms["loss_rgb"] = rgb.detach()
        return loss + self.rgb_weight * rgb, terms


class RGBTask(VGGTBuiltin):
    def __init__(self, recipe):
        with torch.device("meta"):
            model = VGGTWithRGB(model_config(recipe.model))
        super().__init__(recipe, model=model, new_modules=("rgb_head",))
        self.name = f"{self.name} + rgb_head"

    def make_task(self, loader) -> VGGTTask:
        task = super().make_task(loader)
        task.__class__ = RGBLossTask  # the same loader, shapes and validation; the loss above
        task.rgb_weight = float(self.recipe.task_config.get("rgb_weight", 1.0))
        return task


def build(recipe) -> RGBTask:
    """`task: vggt_rgb_head.py:build`: the built-in VGGT task's sections, plus task_config.rgb_weight."""
    unknown = set(recipe.task_config) - {"rgb_weight"}
    if unknown:
        raise ValueError(f"task_config: unknown key(s) {sorted(unknown)}; valid: rgb_weight")
    return RGBTask(recipe)
