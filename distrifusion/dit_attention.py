"""Attention of a diffusion transformer on a row patch of image tokens: this rank's queries
attend over every patch's image tokens (and the text tokens, which every rank holds).

One processor serves every DiT attention of diffusers: PixArt's image self-attention (`attn1`),
SD3's joint text-image attention (`JointTransformerBlock.attn`) and its second image
self-attention (`attn2`), Flux's double-stream attention (text and image projected apart) and
single-stream attention (one sequence, text first). Image K/V, taken after the per-head
normalisation and (Flux) the rotary embedding of each token's global position, travel through
an `Exchange`: fresh in synchronous steps, last step's in displaced ones. Text K/V are computed
by every rank and never exchanged. Cross-attention (PixArt's `attn2`) keeps its processor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from .patch_context import Exchange, PatchContext
from .token_rows import TokenRows


@dataclass
class PatchTokens:
    """What the patched layers of one transformer need to know about the current call, set by
    the transformer-level forward: the image token rows, and how many text tokens lead a joint
    sequence (Flux's single-stream blocks)."""

    rows: TokenRows | None = None
    text: int = 0


def check_attention(attn: torch.nn.Module) -> None:
    """Raise unless `attn` is a plain multi-head attention `PatchTokenAttention` can stand in for."""
    if getattr(attn, "fused_projections", False):
        raise ValueError("patch parallelism needs separate Q/K/V projections: unfuse_qkv_projections() first")
    unsupported = [name for name in ("group_norm", "spatial_norm") if getattr(attn, name, None) is not None]
    if getattr(attn, "residual_connection", False) or getattr(attn, "rescale_output_factor", 1.0) != 1.0:
        unsupported.append("residual_connection/rescale_output_factor")
    if unsupported:
        raise ValueError(f"patch DiT attention does not support {unsupported}")


def _norm(norm: torch.nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


class PatchTokenAttention:
    """A diffusers attention processor for image (or joint text-image) attention on a patch.

    `text_prefix`: `hidden_states` is one sequence of `tokens.text` text tokens followed by this
    rank's image tokens (Flux's single-stream blocks); otherwise it holds image tokens only and
    text, if any, comes as `encoder_hidden_states` with its own projections (`add_*_proj`).
    """

    def __init__(self, ctx: PatchContext, exchange: Exchange, tokens: PatchTokens, text_prefix: bool = False):
        self.ctx, self.exchange, self.tokens, self.text_prefix = ctx, exchange, tokens, text_prefix

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, image_rotary_emb=None, **kwargs):
        if attention_mask is not None:
            raise ValueError("patch DiT attention takes no attention mask")
        heads = attn.heads
        query, key, value = (p(hidden_states).unflatten(-1, (heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
        query, key = _norm(attn.norm_q, query), _norm(attn.norm_k, key)
        text = self.tokens.text if self.text_prefix else 0
        if encoder_hidden_states is not None:
            text = encoder_hidden_states.shape[1]
            projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            tq, tk, tv = (p(encoder_hidden_states).unflatten(-1, (heads, -1)) for p in projections)
            tq, tk = _norm(attn.norm_added_q, tq), _norm(attn.norm_added_k, tk)
            query, key, value = (torch.cat(pair, dim=1) for pair in ((tq, query), (tk, key), (tv, value)))
        if image_rotary_emb is not None:  # cos/sin of [text, this rank's image tokens]
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = self._attend(query, key, value, text).flatten(2)
        if encoder_hidden_states is None:
            return out if getattr(attn, "to_out", None) is None else attn.to_out[1](attn.to_out[0](out))
        text_out, image_out = out[:, :text], out[:, text:]
        if getattr(attn, "to_add_out", None) is not None and not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return attn.to_out[1](attn.to_out[0](image_out)), text_out

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text: int) -> torch.Tensor:
        """(B, L, H, d) queries over the first `text` keys/values and the image ones after them,
        with the other patches' image K/V, as (B, L, H, d)."""
        if not self.ctx.exchanges_enabled:
            return _sdpa(query, key, value)
        rows = self.tokens.rows
        fresh = rows.pad(torch.cat([key[:, text:].transpose(0, 1), value[:, text:].transpose(0, 1)], dim=-1), 0)
        return self.exchange.run(fresh, lambda kv: _sdpa(query, *self._all_keys(kv, fresh, key[:, :text], value[:, :text])))

    def _all_keys(self, kv: torch.Tensor, fresh: torch.Tensor, text_key: torch.Tensor,
                  text_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T + L, H, d) keys and values: text first, then every patch's image tokens from the
        (N, largest, B, H, 2d) gather buffer, this rank's slot made fresh (in a displaced step the
        buffer holds last step's values; this step's own gather starts after attention read it)."""
        kv[self.ctx.rank] = fresh
        image = self.tokens.rows.join(kv).transpose(0, 1)
        d = image.shape[-1] // 2
        key, value = image[..., :d], image[..., d:]
        if text_key.shape[1]:
            key, value = torch.cat([text_key, key], dim=1), torch.cat([text_value, value], dim=1)
        return key, value


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Multi-head attention of (B, Lq, H, d) queries over (B, Lk, H, d) keys/values (views welcome)."""
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2).to(query.dtype)
