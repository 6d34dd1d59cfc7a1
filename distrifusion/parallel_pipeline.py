"""`parallelize`: one line turns a diffusers pipeline, UNet or diffusion transformer into a
patch-parallel one."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any, Callable

import torch
from diffusers import (
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from backends import Communicator

from .parallel_config import ParallelConfig
from .patch_context import PatchContext
from .patch_dit import whole_transformer
from .patch_flux import patch_flux
from .patch_pixart import patch_pixart
from .patch_sd3 import patch_sd3
from .patch_unet import patch_unet, whole_unet
from .patch_vae import patch_vae

SUPPORTED_PIPELINES = (StableDiffusionXLPipeline, StableDiffusionPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline,
                       StableDiffusion3Pipeline, FluxPipeline)
# each denoiser class: its patch-mode installer and its mode "none" installer (both return the new forward)
DENOISERS: dict[type, tuple[Callable[[Any, PatchContext], Any], Callable[[Any, bool], Any]]] = {
    UNet2DConditionModel: (patch_unet, whole_unet),
    PixArtTransformer2DModel: (patch_pixart, whole_transformer),
    SD3Transformer2DModel: (patch_sd3, whole_transformer),
    FluxTransformer2DModel: (patch_flux, whole_transformer),
}
log = logging.getLogger("distrifusion")


class DistriPipeline:
    """A pipeline whose every call runs patch-parallel; call it as the wrapped pipeline.

    Every rank denoises its patch of the latent or of the image tokens (mode "none": the whole
    latent, as one device would; on CUDA every mode replays its steady steps as CUDA graphs).
    With `config.vae` "patch" (and a patch mode) every rank decodes its rows of the latent and
    gathers the image; otherwise rank 0 alone decodes and broadcasts it. Either way every rank
    returns the same image. Other attributes reach the pipeline. `unet_forward` (UNet
    pipelines) or `transformer_forward` (PixArt, SD3, Flux) is the denoiser's new forward.
    """

    def __init__(self, pipe: Any, comm: Communicator, config: ParallelConfig):
        self.pipe, self.comm, self.config = pipe, comm, config
        self.context = PatchContext(comm, config) if config.mode != "none" else None
        name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
        self.denoiser_forward = _install(getattr(pipe, name), self.context, config)
        setattr(self, f"{name}_forward", self.denoiser_forward)
        if self.context is not None and name == "unet":
            self.denoiser_forward.vae_factor = pipe.vae_scale_factor
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
            self.denoiser_forward.split_guidance = self._batches_guidance(kwargs)
        decode = output_type != "latent" and (self.vae_decode is not None or self.comm.rank == 0)
        result = self.pipe(*args, output_type="pt" if decode else "latent", return_dict=True, **kwargs)
        if self.context is not None:
            self.context.finish()
        images = result.images
        if output_type != "latent":
            images = self._share_image(images if decode else None)
            if output_type == "np":
                images = self.pipe.image_processor.pt_to_numpy(images)
            elif output_type == "pil":
                images = self.pipe.image_processor.numpy_to_pil(self.pipe.image_processor.pt_to_numpy(images))
        result = dataclasses.replace(result, images=images)
        return result if return_dict else dataclasses.astuple(result)

    def _batches_guidance(self, kwargs: dict) -> bool:
        """Whether this call's denoiser batch holds both guidance branches ([uncond, cond]).
        FluxPipeline embeds its guidance scale instead; its "true CFG" calls the transformer
        twice a step, which would cross the two calls' stale activations: refused."""
        if isinstance(self.pipe, FluxPipeline):
            negative = kwargs.get("negative_prompt") is not None or kwargs.get("negative_prompt_embeds") is not None
            if negative and kwargs.get("true_cfg_scale", 1.0) > 1:
                raise ValueError("FluxPipeline's true_cfg_scale > 1 (two transformer calls a step) is not "
                                 "supported in the patch modes")
            return False
        return kwargs.get("guidance_scale", self._defaults["guidance_scale"].default) > 1

    def _share_image(self, image: torch.Tensor | None) -> torch.Tensor:
        """Rank 0's decoded image (or every rank's, gathered by the patched decode), on every
        rank, in float32 (the VAE may decode half-precision latents in float32; values in [0, 1]
        lose nothing in float32, and every rank agrees). Rank 0 sends the image's shape first:
        the others cannot tell it from the latents (PixArt resizes to the requested size, Flux
        returns packed latents)."""
        if self.comm.world_size == 1 or self.vae_decode is not None:
            return image.float()
        device = self.comm.device
        shape = torch.tensor(image.shape if image is not None else (0,) * 4, dtype=torch.int64, device=device)
        shape = self.comm.broadcast(shape, src=0, tag="vae:image_shape")
        if image is None:
            image = torch.empty(tuple(shape.tolist()), dtype=torch.float32, device=device)
        image = image.to(device, torch.float32).contiguous()
        return self.comm.broadcast(image, src=0, tag="vae:image")


def _install(model: Any, context: PatchContext | None, config: ParallelConfig) -> Any:
    """Patch `model` (a denoiser of `DENOISERS`) in place for `context`'s patches, or for mode
    "none" without one; returns its new forward."""
    patch, whole = next(fns for cls, fns in DENOISERS.items() if isinstance(model, cls))
    return patch(model, context) if context is not None else whole(model, config.cuda_graph)


def parallelize(model: Any, comm: Communicator, config: ParallelConfig | None = None) -> Any:
    """Run `model` across `comm`'s ranks: a pipeline of `SUPPORTED_PIPELINES` or a bare denoiser
    (UNet2DConditionModel, PixArtTransformer2DModel, SD3Transformer2DModel, FluxTransformer2DModel).

    Collective: every rank calls it. Returns an object with the same call signature. A bare
    denoiser is patched in place; each call is the next denoising step, and
    `model.forward.ctx.reset()` starts a new generation.
    """
    config = config or ParallelConfig()
    if config.compress != "none" and config.mode != "displaced" and comm.rank == 0:
        log.warning("parallel.compress=%s has no effect in mode %s: only displaced steps send stale activations",
                    config.compress, config.mode)
    if isinstance(model, SUPPORTED_PIPELINES):
        return DistriPipeline(model, comm, config)
    if isinstance(model, tuple(DENOISERS)):
        _install(model, PatchContext(comm, config) if config.mode != "none" else None, config)
        return model
    allowed = ", ".join(c.__name__ for c in (*SUPPORTED_PIPELINES, *DENOISERS))
    raise TypeError(f"parallelize supports {allowed}; got {type(model).__name__}")
