"""The keyword arguments of one diffusion-transformer call, as its diffusers pipeline makes them.

- Flux (`FluxTransformer2DModel`): the latent packed as tokens of 2x2 latent pixels,
  (B, (h/2)*(w/2), in_channels) for an h x w latent; the T5 text tokens (the spec's
  `max_sequence_length`, 512 for FLUX.1-dev); CLIP's pooled embedding; the guidance scale
  (guidance-distilled models embed it, there is no CFG batch); and the position ids of text
  (zeros) and image tokens (0, row, column), from which the transformer computes its rotary
  embeddings.
- SD3 (`SD3Transformer2DModel`): the latent (B, C, h, w); CLIP's 77 tokens followed by the
  T5 tokens (77 + 256 = 333 for SD3-medium) and the pooled CLIP embeddings.
- PixArt (`PixArtTransformer2DModel`): the latent (B, C, h, w); the T5 tokens (300 for
  PixArt-Sigma) with their attention mask and, where the model uses them (PixArt-alpha at
  1024), the resolution and aspect-ratio conditions.

Prompt tokens are the model spec's, as the app passes them to the pipeline.

Tensors are random on a real device and empty on meta (shapes only).
"""

from __future__ import annotations

from typing import Any

import torch

from distrifusion.model_configs import ModelSpec, get_spec

FAMILIES = ("FluxTransformer2DModel", "SD3Transformer2DModel", "PixArtTransformer2DModel")
GUIDANCE = 3.5  # FluxPipeline's default guidance_scale; any value runs the same ops


def flux_image_ids(rows: int, cols: int, device: str | torch.device) -> torch.Tensor:
    """(rows*cols, 3) position ids of Flux's image tokens: (0, row, column), row-major, as
    FluxPipeline's `_prepare_latent_image_ids`."""
    grid = torch.zeros(rows, cols, 3, device=device)
    grid[..., 1] = torch.arange(rows, device=device)[:, None]
    grid[..., 2] = torch.arange(cols, device=device)[None, :]
    return grid.reshape(rows * cols, 3)


def text_tokens(spec: ModelSpec) -> int:
    """Prompt tokens the transformer of `spec` attends to: T5's, after CLIP's for SD3."""
    clip = spec.max_length if spec.transformer_class == "SD3Transformer2DModel" else 0
    return clip + spec.max_sequence_length


def transformer_inputs(model: str, transformer: torch.nn.Module, latent: int, batch: int,
                       dtype: torch.dtype, device: str | torch.device, seed: int = 0) -> dict[str, Any]:
    """Keyword arguments of one call of `transformer` (built from `model`'s spec) for `batch`
    square images whose latent is `latent` x `latent` (module doc)."""
    spec, family, config = get_spec(model), type(transformer).__name__, transformer.config
    if family not in FAMILIES:
        raise TypeError(f"no inputs for {family}; known: {FAMILIES}")
    generator = torch.Generator().manual_seed(seed)
    meta = torch.device(device).type == "meta"

    def tensor(*shape: int) -> torch.Tensor:
        if meta:
            return torch.empty(shape, dtype=dtype, device="meta")
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    tokens = text_tokens(spec)
    # the first step's timestep as the pipelines pass it: Flux's in [0, 1] (the model scales it by 1000)
    timestep = torch.full((batch,), 1.0 if family == "FluxTransformer2DModel" else 999.0, device=device)
    if family == "FluxTransformer2DModel":
        side = latent // spec.latent_pixels_per_token
        inputs = {"hidden_states": tensor(batch, side * side, config.in_channels),
                  "encoder_hidden_states": tensor(batch, tokens, config.joint_attention_dim),
                  "pooled_projections": tensor(batch, config.pooled_projection_dim), "timestep": timestep,
                  "img_ids": flux_image_ids(side, side, device), "txt_ids": torch.zeros(tokens, 3, device=device)}
        if config.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), GUIDANCE, device=device)
        return inputs
    inputs = {"hidden_states": tensor(batch, config.in_channels, latent, latent), "timestep": timestep}
    if family == "SD3Transformer2DModel":
        return {**inputs, "encoder_hidden_states": tensor(batch, tokens, config.joint_attention_dim),
                "pooled_projections": tensor(batch, config.pooled_projection_dim)}
    pixels = float(latent * spec.vae_scale_factor)
    conditions = ({"resolution": torch.full((batch, 2), pixels, device=device, dtype=dtype),
                   "aspect_ratio": torch.ones((batch, 1), device=device, dtype=dtype)}
                  if transformer.use_additional_conditions else {"resolution": None, "aspect_ratio": None})
    mask = torch.ones((batch, tokens), device=device, dtype=torch.long)  # the tokenizer's
    return {**inputs, "encoder_hidden_states": tensor(batch, tokens, config.caption_channels),
            "encoder_attention_mask": mask, "added_cond_kwargs": conditions}
