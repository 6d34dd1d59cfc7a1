"""Architecture configs of the supported pipelines, as data.

The UNet and VAE dicts are `diffusers` configs (`UNet2DConditionModel`, `AutoencoderKL`), the text
encoder dicts are `transformers.CLIPTextConfig` keyword arguments. The real models' values follow
the published `config.json` files; `tiny` is an SDXL-type pipeline small enough for CPU tests.
Treat everything here as read-only: builders copy what they use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Config = dict[str, Any]

MAX_LENGTH = 77

SDXL_DOWN = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
SDXL_UP = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

UNET_COMMON: Config = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}

SDXL_UNET: Config = {
    **UNET_COMMON,
    "sample_size": 128,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": SDXL_DOWN,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": SDXL_UP,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "norm_num_groups": 32,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

SD15_UNET: Config = {
    **UNET_COMMON,
    "sample_size": 64,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": SD_DOWN,
    "up_block_types": SD_UP,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}

SD21_UNET: Config = {
    **SD15_UNET,
    "sample_size": 96,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": True,
}

TINY_UNET: Config = {
    **UNET_COMMON,
    "layers_per_block": 1,
    "sample_size": 32,
    "block_out_channels": [32, 64, 64],
    "down_block_types": SDXL_DOWN,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": SDXL_UP,
    "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": [1, 1, 1],
    "cross_attention_dim": 64,
    "norm_num_groups": 8,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,
}

SD_VAE: Config = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SDXL_VAE: Config = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SD21_VAE: Config = {**SD_VAE, "sample_size": 768}
TINY_VAE: Config = {
    **SD_VAE,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.13025,
}

CLIP_COMMON: Config = {
    "vocab_size": 49408,
    "max_position_embeddings": MAX_LENGTH,
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}

CLIP_L: Config = {
    **CLIP_COMMON,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}

OPENCLIP_BIGG: Config = {
    **CLIP_COMMON,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}

OPENCLIP_H: Config = {
    **CLIP_COMMON,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "hidden_act": "gelu",
}

# 514 = the ids of the offline byte-level tokenizer (256 bytes, 256 with "</w>", 2 specials).
TINY_CLIP_1: Config = {
    **CLIP_COMMON,
    "vocab_size": 514,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
}
TINY_CLIP_2: Config = {**TINY_CLIP_1, "hidden_act": "gelu"}

SCHEDULER_COMMON: Config = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder: its transformers class name, CLIPTextConfig kwargs and tokenizer pad token."""

    class_name: str
    config: Config
    pad_token: str = "<|endoftext|>"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build one pipeline from scratch."""

    pipeline_class: str
    resolution: int
    vae_scale_factor: int
    prediction_type: str
    unet: Config
    vae: Config
    text_encoders: tuple[TextEncoderSpec, ...]
    max_length: int = MAX_LENGTH

    @property
    def scheduler(self) -> Config:
        """Scheduler config shared by every scheduler kind (betas, steps, prediction type)."""
        return {**SCHEDULER_COMMON, "prediction_type": self.prediction_type}


MODELS: dict[str, ModelSpec] = {
    "sdxl": ModelSpec(
        pipeline_class="StableDiffusionXLPipeline",
        resolution=1024,
        vae_scale_factor=8,
        prediction_type="epsilon",
        unet=SDXL_UNET,
        vae=SDXL_VAE,
        text_encoders=(
            TextEncoderSpec("CLIPTextModel", CLIP_L),
            TextEncoderSpec("CLIPTextModelWithProjection", OPENCLIP_BIGG, pad_token="!"),
        ),
    ),
    "sd15": ModelSpec(
        pipeline_class="StableDiffusionPipeline",
        resolution=512,
        vae_scale_factor=8,
        prediction_type="epsilon",
        unet=SD15_UNET,
        vae=SD_VAE,
        text_encoders=(TextEncoderSpec("CLIPTextModel", CLIP_L),),
    ),
    "sd21": ModelSpec(
        pipeline_class="StableDiffusionPipeline",
        resolution=768,
        vae_scale_factor=8,
        prediction_type="v_prediction",
        unet=SD21_UNET,
        vae=SD21_VAE,
        text_encoders=(TextEncoderSpec("CLIPTextModel", OPENCLIP_H, pad_token="!"),),
    ),
    "tiny": ModelSpec(
        pipeline_class="StableDiffusionXLPipeline",
        resolution=64,
        vae_scale_factor=2,
        prediction_type="epsilon",
        unet=TINY_UNET,
        vae=TINY_VAE,
        text_encoders=(
            TextEncoderSpec("CLIPTextModel", TINY_CLIP_1),
            TextEncoderSpec("CLIPTextModelWithProjection", TINY_CLIP_2, pad_token="!"),
        ),
    ),
}

MODEL_NAMES: tuple[str, ...] = tuple(MODELS)


def get_spec(name: str) -> ModelSpec:
    """The spec of model `name`; ValueError listing the allowed names if it is unknown."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    return MODELS[name]
