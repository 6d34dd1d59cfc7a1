"""Architecture configs of the supported pipelines, as data.

The UNet, transformer and VAE dicts are `diffusers` configs (`UNet2DConditionModel`, the
`transformer_class` of a DiT, `AutoencoderKL`), the text encoder dicts are keyword arguments of
`transformers.CLIPTextConfig` or `T5Config`. The real models' values follow the published
`config.json` files; `tiny` (SDXL-type), `pixart`, `sd3` and `flux` are small random-weight
variants for CPU tests. Treat everything here as read-only: builders copy what they use.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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

# The DiTs' VAEs: PixArt-Sigma uses SDXL's; SD3 and Flux have 16 latent channels, a shift and no
# quant convs.
FLOW_VAE: Config = {"latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
SD3_LATENT_SCALE: Config = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_LATENT_SCALE: Config = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
SD3_VAE: Config = {**SD_VAE, **FLOW_VAE, **SD3_LATENT_SCALE, "sample_size": 1024}
FLUX_VAE: Config = {**SD_VAE, **FLOW_VAE, **FLUX_LATENT_SCALE, "sample_size": 1024}
TINY_SD3_VAE: Config = {**TINY_VAE, **FLOW_VAE, **SD3_LATENT_SCALE}
TINY_FLUX_VAE: Config = {**TINY_VAE, **FLOW_VAE, **FLUX_LATENT_SCALE}

PIXART_SIGMA_TRANSFORMER: Config = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 8,  # learned sigma: the pipeline keeps the first 4
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "cross_attention_dim": 1152,
    "caption_channels": 4096,
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "interpolation_scale": 2,
    "use_additional_conditions": False,
    "upcast_attention": False,
    "dropout": 0.0,
    "attention_type": "default",
}
TINY_PIXART_TRANSFORMER: Config = {
    **PIXART_SIGMA_TRANSFORMER,
    "sample_size": 32,
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "cross_attention_dim": 32,
    "caption_channels": 64,  # the tiny T5's d_model
    "interpolation_scale": 1,
}

SD3_MEDIUM_TRANSFORMER: Config = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "num_attention_heads": 24,
    "attention_head_dim": 64,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,  # CLIP-L's 768 + OpenCLIP bigG's 1280
    "pos_embed_max_size": 192,
}
TINY_SD3_TRANSFORMER: Config = {
    **SD3_MEDIUM_TRANSFORMER,
    "sample_size": 32,
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "joint_attention_dim": 64,  # the tiny T5's d_model, at least the two CLIPs' widths together
    "caption_projection_dim": 32,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 64,
}

FLUX_DEV_TRANSFORMER: Config = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels, packed 2x2 per token
    "num_layers": 19,
    "num_single_layers": 38,
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
TINY_FLUX_TRANSFORMER: Config = {
    **FLUX_DEV_TRANSFORMER,
    "num_layers": 1,
    "num_single_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 32,
    "axes_dims_rope": [4, 6, 6],  # sums to attention_head_dim
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

# T5 v1.1 XXL's encoder (the DiTs' long-prompt text encoder).
T5_XXL: Config = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.1,
    "tie_word_embeddings": False,
    "is_encoder_decoder": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
}
# 98 = the ids of the offline character tokenizer (3 specials, the word boundary, 94 printable ASCII).
TINY_T5: Config = {**T5_XXL, "vocab_size": 98, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4}

SCHEDULER_COMMON: Config = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

PIXART_SCHEDULER: Config = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "steps_offset": 0,
    "timestep_spacing": "linspace",
}
# Flow matching (`FlowMatchEulerDiscreteScheduler`): SD3 shifts every schedule by 3, Flux by an
# amount that grows with the image's token count.
SD3_SCHEDULER: Config = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER: Config = {
    **SD3_SCHEDULER,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

FLOW = "flow"  # the prediction type of flow-matching models (the velocity)


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder: its transformers class name, config kwargs (`CLIPTextConfig`, or
    `T5Config` for `T5EncoderModel`) and tokenizer pad token."""

    class_name: str
    config: Config
    pad_token: str = "<|endoftext|>"


