"""Count the FLOPs and bytes of every aten op a model runs, cut into compute segments.

`OpCounter` is a context manager stacking a `TorchDispatchMode` (every aten op) and a
`TorchFunctionMode` (only to see `scaled_dot_product_attention` whole: on the meta device it
would decompose into bmm/softmax, whose bytes a fused kernel never moves; the fused aten
variants, flash / efficient / cudnn / math, are also caught if called directly). Ops are
grouped by (kind, key): kind is the aten op name ("sdpa" for every attention variant), key
the dtype and input shapes plus the integer arguments (strides, padding, dims). It reads shapes only, so
it works on the `meta` device; with `timed=True` it also times each op (for calibration).

FLOPs: convolution 2*N*Cout*Hout*Wout*(Cin/groups)*kh*kw; mm/addmm/bmm/baddbmm 2*M*K*N per
matrix; attention 2*B*H*Lq*Lk*(d_qk + d_v) (= 4*B*H*Lq*Lk*d); every other op one FLOP per
element of its largest tensor. Bytes: every tensor read plus every tensor written
(numel * element size). Views and allocations are free and not counted.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
FREE_OPS = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
            aten.new_empty.default, aten.new_empty_strided.default, aten._unsafe_view.default,
            aten.lift_fresh.default, aten._local_scalar_dense.default, aten.detach.default}
SDPA = "sdpa"
SDPA_ATEN = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_attention_math")
_DTYPE_NAMES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64"}


@dataclass
class OpStat:
    """Totals of `count` launches of op `kind` with shape key `key` (seconds only when timed)."""

    kind: str
    key: str
    flops: float = 0.0
    bytes: float = 0.0
    count: int = 0
    seconds: float = 0.0

    def to_op(self) -> dict[str, Any]:
        """The trace's op layout `{"kind", "key", "flops", "bytes", "count"}`."""
        return {"kind": self.kind, "key": self.key, "flops": self.flops, "bytes": self.bytes, "count": self.count}


def _numel_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def op_key(leaves: list[Any]) -> str:
    """dtype | input shapes | integer and boolean arguments of an op whose flattened arguments
    are `leaves`, e.g. `f16|2x4x8x8,32x4x3x3|1,1,0,0`."""
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    dtype = _DTYPE_NAMES.get(tensors[0].dtype, str(tensors[0].dtype).removeprefix("torch.")) if tensors else "-"
    ints = [str(x) for x in leaves if isinstance(x, (bool, int)) and not isinstance(x, torch.Tensor)]
    return f"{dtype}|{','.join(_shape(t) for t in tensors)}|{','.join(ints)}"


def op_flops(name: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor], args: tuple) -> float:
    """FLOPs of one aten op named `name` (see the module docstring)."""
    if name == "convolution":
        # weight (Cout, Cin/groups, kh, kw): every output element takes Cin/groups*kh*kw MACs;
        # transposed, weight (Cin, Cout/groups, kh, kw): every input element feeds that many
        x, w, transposed = args[0], args[1], args[6]
        return 2.0 * (x if transposed else outputs[0]).numel() * math.prod(w.shape[1:])
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
        return 2.0 * math.prod(a.shape) * b.shape[-1]
    sizes = [t.numel() for t in inputs + outputs]
    return float(max(sizes, default=0))


def sdpa_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> float:
    """2*B*H*Lq*Lk*(d_qk + d_v): the QK^T and PV products of one attention call."""
    return 2.0 * math.prod(query.shape[:-1]) * key.shape[-2] * (query.shape[-1] + value.shape[-1])


class _AtenMode(TorchDispatchMode):
    def __init__(self, counter: "OpCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        if counter.paused or func in FREE_OPS or func.is_view:
            return func(*args, **kwargs)
        start = counter.clock()
        out = func(*args, **kwargs)
        seconds = counter.clock() - start
        leaves = tree_flatten((args, kwargs))[0]
        inputs = [x for x in leaves if isinstance(x, torch.Tensor)]
        outputs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        name = func.overloadpacket.__name__
        nbytes = sum(_numel_bytes(t) for t in inputs + outputs)
        if name in SDPA_ATEN:  # called directly, not through F.scaled_dot_product_attention
            counter.add(SDPA, op_key(list(args[:3])), sdpa_flops(*args[:3]), nbytes, seconds)
        else:
            counter.add(name, op_key(leaves), op_flops(name, inputs, outputs, args), nbytes, seconds)
        return out


def _attention_output(query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """An empty attention output laid out as fused kernels (CPU and CUDA flash) return it:
    (B, H, L, D) in (B, L, H, D) memory, so the usual transpose back to tokens is free."""
    shape = (*query.shape[:-1], value.shape[-1])
    if query.dim() != 4:
        return query.new_empty(shape)
    b, h, length, d = shape
    return query.new_empty((b, length, h, d)).transpose(1, 2)


class _AttentionMode(TorchFunctionMode):
    def __init__(self, counter: "OpCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        if func is not F.scaled_dot_product_attention or counter.paused:
            return func(*args, **kwargs)
        query, key, value = args[:3]
        with counter.pause():
            start = counter.clock()
            if query.device.type == "meta":
                out = _attention_output(query, value)
            else:
                out = func(*args, **kwargs)
            seconds = counter.clock() - start
        nbytes = sum(_numel_bytes(t) for t in (query, key, value, out))
        counter.add(SDPA, op_key([query, key, value]), sdpa_flops(query, key, value), nbytes, seconds)
        return out


class OpCounter:
    """`with OpCounter() as c: model(...)`; `c.cut(tag)` closes the current compute segment.

    `totals` accumulates every op over the counter's life; `timed=True` times each op with
    `sync` (e.g. `torch.cuda.synchronize`) called before and after it.
    """

    def __init__(self, timed: bool = False, sync: Callable[[], None] | None = None):
        self.timed, self.sync = timed, sync
        self.paused = False
        self.segment: dict[tuple[str, str], OpStat] = {}
        self.totals: dict[tuple[str, str], OpStat] = {}
        self._stack = contextlib.ExitStack()

    def clock(self) -> float:
        """perf_counter after `sync` when timing, else 0."""
        if not self.timed:
            return 0.0
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    def add(self, kind: str, key: str, flops: float, nbytes: float, seconds: float = 0.0) -> None:
        """Count one launch of (kind, key) in the current segment and the totals."""
        for table in (self.segment, self.totals):
            stat = table.get((kind, key))
            if stat is None:
                stat = table[(kind, key)] = OpStat(kind, key)
            stat.flops += flops
            stat.bytes += nbytes
            stat.count += 1
            stat.seconds += seconds

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Ops run inside are not counted (e.g. an emulated collective's copies)."""
        was, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = was

    def cut(self, tag: str) -> dict[str, Any] | None:
        """The ops since the last cut as a trace compute event named `tag` (None if none)."""
        if not self.segment:
            return None
        ops = [s.to_op() for s in self.segment.values()]
        self.segment = {}
        return {"type": "compute", "tag": tag, "flops": sum(o["flops"] for o in ops),
                "bytes": sum(o["bytes"] for o in ops), "ops": ops}

    def __enter__(self) -> "OpCounter":
        self._stack.enter_context(_AttentionMode(self))
        self._stack.enter_context(_AtenMode(self))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
