"""Turn a diffusers `UNet2DConditionModel` into a patch-parallel one, in place.

Every 3x3 convolution, GroupNorm and self-attention gets a patch-aware forward (the module
objects and their weights stay as they are); the UNet's forward slices the input to this
rank's rows (and, with split CFG, its guidance branch) and gathers the full noise prediction.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from .compressed_exchange import activation_exchange
from .cuda_graph import StepGraphs
from .denoiser_forward import DenoiserForward, take_branch
from .patch_attention import PatchSelfAttention
from .patch_context import PatchContext
from .patch_conv import PatchConv2d
from .stale_groupnorm import PatchGroupNorm

UNSUPPORTED_INPUTS = ("down_block_additional_residuals", "mid_block_additional_residual",
                      "down_intrablock_additional_residuals")


def downsampling_levels(unet: UNet2DConditionModel) -> int:
    return sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))


def check_height(latent_height: int, patches: int, levels: int, vae_factor: int | None = None) -> None:
    """Raise a clear error unless `patches` equal row patches survive `levels` halvings.

    `vae_factor` (the pipeline's `vae_scale_factor`) turns the latent heights of the message into
    image heights; a bare UNet does not know it, and the message then speaks of latent rows only.
    """
    unit = patches * 2**levels
    if latent_height % unit:
        near = range(max(1, latent_height // unit - 1), latent_height // unit + 3)
        scale, kind = (vae_factor, "image") if vae_factor else (1, "latent")
        image = f" (image {latent_height * vae_factor})" if vae_factor else ""
        raise ValueError(
            f"a latent of height {latent_height}{image} cannot be cut into {patches} row patches through "
            f"{levels} downsampling levels: the latent height must be a multiple of {patches}*2^{levels}={unit}, "
            f"i.e. {kind} heights such as {[unit * k * scale for k in near]} (or use fewer ranks)"
        )


class UNetForward(DenoiserForward):
    """The mode "none" forward of a UNet (see `DenoiserForward`)."""

    def __init__(self, unet: UNet2DConditionModel, cuda_graph: bool = True):
        super().__init__(unet, "sample", UNet2DConditionOutput, cuda_graph)


class PatchUNetForward(UNetForward):
    """The replacement `unet.forward` of the patch modes: runs this rank's patch."""

    def __init__(self, unet: UNet2DConditionModel, ctx: PatchContext):
        super().__init__(unet, ctx.config.cuda_graph)
        self.ctx = ctx
        self.levels = downsampling_levels(unet)
        self.split_guidance = True
        self.vae_factor: int | None = None  # a pipeline's, for error messages in image pixels
        self.output: torch.Tensor | None = None
        self.graphs = StepGraphs(self._graph_step, before_capture=ctx.finish)

    def run(self, inputs: dict) -> torch.Tensor:
        for name in UNSUPPORTED_INPUTS:
            if inputs.get(name) is not None:
                raise ValueError(f"patch parallelism does not support {name} (ControlNet/adapters) yet")
        sample = inputs["sample"]
        ctx = self.ctx
        ctx.use_branches(2 if self.split_guidance and ctx.can_split(sample.shape[0]) else 1)
        check_height(sample.shape[-2], ctx.world_size, self.levels, self.vae_factor)
        if ctx.branches == 2:
            inputs = {k: take_branch(v, ctx.branch, sample.shape[0]) for k, v in inputs.items()}
        rows = sample.shape[-2] // ctx.world_size
        inputs["sample"] = inputs["sample"][..., ctx.rank * rows:(ctx.rank + 1) * rows, :]
        if self.cuda_graph and sample.is_cuda and not ctx.sync_step:
            full = self.graphs(inputs, key=(ctx.branches,))
        else:
            full = self._step(**inputs)
        ctx.step += 1
        return full

    def _step(self, **inputs) -> torch.Tensor:
        return self._gather(super()._step(**inputs))

    def _graph_step(self, **inputs) -> torch.Tensor:
        full = self._step(**inputs)
        self.ctx.finish()  # a replay runs no Python: its gathers must complete within it
        return full

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        shape = (ctx.world_comm.world_size, *local.shape)
        if self.output is None or self.output.shape != shape or self.output.dtype != local.dtype:
            self.output = ctx.allocate(shape, local.dtype, local.device)
        parts = ctx.world_comm.all_gather(local.contiguous(), out=self.output, tag="output:unet")
        b, c, h, w = local.shape
        parts = parts.view(ctx.branches, ctx.world_size, b, c, h, w).permute(0, 2, 3, 1, 4, 5)
        return parts.reshape(ctx.branches * b, c, ctx.world_size * h, w)


def patch_unet(unet: UNet2DConditionModel, ctx: PatchContext) -> PatchUNetForward:
    """Install patch-aware forwards on `unet`'s layers and on `unet` itself; returns the latter."""
    for name, module in unet.named_modules():
        if isinstance(module, nn.Conv2d) and isinstance(module.padding, tuple) and module.padding[0] > 0:
            module.forward = PatchConv2d(module, ctx, activation_exchange(ctx, f"conv:{name}"))
        elif isinstance(module, nn.GroupNorm):
            module.forward = PatchGroupNorm(module, ctx, ctx.exchange(f"norm:{name}"))
        elif isinstance(module, Attention) and not module.is_cross_attention:
            module.set_processor(PatchSelfAttention(ctx, activation_exchange(ctx, f"attn:{name}")))
    forward = PatchUNetForward(unet, ctx)
    unet.forward = forward
    return forward


def whole_unet(unet: UNet2DConditionModel, cuda_graph: bool = True) -> UNetForward:
    """Install the mode "none" forward (the whole UNet, graphed on CUDA) on `unet`; returns it."""
    forward = UNetForward(unet, cuda_graph)
    unet.forward = forward
    return forward