T5_XXL_ENCODER = TextEncoderSpec("T5EncoderModel", T5_XXL, pad_token="<pad>")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build one pipeline from scratch: a UNet model (`unet`) or a diffusion
    transformer (`transformer`, of diffusers class `transformer_class`)."""

    pipeline_class: str
    resolution: int
    vae_scale_factor: int
    prediction_type: str  # "epsilon", "v_prediction", or FLOW
    vae: Config
    text_encoders: tuple[TextEncoderSpec, ...]
    unet: Config | None = None
    transformer: Config | None = None
    transformer_class: str | None = None
    noise_schedule: Config = field(default_factory=lambda: SCHEDULER_COMMON)
    max_length: int = MAX_LENGTH  # CLIP's prompt tokens
    max_sequence_length: int | None = None  # T5's prompt tokens (the DiT pipelines' argument)
    classifier_free_guidance: bool = True  # False for Flux-dev: its guidance is an embedding

    @property
    def scheduler(self) -> Config:
        """Scheduler config shared by every scheduler kind (betas or flow shift, steps, prediction type)."""
        if self.prediction_type == FLOW:
            return dict(self.noise_schedule)
        return {**self.noise_schedule, "prediction_type": self.prediction_type}

    @property
    def denoiser(self) -> str:
        """The pipeline attribute of the denoising model: "unet" or "transformer"."""
        return "unet" if self.unet is not None else "transformer"

    @property
    def latent_pixels_per_token(self) -> int:
        """A DiT's image token side in latent pixels: the patch size, times 2 where Flux packs
        2x2 latent pixels into each token. Image sides must be multiples of this times the VAE factor."""
        if self.transformer is None:
            raise ValueError(f"{self.pipeline_class} has a UNet, not image tokens")
        packing = 2 if self.pipeline_class == "FluxPipeline" else 1
        return packing * self.transformer["patch_size"]

    @property
    def pixels_per_token(self) -> int:
        """A DiT's image token side in image pixels: the VAE factor x `latent_pixels_per_token`."""
        return self.vae_scale_factor * self.latent_pixels_per_token


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
    "pixart_sigma": ModelSpec(
        pipeline_class="PixArtSigmaPipeline",
        resolution=1024,
        vae_scale_factor=8,
        prediction_type="epsilon",
        transformer=PIXART_SIGMA_TRANSFORMER,
        transformer_class="PixArtTransformer2DModel",
        vae=SDXL_VAE,
        text_encoders=(T5_XXL_ENCODER,),
        noise_schedule=PIXART_SCHEDULER,
        max_sequence_length=300,
    ),
    "sd3_medium": ModelSpec(
        pipeline_class="StableDiffusion3Pipeline",
        resolution=1024,
        vae_scale_factor=8,
        prediction_type=FLOW,
        transformer=SD3_MEDIUM_TRANSFORMER,
        transformer_class="SD3Transformer2DModel",
        vae=SD3_VAE,
        text_encoders=(
            TextEncoderSpec("CLIPTextModelWithProjection", CLIP_L),
            TextEncoderSpec("CLIPTextModelWithProjection", OPENCLIP_BIGG, pad_token="!"),
            T5_XXL_ENCODER,
        ),
        noise_schedule=SD3_SCHEDULER,
        max_sequence_length=256,
    ),
    "flux_dev": ModelSpec(
        pipeline_class="FluxPipeline",
        resolution=1024,
        vae_scale_factor=8,
        prediction_type=FLOW,
        transformer=FLUX_DEV_TRANSFORMER,
        transformer_class="FluxTransformer2DModel",
        vae=FLUX_VAE,
        text_encoders=(
            TextEncoderSpec("CLIPTextModel", CLIP_L),
            T5_XXL_ENCODER,
        ),
        noise_schedule=FLUX_SCHEDULER,
        max_sequence_length=512,
        classifier_free_guidance=False,
    ),
}


def _tiny(real: ModelSpec, transformer: Config, vae: Config, *text_encoders: TextEncoderSpec) -> ModelSpec:
    """A CPU-sized variant of the DiT `real`: its pipeline, schedule and guidance, 64 px images."""
    return replace(real, resolution=64, vae_scale_factor=2, transformer=transformer, vae=vae,
                   text_encoders=text_encoders, max_sequence_length=64)


TINY_T5_ENCODER = TextEncoderSpec("T5EncoderModel", TINY_T5, pad_token="<pad>")
MODELS.update({
    "pixart": _tiny(MODELS["pixart_sigma"], TINY_PIXART_TRANSFORMER, TINY_VAE, TINY_T5_ENCODER),
    "sd3": _tiny(MODELS["sd3_medium"], TINY_SD3_TRANSFORMER, TINY_SD3_VAE,
                 TextEncoderSpec("CLIPTextModelWithProjection", TINY_CLIP_1),
                 TextEncoderSpec("CLIPTextModelWithProjection", TINY_CLIP_2, pad_token="!"), TINY_T5_ENCODER),
    "flux": _tiny(MODELS["flux_dev"], TINY_FLUX_TRANSFORMER, TINY_FLUX_VAE,
                  TextEncoderSpec("CLIPTextModel", TINY_CLIP_1), TINY_T5_ENCODER),
})

MODEL_NAMES: tuple[str, ...] = tuple(MODELS)


def get_spec(name: str) -> ModelSpec:
    """The spec of model `name`; ValueError listing the allowed names if it is unknown."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    return MODELS[name]
