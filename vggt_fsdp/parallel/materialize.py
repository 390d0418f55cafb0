"""Give a model built on the meta device real storage and its initial values, the same on every rank.

    with torch.device("meta"):
        model = MyModel()                       # shapes only: no memory, no init
    apply_parallelism(model, recipe.parallel)   # or prepare_model(accelerator, ...): shard while on meta
    materialize_module(model, accelerator.device)

The protocol, the module's own methods (torch's convention, extended to buffers), called children
before parents so that a parent's init wins as it does in constructors (a model whose modules are
built in the order they are registered gets, for the same seed, exactly the weights a CPU build has):
- `reset_parameters()`: initialise the module's own parameters (torch's layers have it; for torch's
  `MultiheadAttention` and `Transformer` their `_reset_parameters()` is called).
- `reset_buffers()`: recompute the module's buffers, the ones its `__init__` computes (rotary tables,
  sinusoidal positions, masks). On the meta device `__init__` computed nothing, and a non-persistent
  buffer is in no checkpoint either, so this method is its only source. A module that computes a buffer
  in `__init__` should call its own `reset_buffers()` there, so both paths share one definition.

Nothing is guessed: after `to_empty` every floating tensor is filled with NaN, and one that no method
wrote stays NaN and is named in the error with its module's class and the method to add (a buffer of
integers or booleans counts as written when a method of its module or of a module around it ran).

Same weights on every rank whatever the per-rank seed, and the same as one process would make: inside
`one_process_init`, every rank draws from rank 0's random state, and a write into a sharded tensor
(a DTensor: `nn.init.*`, `Tensor.normal_`/`uniform_`/..., `copy_` of a full tensor) is made on a
full-size temporary, of which each rank keeps its own shard. The result is independent of the world
size and equal to an unsharded init with rank 0's seed; memory is one full parameter at a time. (On
the CPU, DTensor draws each shard from the local generator: with equal seeds every shard of a weight
would hold the same values, with per-rank seeds the replicas of a hybrid mesh would differ.)
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.overrides import TorchFunctionMode

from vggt_fsdp.parallel.checkpointing import canonical_name

# Modules whose init is a private method (torch calls it from __init__).
_PRIVATE_RESET = (nn.MultiheadAttention, nn.Transformer)

# Functions that overwrite the whole tensor they are given (first argument or `tensor=`): on a DTensor
# they run on a full-size temporary instead. nn.init's remaining functions (xavier_*, kaiming_normal_,
# orthogonal_, ...) reach these through Tensor methods.
_FULL_WRITES = {
    torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.bernoulli_, torch.Tensor.exponential_,
    torch.Tensor.random_, torch.Tensor.cauchy_, torch.Tensor.log_normal_, torch.Tensor.geometric_,
    torch.Tensor.copy_,
    nn.init.uniform_, nn.init.normal_, nn.init.trunc_normal_, nn.init.kaiming_uniform_, nn.init.constant_,
}


class MaterializeError(RuntimeError):
    """Tensors no init method wrote; the message names them, their module class and the method to add."""


# ---------------------------------------------------------------------------------------- one process
class _ShardedWritesInFull(TorchFunctionMode):
    """A full write into a DTensor runs on a plain tensor of the global shape; each rank keeps its shard.
    Inside this handler the mode is off, so the write itself is an ordinary op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if func not in _FULL_WRITES or not isinstance(target, DTensor):
            return func(*args, **kwargs)
        if func is torch.Tensor.copy_:
            source = args[1] if len(args) > 1 else kwargs["src"]
            if isinstance(source, DTensor) or tuple(source.shape) != tuple(target.shape):
                return func(*args, **kwargs)  # DTensor to DTensor, or broadcasting: DTensor's own rules
        with torch.no_grad():
            full = torch.empty(target.shape, dtype=target.dtype, device=target.to_local().device)
            if args:
                func(full, *args[1:], **kwargs)
            else:
                func(**{**kwargs, "tensor": full})
            shard = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
            target.to_local().copy_(shard.to_local())
        return target


def _generators(device: torch.device) -> list[tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], None]]]:
    """(get_state, set_state) of the generators an init on `device` draws from."""
    pairs = [(torch.get_rng_state, torch.set_rng_state)]
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        pairs.append((lambda: torch.cuda.get_rng_state(index), lambda s: torch.cuda.set_rng_state(s, index)))
    return pairs


@contextlib.contextmanager
def one_process_init(device: str | torch.device = "cpu") -> Iterator[None]:
    """Initialise as one process would, on every rank (collective when a process group is up).

    Every rank starts from rank 0's random state (broadcast), writes into sharded tensors are made in
    full (see the module docstring), and each rank's own random state is restored on exit: the init
    draws nothing from the per-rank streams a training loop seeds afterwards.
    """
    generators = _generators(torch.device(device))
    own = [get() for get, _ in generators]
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [own]
        dist.broadcast_object_list(box, src=0)
        for (_, put), state in zip(generators, box[0]):
            put(state)
    try:
        with _ShardedWritesInFull():
            yield
    finally:
        for (_, put), state in zip(generators, own):
            put(state)


