"""Layers of a one-pass exact forward over row patches that may differ in height.

A model run once (the VAE decode), not step after step, has nothing stale to use: every
exchange is synchronous and fresh, so the patched forward equals the whole one up to rounding.
Rows are dealt as evenly as possible (the first `rows % N` patches get one row more), so any
height splits. Convolutions take exact halo rows from their neighbours and run in row chunks
of bounded size; GroupNorm combines every patch's moments, weighted by its rows; self-attention
attends over every patch's tokens. Each layer runs its module's own forward outside a patched
call (`RowSplit.active`), so the model still works whole.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, TypeVar

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from backends import Communicator

from .patch_attention import PatchSelfAttention
from .stale_groupnorm import combine, local_moments, normalize

T = TypeVar("T")


def split_rows(rows: int, patches: int) -> list[int]:
    """Rows of each of `patches` row patches of `rows` rows: the first `rows % patches` get one more."""
    if rows < patches:
        raise ValueError(f"{rows} rows cannot be cut into {patches} row patches (each needs a row; use fewer ranks)")
    return [rows // patches + (r < rows % patches) for r in range(patches)]


class RowSplit:
    """Which rows of the whole input this rank holds, and the synchronous exchanges of a patched call.

    `rows` (per rank) is set for one call by `patched(rows)`; a layer's rows at any depth are
    these times a common factor (the layers keep or double the height), so a patch's share of a
    layer's elements is its share of the input's rows. `chunk_bytes` bounds a convolution's
    per-chunk input (0: no chunks).
    """

    def __init__(self, comm: Communicator, chunk_bytes: int = 0):
        self.comm, self.chunk_bytes = comm, chunk_bytes
        self.rank, self.world_size = comm.rank, comm.world_size
        self.rows: list[int] = []
        self.active = False
        self._shares: dict[tuple, torch.Tensor] = {}

    @contextlib.contextmanager
    def patched(self, rows: list[int]) -> Iterator[None]:
        """Within: the patched layers exchange with the other ranks, whose patches have `rows` rows."""
        self.rows, self.active, self._shares = rows, True, {}
        try:
            yield
        finally:
            self.active = False

    @property
    def exchanges_enabled(self) -> bool:
        """Whether the layers exchange (what `PatchSelfAttention` asks its context)."""
        return self.active

    def shares(self, like: torch.Tensor) -> torch.Tensor:
        """(N,) each patch's fraction of the rows, in `like`'s dtype and device (made once a call)."""
        key = (like.dtype, like.device)
        if key not in self._shares:
            self._shares[key] = torch.tensor(self.rows, dtype=like.dtype, device=like.device) / sum(self.rows)
        return self._shares[key]

    def gather(self, tensor: torch.Tensor, tag: str) -> torch.Tensor:
        """(N, *tensor.shape): `tensor` of every rank, now."""
        return self.comm.all_gather(tensor, tag=tag)


class SyncExchange:
    """The `patch_context.Exchange` interface over `RowSplit.gather`: `use` of every rank's `fresh`, now."""

    def __init__(self, split: RowSplit, tag: str):
        self.split, self.tag = split, tag

    def run(self, fresh: torch.Tensor, use: Callable[[torch.Tensor], T], sync: bool = True) -> T:
        return use(self.split.gather(fresh, self.tag))


