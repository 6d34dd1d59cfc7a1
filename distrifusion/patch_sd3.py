"""Stable Diffusion 3/3.5 (`SD3Transformer2DModel`) patch-parallel: where its tokens are cut and
gathered, and which attentions exchange.

The patch embedding (with its position embeddings cropped for the whole latent) runs on the
whole latent and each rank keeps its token rows (`RowsOfPatchEmbed`). Every block's joint
attention (`JointTransformerBlock.attn`) runs this rank's image queries and all text queries
over all patches' image K/V and the text K/V; SD3.5's second, image-only attention (`attn2`)
attends over all patches too. Text tokens are replicated on every rank, so the text stream
(and the last block's `context_pre_only` text path) is computed whole everywhere. `proj_out`'s
tokens are gathered, so the model's own unpatchify sees the whole grid.
"""

from __future__ import annotations

from diffusers import SD3Transformer2DModel
from diffusers.models.attention import JointTransformerBlock

from .dit_attention import PatchTokens
from .patch_context import PatchContext
from .patch_dit import PatchDiTForward, RowsOfPatchEmbed, patch_transformer


def patch_sd3(model: SD3Transformer2DModel, ctx: PatchContext) -> PatchDiTForward:
    """Make `model` patch-parallel in place; returns its new forward."""
    tokens = PatchTokens()
    model.pos_embed.forward = RowsOfPatchEmbed(model.pos_embed, ctx, tokens)
    attentions = {}
    for name, block in model.named_modules():
        if isinstance(block, JointTransformerBlock):
            attentions[f"attn:{name}.attn"] = block.attn
            if block.attn2 is not None:
                attentions[f"attn:{name}.attn2"] = block.attn2
    return patch_transformer(model, ctx, tokens, attentions)
