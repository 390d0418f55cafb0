"""Initialisation and materialisation of a model built on the meta device.

`vggt.build_model(cfg, device="meta")` allocates nothing; `materialize(model, device)` gives every
parameter real storage and the init upstream's constructors would give it (default module init,
then the special inits), and refills the non-persistent buffers (ImageNet mean/std). It works on
a plain model or one whose parameters FSDP has already sharded (DTensors), because it only calls
in-place init functions.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

# Parameters upstream creates with torch.randn and no later init (track head).
_STANDARD_NORMAL_PARAMETERS = ("query_ref_token", "virual_tracks")


def _post_order(module: nn.Module) -> Iterator[nn.Module]:
    for child in module.children():
        yield from _post_order(child)
    yield module


@torch.no_grad()
def init_special_parameters(model: nn.Module) -> None:
    """Only the inits beyond the modules' defaults (what constructors do after building)."""
    for module in _post_order(model):
        if hasattr(module, "init_special_parameters"):
            module.init_special_parameters()
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] in _STANDARD_NORMAL_PARAMETERS:
            nn.init.normal_(param)


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """(Re)initialise every parameter and non-persistent buffer in place.

    Children before parents, so that a parent's own init (e.g. the track transformer's Xavier init
    of all its Linears) wins over its children's defaults, as in the constructors.
    """
    covered: set[int] = set()
    for module in _post_order(model):
        hooks = []
        if isinstance(module, nn.MultiheadAttention):
            hooks.append(module._reset_parameters)
        elif hasattr(module, "reset_parameters"):
            hooks.append(module.reset_parameters)
        if hasattr(module, "init_special_parameters"):
            hooks.append(module.init_special_parameters)
        for hook in hooks:
            hook()
        if hooks:
            covered.update(id(t) for t in module._parameters.values() if t is not None)
            covered.update(id(t) for t in module._buffers.values() if t is not None)
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] in _STANDARD_NORMAL_PARAMETERS:
            nn.init.normal_(param)
            covered.add(id(param))
    uncovered = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if id(t) not in covered]
    if uncovered:
        raise RuntimeError(f"no init rule for {len(uncovered)} tensor(s): {uncovered[:5]}; "
                           "give their module reset_parameters() or init_special_parameters()")


def materialize(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Allocate a meta-built model on `device` and initialise it (returns the same module)."""
    model.to_empty(device=device)
    init_weights(model)
    return model
