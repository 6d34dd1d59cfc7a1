"""`parallelize`: one line turns a diffusers pipeline or UNet into a patch-parallel one."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from backends import Communicator

from .parallel_config import ParallelConfig
from .patch_context import PatchContext
from .patch_unet import patch_unet, whole_unet
from .patch_vae import patch_vae

SUPPORTED_PIPELINES = (StableDiffusionXLPipeline, StableDiffusionPipeline)
log = logging.getLogger("distrifusion")


class DistriPipeline:
    """A pipeline whose every call runs patch-parallel; call it as the wrapped pipeline.

    Every rank denoises its patch (mode "none": the whole latent, as one device would; on CUDA
    every mode replays its steady steps as CUDA graphs). With `config.vae` "patch" (and a patch
    mode) every rank decodes its rows of the latent and gathers the image; otherwise rank 0
    alone decodes and broadcasts it. Either way every rank returns the same image. Other
    attributes reach the pipeline.
    """

    def __init__(self, pipe: Any, comm: Communicator, config: ParallelConfig):
        self.pipe, self.comm, self.config = pipe, comm, config
        self.context = PatchContext(comm, config) if config.mode != "none" else None
        if self.context is not None:
            self.unet_forward = patch_unet(pipe.unet, self.context)
            self.unet_forward.vae_factor = pipe.vae_scale_factor
        else:
            self.unet_forward = whole_unet(pipe.unet, config.cuda_graph)
        self.vae_decode = None
        if self.context is not None and config.vae == "patch":
            self.vae_decode = patch_vae(pipe.vae, comm, config.vae_chunk_mib * 2**20)
        self._defaults = inspect.signature(type(pipe).__call__).parameters

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        output_type = kwargs.pop("output_type", "pil")
        return_dict = kwargs.pop("return_dict", True)
        if self.context is not None:
            self.context.reset()
            guidance = kwargs.get("guidance_scale", self._defaults["guidance_scale"].default)
            self.unet_forward.split_guidance = guidance > 1
        decode = output_type != "latent" and (self.vae_decode is not None or self.comm.rank == 0)
        result = self.pipe(*args, output_type="pt" if decode else "latent", return_dict=True, **kwargs)
        if self.context is not None:
            self.context.finish()
        images = result.images
        if output_type != "latent":
            images = self._share_image(images if decode else None, result.images)
            if output_type == "np":
                images = self.pipe.image_processor.pt_to_numpy(images)
            elif output_type == "pil":
                images = self.pipe.image_processor.numpy_to_pil(self.pipe.image_processor.pt_to_numpy(images))
        result = dataclasses.replace(result, images=images)
        return result if return_dict else dataclasses.astuple(result)

    def _share_image(self, image: torch.Tensor | None, latents: torch.Tensor) -> torch.Tensor:
        """Rank 0's decoded image (or every rank's, gathered by the patched decode), on every
        rank, in float32 (the VAE may decode half-precision latents in float32; values in [0, 1]
        lose nothing in float32, and every rank agrees)."""
        if self.comm.world_size == 1 or self.vae_decode is not None:
            return image.float()
        if image is None:
            f = self.pipe.vae_scale_factor
            b, _, h, w = latents.shape
            image = torch.empty((b, 3, h * f, w * f), dtype=torch.float32, device=self.comm.device)
        image = image.to(self.comm.device, torch.float32).contiguous()
        return self.comm.broadcast(image, src=0, tag="vae:image")


def parallelize(model: Any, comm: Communicator, config: ParallelConfig | None = None) -> Any:
    """Run `model` (a StableDiffusion(XL)Pipeline or UNet2DConditionModel) across `comm`'s ranks.

    Collective: every rank calls it. Returns an object with the same call signature. A bare
    UNet is patched in place; each call is the next denoising step, and
    `unet.forward.ctx.reset()` starts a new generation.
    """
    config = config or ParallelConfig()
    if config.compress != "none" and config.mode != "displaced" and comm.rank == 0:
        log.warning("parallel.compress=%s has no effect in mode %s: only displaced steps send stale activations",
                    config.compress, config.mode)
    if isinstance(model, SUPPORTED_PIPELINES):
        return DistriPipeline(model, comm, config)
    if isinstance(model, UNet2DConditionModel):
        if config.mode != "none":
            patch_unet(model, PatchContext(comm, config))
        else:
            whole_unet(model, config.cuda_graph)
        return model
    allowed = ", ".join(c.__name__ for c in (*SUPPORTED_PIPELINES, UNet2DConditionModel))
    raise TypeError(f"parallelize supports {allowed}; got {type(model).__name__}")