# ---------------------------------------------------------------------------------------- materialise
def init_hooks(module: nn.Module) -> list[Callable[[], None]]:
    """The module's own init methods, in the order they run: parameters, then buffers."""
    hooks = []
    if isinstance(module, _PRIVATE_RESET):
        hooks.append(module._reset_parameters)
    elif callable(getattr(module, "reset_parameters", None)):
        hooks.append(module.reset_parameters)
    if callable(getattr(module, "reset_buffers", None)):
        hooks.append(module.reset_buffers)
    return hooks


def _post_order(module: nn.Module, path: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        yield from _post_order(child, f"{path}.{name}" if path else name)
    yield path, module


def _own_tensors(model: nn.Module) -> Iterator[tuple[str, str, nn.Module, str, torch.Tensor]]:
    """(module path, tensor name, module, 'parameter' | 'buffer', tensor), each tensor once."""
    seen: set[int] = set()
    for path, module in model.named_modules():
        for kind, table in (("parameter", module._parameters), ("buffer", module._buffers)):
            for name, tensor in table.items():
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    yield path, name, module, kind, tensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _checked_by_value(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def materialize_module(model: nn.Module, device: str | torch.device,
                       model_init: Callable[[], None] | None = None) -> nn.Module:
    """Allocate a meta-built (possibly already sharded) model on `device` and initialise it by the
    protocol above, the same on every rank (collective when a process group is up). `model_init`: a
    whole-model init run after the modules' own methods (transformers' `init_weights()`, a task's hook).
    Raises MaterializeError, on every rank, naming each tensor nothing wrote. Returns `model`."""
    device = torch.device(device)
    model.to_empty(device=device)
    with torch.no_grad():
        for *_, tensor in _own_tensors(model):
            if _checked_by_value(tensor):
                _local(tensor).fill_(float("nan"))
    initialised: list[str] = []  # paths of modules with an init method
    with one_process_init(device), torch.no_grad():
        for path, module in _post_order(model):
            hooks = init_hooks(module)
            for hook in hooks:
                hook()
            if hooks:
                initialised.append(path)
        if model_init is not None:
            model_init()
            initialised.append("")
    missing = _unwritten(model, initialised, device)
    if missing:
        raise MaterializeError(_describe_missing(missing))
    return model


def _unwritten(model: nn.Module, initialised: list[str], device: torch.device) -> list[tuple[str, str, nn.Module, str]]:
    """Tensors still NaN (on any rank), and non-floating ones outside every initialised module."""
    entries = list(_own_tensors(model))
    nan = torch.tensor([bool(_checked_by_value(t) and _local(t).isnan().any()) for *_, t in entries],
                       dtype=torch.uint8, device=device)
    if any(isinstance(t, DTensor) for *_, t in entries) and dist.is_initialized():
        dist.all_reduce(nan, op=dist.ReduceOp.MAX)  # a shard may be empty here and NaN elsewhere

    def covered(path: str) -> bool:
        return any(p == "" or path == p or path.startswith(p + ".") for p in initialised)

    return [(path, name, module, kind) for (path, name, module, kind, tensor), flag in zip(entries, nan.tolist())
            if flag or (not _checked_by_value(tensor) and not covered(path))]


def _user_class(module: nn.Module) -> type:
    """The model's own class (FSDP2 puts an FSDP<Name> subclass in its place)."""
    if isinstance(module, FSDPModule):
        return next(c for c in type(module).__mro__[1:] if not issubclass(c, FSDPModule))
    return type(module)


def _describe_missing(missing: list[tuple[str, str, nn.Module, str]]) -> str:
    lines = []
    for path, name, module, kind in missing[:20]:
        cls = _user_class(module)
        where = canonical_name(f"{path}.{name}" if path else name)
        method = "reset_parameters() that initialises it" if kind == "parameter" else "reset_buffers() that computes it"
        lines.append(f"  {where}: {kind} of {cls.__module__}.{cls.__qualname__}; give that class a {method}")
    more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
    return (f"materialize_module: {len(missing)} tensor(s) were not initialised by any module method "
            "(reset_parameters / reset_buffers, called children first) nor by a whole-model init:\n"
            + "\n".join(lines) + more + "\nTwo routes: initialise them on the meta-built model (the methods "
            "above, the model's own init_weights() or _init_weights(module) as transformers' models have, or "
            "a task's init_weights(model) hook), or build the model on the CPU instead of the meta device "
            "(its constructor initialises it; each rank holds it whole until it is sharded)")
