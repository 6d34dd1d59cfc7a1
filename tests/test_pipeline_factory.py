"""Model configs and the pipeline builder: random and local weights, determinism, real-model sizes."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from distrifusion.model_configs import FLOW, MODEL_NAMES, MODELS, get_spec
from distrifusion.pipeline_factory import (
    build_pipeline,
    build_scheduler,
    build_t5_tokenizer,
    build_tokenizer,
    build_transformer,
    build_unet,
)

UNET_MODELS = [name for name in MODEL_NAMES if MODELS[name].unet is not None]
DIT_MODELS = [name for name in MODEL_NAMES if MODELS[name].transformer is not None]

PROMPT = "a photo of an astronaut riding a horse"


def run_latents(pipe) -> torch.Tensor:
    """Two DDIM steps of `pipe` at 64x64 pixels with a fixed noise seed."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    out = pipe(PROMPT, height=64, width=64, num_inference_steps=2, output_type="latent", generator=generator)
    return out.images


def weights(pipe) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the pipeline's models, by component-qualified name."""
    return {
        f"{component}.{name}": tensor
        for component in ("unet", "vae", "text_encoder", "text_encoder_2")
        for name, tensor in getattr(pipe, component).state_dict().items()
    }


@pytest.fixture(scope="module")
def tiny():
    return build_pipeline("tiny", seed=0)


def test_tiny_pipeline_runs_and_is_sdxl_shaped(tiny):
    latents = run_latents(tiny)
    assert latents.shape == (1, 4, 32, 32)
    assert torch.isfinite(latents).all() and latents.std() > 0
    assert type(tiny).__name__ == "StableDiffusionXLPipeline"
    assert isinstance(tiny.scheduler, DDIMScheduler)
    assert tiny.vae_scale_factor == get_spec("tiny").vae_scale_factor == 2
    assert tiny.unet.config.down_block_types == MODELS["sdxl"].unet["down_block_types"]
    assert tiny.unet.config.up_block_types == MODELS["sdxl"].unet["up_block_types"]
    assert tiny.unet.config.addition_embed_type == "text_time"
    downsamplers = [b for b in tiny.unet.down_blocks if b.downsamplers is not None]
    assert len(downsamplers) >= 2
    for name, tensor in weights(tiny).items():
        assert tensor.device.type == "cpu" and torch.isfinite(tensor).all(), name
        if tensor.dim() >= 2:
            assert tensor.std() > 0, name


def test_random_weights_log_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="distrifusion"):
        build_pipeline("tiny")
    records = [r for r in caplog.records if r.name == "distrifusion"]
    assert len(records) == 1 and "random weights" in records[0].getMessage().lower()


def test_same_seed_gives_bitwise_same_weights(tiny):
    torch.manual_seed(1234)
    np.random.seed(1234)
    again = weights(build_pipeline("tiny", seed=0))
    first = weights(tiny)
    assert again.keys() == first.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    other = weights(build_pipeline("tiny", seed=1))
    assert not torch.equal(first["unet.conv_in.weight"], other["unet.conv_in.weight"])


def test_unet_dtype_and_device_keep_the_seeded_values(tiny):
    unet = build_unet("tiny", device="cpu", dtype=torch.bfloat16, seed=0)
    for name, param in unet.named_parameters():
        assert param.dtype == torch.bfloat16
        assert torch.equal(param, tiny.unet.get_parameter(name).to(torch.bfloat16)), name


def test_save_and_load_give_identical_outputs(tiny, tmp_path, caplog):
    saved = build_pipeline("tiny", seed=7)
    saved.save_pretrained(tmp_path)
    caplog.clear()
    loaded = build_pipeline("tiny", path=str(tmp_path))
    assert not [r for r in caplog.records if r.name == "distrifusion"]
    assert isinstance(loaded.scheduler, DDIMScheduler)
    assert torch.equal(run_latents(loaded), run_latents(saved))
    assert not torch.equal(run_latents(loaded), run_latents(tiny))


def test_bad_paths_raise_clear_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_pipeline("tiny", path=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        build_pipeline("tiny", path=str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline"):
        build_pipeline("tiny", path=str(tmp_path))


def test_unknown_names_raise_with_the_choices():
    for build in (build_pipeline, build_unet, build_transformer, lambda name: build_scheduler("ddim", name)):
        with pytest.raises(ValueError, match="sdxl.*sd15.*sd21.*tiny.*pixart.*sd3.*flux"):
            build("sd4")
    for kind in ("pndm", "flow"):
        with pytest.raises(ValueError, match="ddim.*euler"):
            build_scheduler(kind, "sd3")
    with pytest.raises(ValueError, match="diffusion transformer"):
        build_unet("flux")
    with pytest.raises(ValueError, match="UNet"):
        build_transformer("tiny")


@pytest.mark.parametrize(
    "name, expected", [("sdxl", 2.567e9), ("sd15", 859.5e6), ("sd21", 865.9e6), ("tiny", None)]
)
def test_unet_builds_on_meta_with_the_published_size(name, expected):
    unet = build_unet(name, dtype=torch.float16)
    params = list(unet.parameters())
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in params)
    count = sum(p.numel() for p in params)
    if expected is not None:
        assert abs(count - expected) / expected < 0.01, count
    else:
        assert count < 5e6


@pytest.mark.parametrize(
    "name, expected", [("pixart_sigma", 610.9e6), ("sd3_medium", 2.028e9), ("flux_dev", 11.90e9), ("pixart", None),
                       ("sd3", None), ("flux", None)]
)
def test_transformer_builds_on_meta_with_the_published_size(name, expected):
    transformer = build_transformer(name, dtype=torch.bfloat16)
    params = list(transformer.parameters())
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in params)
    assert type(transformer).__name__ == get_spec(name).transformer_class
    count = sum(p.numel() for p in params)
    if expected is not None:
        assert abs(count - expected) / expected < 0.01, count
    else:
        assert count < 2e5


