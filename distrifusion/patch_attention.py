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
            fresh = self._fresh_kv(key, value)
            out = self.exchange.run(fresh, lambda kv: self._attend(attn, query, *self._all_tokens(kv, fresh)))
        else:
            out = self._attend(attn, query, key, value)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _fresh_kv(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """This patch's (B, L, C) K and V as one (L, B, 2C) tensor: gathered from every patch
        into an (N, L, B, 2C) buffer, that layout is all tokens' K/V in raster order."""
        return torch.cat([key.transpose(0, 1), value.transpose(0, 1)], dim=-1)

    def _all_tokens(self, kv: torch.Tensor, fresh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N*L, C) views of K and V over the gather buffer, with this patch's slot made fresh
        (in a displaced step the buffer holds last step's values; its own gather of the fresh
        ones starts after the attention has read the buffer)."""
        kv[self.ctx.rank] = fresh
        kv = kv.flatten(0, 1).transpose(0, 1)
        c = kv.shape[-1] // 2
        return kv[..., :c], kv[..., c:]

    @staticmethod
    def _attend(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of (B, Lq, C) queries over (B, Lk, C) keys and values (views welcome)."""
        b, heads = query.shape[0], attn.heads
        d = query.shape[-1] // heads
        query, key, value = (t.view(b, -1, heads, d).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value)
        return out.transpose(1, 2).reshape(b, -1, heads * d).to(query.dtype)