class RowsConv2d:
    """Forward of a stride-1 `nn.Conv2d` on this rank's rows: exact halos from the neighbours,
    computed in row chunks whose input stays under `split.chunk_bytes` (zero padding at the
    image's top and bottom, as the whole convolution pads)."""

    def __init__(self, conv: nn.Conv2d, split: RowSplit, tag: str):
        if conv.padding_mode != "zeros" or conv.dilation != (1, 1) or conv.stride != (1, 1):
            raise ValueError(f"row patches support stride 1, dilation 1 and zero padding, got {conv}")
        if conv.padding[0] != conv.kernel_size[0] // 2:
            raise ValueError(f"row patches support 'same' convolutions, got {conv}")
        self.conv, self.split = conv, split
        self.tag = tag
        self.pad = conv.padding[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        conv, split, p = self.conv, self.split, self.pad
        if not split.active or p == 0:
            return conv._conv_forward(x, conv.weight, conv.bias)
        if x.shape[-2] < p:
            raise ValueError(f"a patch of {x.shape[-2]} rows is thinner than the {p}-row halo of {conv}")
        edges = split.gather(torch.stack([x[..., :p, :], x[..., -p:, :]]), self.tag)
        zeros = torch.zeros_like(edges[0, 0])
        top = edges[split.rank - 1, 1] if split.rank > 0 else zeros
        bottom = edges[split.rank + 1, 0] if split.rank < split.world_size - 1 else zeros
        return self.chunked(x, top, bottom)

    def chunked(self, x: torch.Tensor, top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        """The convolution of `x` with `top` and `bottom` halo rows above and below it."""
        conv, p, h = self.conv, self.pad, x.shape[-2]
        b, c, _, w = x.shape
        row_bytes = b * max(c, conv.out_channels) * w * x.element_size()
        step = max(1, self.split.chunk_bytes // row_bytes - 2 * p) if self.split.chunk_bytes else h
        if step >= h:
            return self._conv(torch.cat([top, x, bottom], dim=-2))
        out = torch.empty((b, conv.out_channels, h, w), dtype=x.dtype, device=x.device)
        for lo in range(0, h, step):
            hi = min(h, lo + step)
            parts = [top] * (lo == 0) + [x[..., max(0, lo - p):hi + p, :]] + [bottom] * (hi == h)
            out[..., lo:hi, :] = self._conv(torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0])
        return out

    def _conv(self, rows: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        return F.conv2d(rows, conv.weight, conv.bias, 1, (0, conv.padding[1]), 1, conv.groups)


class RowsGroupNorm:
    """Forward of an `nn.GroupNorm` on this rank's rows with the exact statistics of all rows:
    every patch's moments, combined weighted by its share of the rows."""

    def __init__(self, gn: nn.GroupNorm, split: RowSplit, tag: str):
        self.gn, self.split, self.tag = gn, split, tag

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gn, split = self.gn, self.split
        if not split.active:
            return F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)
        every = split.gather(local_moments(x, gn), self.tag)
        stats = combine(every, split.shares(every))
        return normalize(x, stats, gn)


class RowsSelfAttention(PatchSelfAttention):
    """Self-attention of this rank's tokens over every patch's tokens, for (B, C, H, W) inputs
    (the VAE's mid-block) or tokens; patches of unequal rows exchange K/V padded to the
    tallest patch and drop the padding before attending."""

    def __init__(self, split: RowSplit, tag: str):
        super().__init__(split, SyncExchange(split, tag))
        self.split = split

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        if hidden_states.ndim != 4:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        b, c, h, w = hidden_states.shape
        tokens = super().__call__(attn, hidden_states.view(b, c, h * w).transpose(1, 2), encoder_hidden_states,
                                  attention_mask, temb, **kwargs)
        return tokens.transpose(1, 2).reshape(b, c, h, w)

    def _fresh_kv(self, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        kv = PatchSelfAttention._fresh_kv(key, value)
        tallest = max(self.split.rows) * kv.shape[0] // self.split.rows[self.split.rank]
        return F.pad(kv, (0, 0, 0, 0, 0, tallest - kv.shape[0]))

    def _all_tokens(self, kv: torch.Tensor, fresh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_row = fresh.shape[0] // max(self.split.rows)
        kv = torch.cat([kv[r, :rows * per_row] for r, rows in enumerate(self.split.rows)]).transpose(0, 1)
        c = kv.shape[-1] // 2
        return kv[..., :c], kv[..., c:]
