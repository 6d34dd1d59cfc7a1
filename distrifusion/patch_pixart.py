"""PixArt-alpha/Sigma (`PixArtTransformer2DModel`) patch-parallel: where its tokens are cut and
gathered, and which attentions exchange.

The patch embedding runs on the whole latent and each rank keeps its token rows
(`RowsOfPatchEmbed`); every block's image self-attention (`attn1`) attends over all patches'
tokens; cross-attention to the text (`attn2`), the AdaLayerNorms and the MLPs are per token and
keep their forwards; `proj_out`'s tokens are gathered, so the model's own unpatchify sees the
whole grid.
"""

from __future__ import annotations

from diffusers import PixArtTransformer2DModel
from diffusers.models.attention import BasicTransformerBlock

from .dit_attention import PatchTokens
from .patch_context import PatchContext
from .patch_dit import PatchDiTForward, RowsOfPatchEmbed, patch_transformer


def patch_pixart(model: PixArtTransformer2DModel, ctx: PatchContext) -> PatchDiTForward:
    """Make `model` patch-parallel in place; returns its new forward."""
    tokens = PatchTokens()
    model.pos_embed.forward = RowsOfPatchEmbed(model.pos_embed, ctx, tokens)
    attentions = {f"attn:{name}.attn1": block.attn1 for name, block in model.named_modules()
                  if isinstance(block, BasicTransformerBlock)}
    return patch_transformer(model, ctx, tokens, attentions)