@pytest.mark.parametrize("name", UNET_MODELS)
def test_spec_is_consistent(name):
    spec = get_spec(name)
    unet, vae = spec.unet, spec.vae
    assert spec.vae_scale_factor == 2 ** (len(vae["block_out_channels"]) - 1)
    assert unet["sample_size"] * spec.vae_scale_factor == spec.resolution
    assert spec.max_length == 77
    assert all(c % unet["norm_num_groups"] == 0 for c in unet["block_out_channels"])
    assert all(c % vae["norm_num_groups"] == 0 for c in vae["block_out_channels"])
    hidden = [e.config["hidden_size"] for e in spec.text_encoders]
    assert unet["cross_attention_dim"] == sum(hidden)
    if spec.pipeline_class == "StableDiffusionXLPipeline":
        assert [e.class_name for e in spec.text_encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
        pooled = spec.text_encoders[1].config["projection_dim"]
        assert unet["projection_class_embeddings_input_dim"] == pooled + 6 * unet["addition_time_embed_dim"]
    else:
        assert len(spec.text_encoders) == 1


@pytest.mark.parametrize("name", DIT_MODELS)
def test_dit_spec_is_consistent(name):
    spec = get_spec(name)
    dit, vae = spec.transformer, spec.vae
    assert spec.unet is None and spec.denoiser == "transformer"
    assert spec.vae_scale_factor == 2 ** (len(vae["block_out_channels"]) - 1)
    encoders = {e.class_name: e.config for e in spec.text_encoders}
    t5 = encoders.pop("T5EncoderModel")
    clips = [e.config for e in spec.text_encoders if e.class_name != "T5EncoderModel"]
    assert spec.text_encoders[-1].class_name == "T5EncoderModel" and spec.max_sequence_length
    if spec.pipeline_class == "FluxPipeline":
        assert dit["in_channels"] == 4 * vae["latent_channels"] and spec.latent_pixels_per_token == 2
        assert spec.pixels_per_token == 2 * spec.vae_scale_factor
        assert sum(dit["axes_dims_rope"]) == dit["attention_head_dim"]
        assert dit["joint_attention_dim"] == t5["d_model"]
        assert dit["pooled_projection_dim"] == clips[0]["hidden_size"]  # CLIPTextModel's pooled output
        assert not spec.classifier_free_guidance and dit["guidance_embeds"]
        return
    assert dit["sample_size"] * spec.vae_scale_factor == spec.resolution
    assert dit["in_channels"] == vae["latent_channels"] and spec.latent_pixels_per_token == dit["patch_size"]
    if spec.pipeline_class == "PixArtSigmaPipeline":
        assert dit["caption_channels"] == t5["d_model"] and not clips
        assert dit["out_channels"] == 2 * dit["in_channels"]  # learned sigma
    else:
        assert dit["joint_attention_dim"] == t5["d_model"] >= sum(c["hidden_size"] for c in clips)
        assert dit["pooled_projection_dim"] == sum(c["projection_dim"] for c in clips)
        assert dit["pos_embed_max_size"] * dit["patch_size"] >= dit["sample_size"]


def test_published_values():
    assert {n: (MODELS[n].pipeline_class, MODELS[n].resolution) for n in MODEL_NAMES} == {
        "sdxl": ("StableDiffusionXLPipeline", 1024),
        "sd15": ("StableDiffusionPipeline", 512),
        "sd21": ("StableDiffusionPipeline", 768),
        "tiny": ("StableDiffusionXLPipeline", 64),
        "pixart_sigma": ("PixArtSigmaPipeline", 1024),
        "sd3_medium": ("StableDiffusion3Pipeline", 1024),
        "flux_dev": ("FluxPipeline", 1024),
        "pixart": ("PixArtSigmaPipeline", 64),
        "sd3": ("StableDiffusion3Pipeline", 64),
        "flux": ("FluxPipeline", 64),
    }
    flux = MODELS["flux_dev"].transformer
    assert (flux["num_layers"], flux["num_single_layers"], flux["num_attention_heads"], flux["attention_head_dim"]) \
        == (19, 38, 24, 128)
    assert flux["axes_dims_rope"] == [16, 56, 56] and flux["in_channels"] == 64
    assert (MODELS["flux_dev"].vae["scaling_factor"], MODELS["flux_dev"].vae["shift_factor"]) == (0.3611, 0.1159)
    assert (MODELS["sd3_medium"].vae["scaling_factor"], MODELS["sd3_medium"].vae["shift_factor"]) == (1.5305, 0.0609)
    assert MODELS["sd3_medium"].transformer["num_layers"] == 24
    assert MODELS["pixart_sigma"].transformer["num_layers"] == 28
    assert [MODELS[n].max_sequence_length for n in ("pixart_sigma", "sd3_medium", "flux_dev")] == [300, 256, 512]
    assert MODELS["sdxl"].unet["transformer_layers_per_block"] == [1, 2, 10]
    assert [e.config["hidden_size"] for e in MODELS["sdxl"].text_encoders] == [768, 1280]
    assert MODELS["sd21"].unet["attention_head_dim"] == [5, 10, 20, 20]
    assert MODELS["sd21"].unet["use_linear_projection"] is True
    sd21_text = MODELS["sd21"].text_encoders[0].config
    assert (sd21_text["hidden_size"], sd21_text["num_hidden_layers"]) == (1024, 23)
    assert [MODELS[n].prediction_type for n in MODEL_NAMES] == ["epsilon", "epsilon", "v_prediction", "epsilon",
                                                                 "epsilon", FLOW, FLOW, "epsilon", FLOW, FLOW]


def test_schedulers_follow_the_model():
    ddim = build_scheduler("ddim", "sd21")
    assert isinstance(ddim, DDIMScheduler)
    config = ddim.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (config.num_train_timesteps, config.steps_offset, config.set_alpha_to_one) == (1000, 1, False)
    assert config.prediction_type == "v_prediction"
    euler = build_scheduler("euler", "sdxl")
    assert isinstance(euler, EulerDiscreteScheduler) and euler.config.prediction_type == "epsilon"
    assert build_scheduler("ddim", "sdxl") is not build_scheduler("ddim", "sdxl")
    pixart = build_scheduler("ddim", "pixart_sigma").config
    assert (pixart.beta_schedule, pixart.beta_start, pixart.beta_end) == ("linear", 0.0001, 0.02)


@pytest.mark.parametrize("kind", ["ddim", "euler"])
def test_flow_models_sample_with_flow_matching_euler(kind):
    sd3, flux = build_scheduler(kind, "sd3_medium"), build_scheduler(kind, "flux")
    assert isinstance(sd3, FlowMatchEulerDiscreteScheduler) and isinstance(flux, FlowMatchEulerDiscreteScheduler)
    assert sd3.config.shift == 3.0 and not sd3.config.use_dynamic_shifting
    assert flux.config.use_dynamic_shifting and flux.config.max_shift == 1.15


def test_offline_tokenizer():
    tokenizer = build_tokenizer()
    assert len(tokenizer) == 514 and tokenizer.model_max_length == 77
    ids = tokenizer("A cat!", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[:6] == [512, *tokenizer.convert_tokens_to_ids(["a</w>", "c", "a", "t</w>"]), 256]
    assert ids[6:] == [513] * 71 and tokenizer.pad_token_id == 513
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a cat !"
    assert build_tokenizer(pad_token="!")("cat", padding="max_length").input_ids[-1] == 0
    for spec in MODELS.values():
        assert all(len(tokenizer) <= e.config["vocab_size"] for e in spec.text_encoders if "CLIP" in e.class_name)


def test_offline_t5_tokenizer():
    tokenizer = build_t5_tokenizer(max_length=12)
    assert len(tokenizer) == get_spec("flux").text_encoders[-1].config["vocab_size"] == 98
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("A cat!", padding="max_length", max_length=12, truncation=True).input_ids
    assert ids == [3, *tokenizer.convert_tokens_to_ids(["A", "\u2581", "c", "a", "t", "!"]), 1, 0, 0, 0, 0]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "A cat!"
    assert tokenizer("é").input_ids == [3, 2, 1]  # outside the vocabulary: <unk>


@pytest.mark.parametrize("name", ["pixart", "sd3", "flux"])
def test_tiny_dit_pipelines_are_seeded_and_finite(name):
    pipe = build_pipeline(name, seed=3)
    spec = get_spec(name)
    assert type(pipe).__name__ == spec.pipeline_class and pipe.vae_scale_factor == spec.vae_scale_factor
    assert type(pipe.transformer).__name__ == spec.transformer_class
    again = build_pipeline(name, seed=3).transformer.state_dict()
    other = build_pipeline(name, seed=4).transformer.state_dict()
    for key, tensor in pipe.transformer.state_dict().items():
        assert torch.isfinite(tensor).all() and torch.equal(tensor, again[key]), key
    assert any(not torch.equal(t, other[k]) for k, t in pipe.transformer.state_dict().items())
    t5 = pipe.components[f"text_encoder_{len(spec.text_encoders)}" if len(spec.text_encoders) > 1 else "text_encoder"]
    assert t5.encoder.embed_tokens.weight.device.type == "cpu"
    assert torch.equal(t5.encoder.embed_tokens.weight, t5.shared.weight)
