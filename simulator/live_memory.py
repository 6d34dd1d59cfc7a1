"""Device memory held by live tensors while real code runs on the meta device.

`LiveMemory` is a dispatch mode that sees every tensor an op returns and tracks its storage
(not the tensor: views share their base's storage and count once) until Python frees the last
tensor using it (a weak reference's callback), as PyTorch's CUDA caching allocator frees a
block when its last user dies. `live` is what is held now, `peak` the most held since entry or
`reset_peak()`; both count only storages created under the mode (`storage_bytes` sizes those
made before, such as weights). Sizes are rounded like the caching allocator's blocks
(c10/cuda/CUDACachingAllocator.cpp: a multiple of 512 bytes, at least 512), so `peak` stands
for `torch.cuda.max_memory_allocated()` of the same code. Library workspaces (cuDNN, cuBLAS)
and communication libraries' own buffers are not tensors and are not seen.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

BLOCK = 512  # the caching allocator's smallest block and rounding step


def allocation_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator counts for a `nbytes` storage."""
    return 0 if nbytes <= 0 else -(-nbytes // BLOCK) * BLOCK


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Allocated bytes of the distinct storages behind `tensors` (shared storages once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st._cdata] = allocation_bytes(st.nbytes())
    return sum(seen.values())


class LiveMemory(TorchDispatchMode):
    """Bytes of live storages of `device_type` created under the mode, and their peak."""

    def __init__(self, device_type: str = "meta"):
        super().__init__()
        self.device_type = device_type
        self.live = self.peak = 0
        self._held: dict[int, tuple[weakref.ref, int]] = {}

    def reset_peak(self) -> None:
        """Start a new peak from what is held now."""
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                self._track(t.untyped_storage(), aliases_input=id(t.untyped_storage()) in inputs)
        return out

    def _track(self, st: Any, aliases_input: bool) -> None:
        """Count a new storage; an output aliasing an input (a view, an in-place or out= op)
        is not new, unless the op resized a tracked one."""
        key, size = id(st), allocation_bytes(st.nbytes())
        held = self._held.get(key)
        if held is not None and size != held[1]:
            self._held[key] = (held[0], size)
            self.live += size - held[1]
        elif held is None and not aliases_input:
            self._held[key] = (weakref.ref(st, lambda _ref, key=key: self._free(key)), size)
            self.live += size
        self.peak = max(self.peak, self.live)

    def _free(self, key: int) -> None:
        self.live -= self._held.pop(key)[1]
