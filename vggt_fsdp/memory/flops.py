"""The work of a forward and backward pass, counted op by op: FLOPs by kind and memory-bound bytes.

A `Counter` (a TorchDispatchMode) sees every aten op a module call runs. An op with a formula in
`torch.utils.flop_counter` does FLOPs, of one kind:

    attention    the fused scaled-dot-product-attention kernels (forward and backward)
    matmul       mm, addmm, bmm, ... (the Linear layers)
    convolution  convolution and its backward

Every other op is memory-bound: it is charged the bytes it reads and writes (its tensor inputs and
outputs, each by its memory footprint: a broadcast operand counts once), views none. That is what eager
PyTorch moves through device memory, one kernel per op, with no fusion.

Counting runs on the meta device: shapes only, no memory, no arithmetic, so the work of a VGGT-1B
block at 24 frames costs what it costs at one. Two things differ there from a GPU run, and
`MetaFunctions` puts them back:

- Attention. `F.scaled_dot_product_attention` on meta tensors takes the math path (bmm, softmax), so the
  count would be matmul FLOPs and bytes of a score matrix no GPU kernel writes. `MetaFunctions` calls the
  fused flash kernel's op instead, whose meta kernel and FLOP formula torch has: the count is the one a
  GPU's fused kernel is charged, forward and backward (whose formula includes re-computing q k^T).
- Autocast. `torch.autocast` cannot be entered on the meta device at all, not even disabled
  (torch 2.13: `torch.autocast("meta", enabled=False)` raises "unsupported scalarType"). FLOPs do not
  depend on dtypes, bytes do: with `autocast=torch.bfloat16` `MetaFunctions` casts the inputs of the
  ops CUDA autocast casts (`AUTOCAST_LOWER`: matmuls, convolutions, attention, to bf16;
  `AUTOCAST_FP32`: LayerNorm, softmax and the other ops on CUDA's fp32 list, to fp32), at the function
  call, as autograd-visible casts, as CUDA autocast does; everything else runs in its inputs' dtypes.

Model FLOPs (`Work.model_flops`, the figure MFU is quoted against) leave out that recompute of q k^T in
the fused attention backward: the math path's backward has four products where the fused one has five.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper
from torch.utils.module_tracker import ModuleTracker

KINDS = ("attention", "matmul", "convolution")

aten = torch.ops.aten


def _packets(names: Iterable[str]) -> frozenset:
    return frozenset(getattr(aten, name) for name in names if hasattr(aten, name))


# Fused attention ops whose tensors are laid out (batch, heads, seq, head_dim): query at args[0] forward,
# at args[1] (after the output gradient) backward.
ATTENTION_FORWARD = _packets((
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"))
ATTENTION_BACKWARD = _packets((
    "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention_backward", "_scaled_dot_product_flash_attention_for_cpu_backward"))
CONVOLUTION = _packets(("convolution", "_convolution", "cudnn_convolution", "cudnn_convolution_transpose",
                        "convolution_backward"))
# Ops that move no memory although their schema returns a fresh tensor (they alias or only allocate).
_FREE = _packets(("_unsafe_view", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
                  "new_empty_strided", "_local_scalar_dense"))


@shape_wrapper
def _cpu_flash_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@shape_wrapper
def _cpu_flash_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch has no formula for the CPU flash kernel: the GPU kernels' formulas, so a CPU count of a real
# model sees the attention a GPU would be charged for.
_EXTRA_FORMULAS: dict = {}
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_flop
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
    _EXTRA_FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_backward_flop


def op_kind(packet) -> str | None:
    """The FLOP kind of an aten op packet, or None for a memory-bound op."""
    if packet in ATTENTION_FORWARD or packet in ATTENTION_BACKWARD:
        return "attention"
    if packet in CONVOLUTION:
        return "convolution"
    if packet in flop_registry or packet in _EXTRA_FORMULAS:
        return "matmul"
    return None


# ======================================================================================== work
@dataclass(frozen=True)
class Work:
    """FLOPs by kind (as the kernels run them), model FLOPs, and memory-bound bytes."""

    flops: tuple[tuple[str, int], ...] = ()  # (kind, FLOPs) in KINDS order, kinds with none omitted
    model_flops: int = 0
    bytes: int = 0

    @classmethod
    def of(cls, flops: dict[str, int] | None = None, model_flops: int = 0, bytes: int = 0) -> Work:
        flops = flops or {}
        return cls(tuple((k, int(flops[k])) for k in KINDS if flops.get(k)), int(model_flops), int(bytes))

    def by_kind(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        out.update(self.flops)
        return out

    @property
    def total_flops(self) -> int:
        return sum(v for _, v in self.flops)

    def __add__(self, other: Work) -> Work:
        a, b = self.by_kind(), other.by_kind()
        return Work.of({k: a[k] + b[k] for k in KINDS}, self.model_flops + other.model_flops,
                       self.bytes + other.bytes)

    def __mul__(self, n: int) -> Work:
        return Work.of({k: v * n for k, v in self.by_kind().items()}, self.model_flops * n, self.bytes * n)

    __rmul__ = __mul__

    def to_dict(self) -> dict:
        return {"flops": self.by_kind(), "model_flops": self.model_flops, "bytes": self.bytes}


def total(works: Iterable[Work]) -> Work:
    out = Work()
    for w in works:
        out = out + w
    return out


@dataclass(frozen=True)
class OpRecord:
    """One op of a counted forward pass: what it did and inside which modules (paths relative to the
    counted module, "" for the module itself)."""

    op: object  # the aten OpOverload
    work: Work
    modules: frozenset[str]


@dataclass
class CallCount:
    """A counted module call: its forward ops one by one, the moments its forward saved tensors for
    backward (`saves`: how many ops had run, and inside which modules), and the whole backward."""

    forward_ops: list[OpRecord] = field(default_factory=list)
    saves: list[tuple[int, frozenset[str]]] = field(default_factory=list)
    backward: Work = field(default_factory=Work)

    @functools.cached_property
    def forward(self) -> Work:
        return total(r.work for r in self.forward_ops)

    def recompute(self, inside: Callable[[frozenset[str]], bool],
                  cached: Callable[[], Callable[[OpRecord], bool]] | None = None) -> Work:
        """The forward work a non-reentrant checkpoint of the modules `inside` selects runs again in
        backward. Each call of such a module (a run of consecutive ops inside it) is re-run from its
        start until it has saved again every tensor its backward unpacks, then stops (torch's early
        stop): the ops after its last save, such as the output projection whose input was saved before
        it ran, are not re-run. `cached` makes, per call, the predicate of the ops a selective policy
        kept (their outputs come from its cache; they do not run again)."""
        work = Work()
        for start, end in _runs([inside(r.modules) for r in self.forward_ops]):
            last_save = max((n for n, modules in self.saves if inside(modules) and start <= n <= end), default=start)
            kept = cached() if cached is not None else (lambda r: False)
            flags = [kept(r) for r in self.forward_ops[start:end]]  # in order: a policy may count ops
            work = work + total(r.work for r, k in zip(self.forward_ops[start:last_save], flags) if not k)
        return work


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """(start, end) of each run of True in `flags`; end is exclusive."""
    runs, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


# ======================================================================================== counting
def _footprint(t: torch.Tensor) -> int:
    """Bytes a kernel touches reading or writing `t`: its elements, or its strided extent when smaller
    (a broadcast operand is read once)."""
    if t.numel() == 0:
        return 0
    extent = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
    return min(t.numel(), extent) * t.element_size()


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _attention_recompute(packet, args) -> int:
    """FLOPs of q k^T that a fused attention backward re-computes (not model FLOPs)."""
    if packet not in ATTENTION_BACKWARD:
        return 0
    b, h, s_q, d = args[1].shape
    return 2 * b * h * s_q * args[2].shape[-2] * d


def op_work(func, args, kwargs, out) -> Work:
    """The work of one dispatched op."""
    packet = func._overloadpacket
    kind = op_kind(packet)
    if kind is not None:
        formula = flop_registry.get(packet) or _EXTRA_FORMULAS[packet]
        flops = int(formula(*args, **kwargs, out_val=out))
        return Work.of({kind: flops}, flops - _attention_recompute(packet, args))
    if packet in _FREE or _is_view(func):
        return Work()
    tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
    return Work.of(bytes=sum(_footprint(t) for t in tensors))


class Counter(TorchDispatchMode):
    """Records the work of every op dispatched while it is active, attributed to the modules running."""

    def __init__(self, tracker: ModuleTracker | None = None, root: str = ""):
        super().__init__()
        self.tracker = tracker
        self.root = root
        self.records: list[OpRecord] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.records.append(OpRecord(func, op_work(func, args, kwargs, out), self.modules()))
        return out

    def modules(self) -> frozenset[str]:
        """The modules running now, by path relative to the counted module."""
        if self.tracker is None:
            return frozenset()
        prefix = self.root + "."
        return frozenset("" if p == self.root else p[len(prefix):] for p in self.tracker.parents
                         if p == self.root or p.startswith(prefix))

    @property
    def work(self) -> Work:
        return total(r.work for r in self.records)


def count_call(fn: Callable, *args, root: torch.nn.Module | None = None, autocast: torch.dtype | None = None,
               **kwargs) -> CallCount:
    """Count `fn(*args, **kwargs)` (a module, or a method of `root`) and its backward, from a gradient of
    ones on every floating output that requires grad, under `MetaFunctions(autocast)`. Inputs are the
    caller's (meta) tensors. Forward ops are attributed to the sub-modules of the module called (paths
    relative to it); a method's own ops to none."""
    root = fn if isinstance(fn, torch.nn.Module) else root
    saves: list[tuple[int, frozenset[str]]] = []
    with MetaFunctions(autocast):
        tracker = ModuleTracker()
        with tracker, Counter(tracker, type(root).__name__ if root is not None else "") as forward:
            def pack(t: torch.Tensor) -> torch.Tensor:
                saves.append((len(forward.records), forward.modules()))
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = fn(*args, **kwargs)
        outputs = [t for t in tree_flatten(out)[0]
                   if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
        grads = [torch.ones_like(t) for t in outputs]
        with Counter() as backward:
            if outputs:
                torch.autograd.backward(outputs, grads)
    return CallCount(forward.records, saves, backward.work)


# ======================================================================================== meta functions
# CUDA autocast's op lists (torch.amp docs, "CUDA Ops that can autocast to float16/float32"), by the
# name of the Python function or Tensor method the model calls.
AUTOCAST_LOWER = frozenset((
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "addr",
    "mv", "einsum", "chain_matmul", "prelu", "scaled_dot_product_attention",
))
AUTOCAST_FP32 = frozenset((
    "layer_norm", "group_norm", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "pow", "__pow__", "__rpow__", "softplus", "acos", "asin", "cosh", "sinh", "tan", "erfinv", "dist",
    "cdist", "renorm", "logsumexp", "cosine_similarity", "mse_loss", "l1_loss", "smooth_l1_loss",
    "huber_loss", "nll_loss", "cross_entropy", "binary_cross_entropy_with_logits", "kl_div",
))
# On CUDA's list too, but autocast passes dtype=float32 to these instead of casting their input.
AUTOCAST_FP32_OUTPUT = frozenset(("softmax", "log_softmax", "cumsum", "cumprod", "sum", "prod"))
_LOWERABLE = (torch.float32,)
_WIDENABLE = (torch.float16, torch.bfloat16)


class MetaFunctions(TorchFunctionMode):
    """What a GPU run does that a meta run would not (see the module docstring): fused attention for
    `F.scaled_dot_product_attention` on meta tensors, and, with `autocast` a dtype, CUDA autocast's casts."""

    def __init__(self, autocast: torch.dtype | None = None):
        super().__init__()
        self.autocast = autocast

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.autocast is not None:
            if name in AUTOCAST_LOWER:
                args, kwargs = _cast(args, kwargs, _LOWERABLE, self.autocast)
            elif name in AUTOCAST_FP32:
                args, kwargs = _cast(args, kwargs, _WIDENABLE, torch.float32)
            elif name in AUTOCAST_FP32_OUTPUT and kwargs.get("dtype") is None and _first_dtype(args) in _WIDENABLE:
                kwargs = {**kwargs, "dtype": torch.float32}
        if func is F.scaled_dot_product_attention and args[0].device.type == "meta":
            return _fused_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _cast(args, kwargs, from_dtypes, to_dtype):
    def cast(x):
        if isinstance(x, torch.Tensor) and x.dtype in from_dtypes:
            return x.to(to_dtype)
        return x

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _first_dtype(args) -> torch.dtype | None:
    return next((a.dtype for a in args if isinstance(a, torch.Tensor)), None)


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """The kernel a GPU picks for these inputs: flash (no mask), else memory-efficient (a mask)."""
    if enable_gqa:
        raise NotImplementedError("counting grouped-query attention on the meta device is not supported")
    if attn_mask is None:
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[0]
    return aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, True, dropout_p, is_causal,
                                                       scale=scale)[0]


# ======================================================================================== losses
def surrogate_loss(outputs: object) -> torch.Tensor:
    """Sum of the means of every floating-point tensor in a (nested) model output that requires grad.

    Stands in for the training loss when counting: every output receives a gradient, as the real losses
    give them, while its own work (a few ops per output element) is negligible beside the model's.
    """
    tensors = [t for t in tree_flatten(outputs)[0]
               if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not tensors:
        raise ValueError("the model output holds no floating-point tensor that requires grad")
    return sum(t.float().mean() for t in tensors)

