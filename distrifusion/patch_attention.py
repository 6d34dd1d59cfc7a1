"""Self-attention on a row patch: queries of this patch's tokens attend over every token,
using this patch's fresh K/V and the other patches' K/V (fresh or from the last step).
Cross-attention needs nothing from other patches and keeps its processor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from .patch_context import Exchange, PatchContext


class PatchSelfAttention:
    """A diffusers attention processor for self-attention (`attn1`) on a patch."""

    def __init__(self, ctx: PatchContext, exchange: Exchange):
        self.ctx, self.exchange = ctx, exchange

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None:
            raise ValueError("patch self-attention expects plain self-attention (no context, mask or spatial norm)")
        residual = hidden_states
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        if self.ctx.exchanges_enabled:
            key, value = self._all_tokens(torch.stack([key, value]))
        b, heads = query.shape[0], attn.heads
        d = query.shape[-1] // heads
        query, key, value = (t.view(b, -1, heads, d).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(b, -1, heads * d).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _all_tokens(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(2, B, L, C) of this patch -> K and V over all N*L tokens in raster order."""
        rank, (_, b, n_tokens, c) = self.ctx.rank, kv.shape

        def assemble(gathered: torch.Tensor) -> torch.Tensor:
            full = gathered.permute(1, 2, 0, 3, 4).reshape(2, b, -1, c)
            full[:, :, rank * n_tokens:(rank + 1) * n_tokens] = kv
            return full

        full = self.exchange.run(kv, assemble)
        return full[0], full[1]
