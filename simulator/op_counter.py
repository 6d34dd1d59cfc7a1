"""Count the FLOPs and bytes of every aten op a model runs, cut into compute segments.

`OpCounter` is a context manager stacking a `TorchDispatchMode` (every aten op) and a
`TorchFunctionMode` (only to see `scaled_dot_product_attention` whole: on the meta device it
would decompose into bmm/softmax, whose bytes a fused kernel never moves; the fused aten
variants, flash / efficient / cudnn / math, are also caught if called directly). Ops are
grouped by (kind, key): kind is the aten op name ("sdpa" for every attention variant), key
the dtype and input shapes plus the integer arguments (strides, padding, dims). It reads shapes only, so
it works on the `meta` device. With a `clock` (`simulator.device_timing`) it also marks where each
op starts and ends, and `seconds()` reads the marks once the work has run (for calibration).

FLOPs: convolution 2*N*Cout*Hout*Wout*(Cin/groups)*kh*kw; mm/addmm/bmm/baddbmm 2*M*K*N per
matrix; attention 2*B*H*Lq*Lk*(d_qk + d_v) (= 4*B*H*Lq*Lk*d); every other op one FLOP per
element of its largest tensor. Bytes: every tensor read plus every tensor written
(numel * element size). Views and allocations are free and not counted.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

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


class Clock(Protocol):
    """Marks points of a device's timeline (see `simulator.device_timing`)."""

    contiguous: bool

    def mark(self) -> Any: ...

    def seconds(self, start: Any, end: Any) -> float: ...


@dataclass
class OpStat:
    """Totals of `count` launches of op `kind` with shape key `key` (`seconds`: set by a calibration)."""

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
        start = counter.begin()
        out = func(*args, **kwargs)
        span = counter.end(start)
        leaves = tree_flatten((args, kwargs))[0]
        read = tree_flatten((args, {k: v for k, v in kwargs.items() if k != "out"}))[0]  # out= is only written
        inputs = [x for x in read if isinstance(x, torch.Tensor)]
        outputs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        name = func.overloadpacket.__name__
        nbytes = sum(_numel_bytes(t) for t in inputs + outputs)
        if name in SDPA_ATEN:  # called directly, not through F.scaled_dot_product_attention
            counter.add(SDPA, op_key(list(args[:3])), sdpa_flops(*args[:3]), nbytes, span)
        else:
            counter.add(name, op_key(leaves), op_flops(name, inputs, outputs, args), nbytes, span)
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
        query, key, value = (*args, *(kwargs[name] for name in ("query", "key", "value")[len(args):]))[:3]
        with counter.pause():
            start = counter.begin()
            if query.device.type == "meta":
                out = _attention_output(query, value)
            else:
                out = func(*args, **kwargs)
            span = counter.end(start)
        nbytes = sum(_numel_bytes(t) for t in (query, key, value, out))
        counter.add(SDPA, op_key([query, key, value]), sdpa_flops(query, key, value), nbytes, span)
        return out


class OpCounter:
    """`with OpCounter() as c: model(...)`; `c.cut(tag)` closes the current compute segment.

    `totals` accumulates every op over the counter's life. With a `clock`, every op counted
    inside `with` is bracketed by two marks of it, kept in `spans` as ((kind, key), start,
    end); `region(label)` brackets uncounted work the same way. Nothing is read from a mark
    until `seconds()`.
    """

    def __init__(self, clock: Clock | None = None):
        self.clock = clock
        self.active = self.paused = False
        self.segment: dict[tuple[str, str], OpStat] = {}
        self.totals: dict[tuple[str, str], OpStat] = {}
        self.spans: list[tuple[tuple[str, str], Any, Any]] = []
        self._last_mark: Any = None
        self._stack = contextlib.ExitStack()

    def begin(self) -> Any:
        """The start mark of an interval (None when not timing)."""
        if self.clock is None or not self.active:
            return None
        if self.clock.contiguous and self._last_mark is not None:
            return self._last_mark
        return self.clock.mark()

    def end(self, start: Any) -> tuple[Any, Any] | None:
        """The (start, end) marks of the interval `begin()` opened (None when not timing)."""
        if start is None:
            return None
        self._last_mark = self.clock.mark()
        return start, self._last_mark

    def add(self, kind: str, key: str, flops: float, nbytes: float, span: tuple[Any, Any] | None = None) -> None:
        """Count one launch of (kind, key) in the current segment and the totals (and its span)."""
        for table in (self.segment, self.totals):
            stat = table.get((kind, key))
            if stat is None:
                stat = table[(kind, key)] = OpStat(kind, key)
            stat.flops += flops
            stat.bytes += nbytes
            stat.count += 1
        if span is not None:
            self.spans.append(((kind, key), *span))

    def seconds(self) -> dict[tuple[str, str], float]:
        """Seconds per (kind, key) (or (label, "") of a region) over `spans`; read only after the
        marked work has run (on CUDA: after a synchronize)."""
        out: dict[tuple[str, str], float] = {}
        for key, start, end in self.spans:
            out[key] = out.get(key, 0.0) + self.clock.seconds(start, end)
        return out

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Ops run inside are not counted (e.g. an emulated collective's copies)."""
        was, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = was

    @contextlib.contextmanager
    def region(self, label: str) -> Iterator[None]:
        """Uncounted work, timed as the span (label, "") when timing."""
        with self.pause():
            start = self.begin()
            yield
            span = self.end(start)
        if span is not None:
            self.spans.append(((label, ""), *span))

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
        self.active, self._last_mark = True, None
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False
        self._stack.close()
