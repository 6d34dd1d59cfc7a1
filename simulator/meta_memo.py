"""`MetaMemo`: a dispatch mode that remembers the output shapes of meta-device ops.

Many meta kernels are Python reference implementations (about half a millisecond an op);
a UNet repeats the same op on the same shapes hundreds of times per step and for every
step. An op seen before with the same input shapes, strides, dtypes and other arguments
gets fresh empty outputs of the remembered layout instead of running its meta kernel.
Views and ops that mutate an argument always run (their outputs alias their inputs).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


class _Layout(NamedTuple):
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


def _leaf_key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.stride(), x.dtype, x.device.type)
    if isinstance(x, _PLAIN):
        return (type(x), x)
    raise TypeError  # not memoisable


class MetaMemo(TorchDispatchMode):
    """Enter it before (under) other dispatch modes; they still see every op."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: dict[tuple, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.is_view or func._schema.is_mutable:
            return func(*args, **kwargs)
        leaves, _ = tree_flatten((args, kwargs))
        try:
            key = (func, tuple(_leaf_key(x) for x in leaves))
        except TypeError:
            return func(*args, **kwargs)
        hit = self.cache.get(key)
        if hit is not None:
            spec, layouts = hit
            return tree_unflatten([torch.empty_strided(x.shape, x.stride, dtype=x.dtype, device="meta") if isinstance(x, _Layout) else x
                                   for x in layouts], spec)
        out = func(*args, **kwargs)
        flat, spec = tree_flatten(out)
        if all(not isinstance(t, torch.Tensor) or t.device.type == "meta" for t in flat):
            self.cache[key] = (spec, [_Layout(tuple(t.shape), t.stride(), t.dtype) if isinstance(t, torch.Tensor)
                                      else t for t in flat])
        return out
