"""Flux (`FluxTransformer2DModel`) patch-parallel: where its tokens are cut and gathered, and
which attentions exchange.

Flux receives the latent already packed as tokens (2x2 latent pixels each) with their position
ids. Each rank takes a contiguous run of the image tokens and the same run of `img_ids`, so
`pos_embed(cat(txt_ids, img_ids))` gives every token the rotary embedding of its global
position. The split is in whole tokens, not token-grid rows: the grid's width is only in the
values of `img_ids`, which the forward does not read (no device sync; none exists on the meta
device), and attention needs contiguous runs, not rows (a run is whole rows whenever N divides
the grid's height). Double-stream blocks' attention runs this rank's image queries and all text
queries over all patches' image K/V (after RMSNorm and rotary) plus the text K/V;
single-stream blocks do the same on their one [text, image] sequence. `proj_out`'s tokens are
gathered: the model returns the whole packed sequence.
"""

from __future__ import annotations

from diffusers import FluxTransformer2DModel

from .dit_attention import PatchTokens
from .patch_context import PatchContext
from .patch_dit import PatchDiTForward, patch_transformer
from .token_rows import TokenRows

SHARED_INPUTS = ("img_ids", "txt_ids")  # per token, not per sample: every guidance branch uses them whole


def patch_flux(model: FluxTransformer2DModel, ctx: PatchContext) -> PatchDiTForward:
    """Make `model` patch-parallel in place; returns its new forward."""
    tokens = PatchTokens()

    def take_tokens(inputs: dict) -> dict:
        hidden = inputs["hidden_states"]
        rows = TokenRows(hidden.shape[1], 1, ctx.world_size, ctx.rank)
        tokens.rows, tokens.text = rows, inputs["encoder_hidden_states"].shape[1]
        return {**inputs, "hidden_states": rows.take(hidden, 1), "img_ids": rows.take(inputs["img_ids"], -2)}

    double = {f"attn:transformer_blocks.{i}.attn": b.attn for i, b in enumerate(model.transformer_blocks)}
    single = {f"attn:single_transformer_blocks.{i}.attn": b.attn for i, b in enumerate(model.single_transformer_blocks)}
    return patch_transformer(model, ctx, tokens, double, single, take_tokens, SHARED_INPUTS)
