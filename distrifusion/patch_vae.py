"""Turn a diffusers `AutoencoderKL`'s decode into a patch-parallel one, in place.

Every rank decodes the rows of the latent it is dealt (`exact_rows.split_rows`: heights need
not divide by N) through the decoder with exact row-patch layers (`exact_rows`): halo rows for
every 3x3 convolution (the one after each nearest 2x upsampling too; the upsampling itself is
row-local), global GroupNorm statistics, the mid-block's attention over every token. The image
rows are then all-gathered, so every rank returns the whole image the single-device decode
gives, up to rounding. 1x1 convolutions (`post_quant_conv`, shortcuts) are row-local as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders.vae import DecoderOutput
from torch import nn

from backends import Communicator

from .exact_rows import RowsConv2d, RowsGroupNorm, RowSplit, RowsSelfAttention, split_rows


class PatchVAEDecode:
    """The replacement `vae.decode(z, return_dict=True, generator=None)`: this rank's rows, then the
    gather (`generator` is accepted as `AutoencoderKL.decode` accepts it; a decode draws nothing)."""

    def __init__(self, vae: AutoencoderKL, split: RowSplit):
        if vae.use_tiling:
            raise ValueError("the patch-parallel VAE decode replaces tiling: call vae.disable_tiling()")
        self.split, self.original = split, vae.decode

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, return_dict: bool = True, generator=None) -> DecoderOutput | tuple:
        split = self.split
        rows = split_rows(z.shape[-2], split.world_size)
        start = sum(rows[:split.rank])
        with split.patched(rows):
            local = self.original(z[..., start:start + rows[split.rank], :], return_dict=False)[0]
        image = self._gather(local, rows)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def _gather(self, local: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The whole image from every rank's rows (padded to the tallest patch's for the gather)."""
        split = self.split
        scale = local.shape[-2] // rows[split.rank]
        padded = F.pad(local, (0, 0, 0, max(rows) * scale - local.shape[-2])).contiguous()
        parts = split.gather(padded, "output:vae")
        return torch.cat([parts[r, ..., :n * scale, :] for r, n in enumerate(rows)], dim=-2)


def patch_vae(vae: AutoencoderKL, comm: Communicator, chunk_bytes: int = 0) -> PatchVAEDecode:
    """Install row-patch forwards on `vae.decoder`'s layers and a patch-parallel `vae.decode`
    across `comm`'s ranks (collective: every rank decodes the same latent); returns the latter.
    `chunk_bytes` bounds a convolution chunk's input (0: whole patches)."""
    split = RowSplit(comm, chunk_bytes)
    for name, module in vae.decoder.named_modules():
        tag = f"vae:{name}"
        if isinstance(module, nn.Conv2d) and isinstance(module.padding, tuple) and module.padding[0] > 0:
            module.forward = RowsConv2d(module, split, tag)
        elif isinstance(module, nn.GroupNorm):
            module.forward = RowsGroupNorm(module, split, tag)
        elif isinstance(module, Attention):
            module.set_processor(RowsSelfAttention(split, tag))
    decode = PatchVAEDecode(vae, split)
    vae.decode = decode
    return decode
