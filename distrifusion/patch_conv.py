"""Convolution on a row patch: the kernel needs `padding` rows above and below the patch,
taken from the neighbouring patches (fresh or stale) instead of zero padding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .patch_context import Exchange, PatchContext


def needs_halo(conv: nn.Conv2d) -> bool:
    return conv.padding[0] > 0 if isinstance(conv.padding, tuple) else False


class PatchConv2d:
    """Forward of one `nn.Conv2d` on this rank's rows, with halo rows from its neighbours."""

    def __init__(self, conv: nn.Conv2d, ctx: PatchContext, exchange: Exchange):
        if conv.padding_mode != "zeros" or conv.dilation[0] != 1:
            raise ValueError(f"patch convolution supports zero padding and dilation 1, got {conv}")
        self.conv, self.ctx, self.exchange = conv, ctx, exchange
        self.pad = conv.padding[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        conv, ctx, p = self.conv, self.ctx, self.pad
        if not ctx.exchanges_enabled:
            return conv._conv_forward(x, conv.weight, conv.bias)
        if x.shape[-2] < p:
            raise ValueError(f"a patch of {x.shape[-2]} rows is thinner than the {p}-row halo of {conv}")
        edges = torch.stack([x[..., :p, :], x[..., -p:, :]])
        rank, last = ctx.rank, ctx.world_size - 1

        def with_halo(gathered: torch.Tensor) -> torch.Tensor:
            top = gathered[rank - 1, 1] if rank > 0 else torch.zeros_like(edges[0])
            bottom = gathered[rank + 1, 0] if rank < last else torch.zeros_like(edges[0])
            return torch.cat([top, x, bottom], dim=-2)

        padded = self.exchange.run(edges, with_halo)
        return F.conv2d(padded, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), 1, conv.groups)
