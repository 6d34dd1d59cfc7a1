"""Build the supported diffusers pipelines from `model_configs`, with random or local weights.

Random weights are drawn per parameter from a CPU generator seeded by (seed, parameter name), so a
seed gives bitwise the same weights in every process and on every device. Modules are constructed
with their parameters on the meta device, which skips the (slow) default initialisation.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import diffusers
import numpy as np
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    ModelMixin,
    UNet2DConditionModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from .model_configs import FLOW, ModelSpec, TextEncoderSpec, get_spec

logger = logging.getLogger("distrifusion")

SCHEDULER_KINDS: tuple[str, ...] = ("ddim", "euler")
T5_ENCODER = "T5EncoderModel"


_META_LOCK = threading.Lock()


def build_scheduler(kind: str, model_name: str) -> SchedulerMixin:
    """A fresh scheduler of `kind` ("ddim" or "euler") configured like `model_name`'s.

    A flow-matching model (SD3, Flux) gets `FlowMatchEulerDiscreteScheduler` for either kind: on
    its straight noise-to-image path a deterministic DDIM step is exactly the Euler step
    x + (sigma_next - sigma) * velocity, so both names mean the same sampler there.
    """
    spec = get_spec(model_name)
    config = spec.scheduler
    if kind in SCHEDULER_KINDS and spec.prediction_type == FLOW:
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    if kind == "ddim":
        return DDIMScheduler.from_config({**config, "clip_sample": False, "set_alpha_to_one": False})
    if kind == "euler":
        euler_config = {**config, "interpolation_type": "linear", "use_karras_sigmas": False}
        return EulerDiscreteScheduler.from_config(euler_config)
    raise ValueError(f"unknown scheduler kind {kind!r}; choose one of {SCHEDULER_KINDS}")


def build_tokenizer(pad_token: str = "<|endoftext|>", max_length: int = 77) -> transformers.CLIPTokenizer:
    """An offline CLIP tokenizer: byte-level vocab (each byte alone and with "</w>"), no merges."""
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token, model_max_length=max_length)


def build_t5_tokenizer(max_length: int) -> transformers.T5TokenizerFast:
    """An offline T5 tokenizer: a unigram vocabulary of single characters (the printable ASCII
    ones, the word boundary), T5's special ids (<pad> 0, </s> 1, <unk> 2) and no extra ids."""
    characters = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in characters]
    return transformers.T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def build_unet(
    name: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32, seed: int = 0
) -> UNet2DConditionModel:
    """The UNet of model `name`: empty on the meta device, else with the random weights of `seed`."""
    spec = get_spec(name)
    if spec.unet is None:
        raise ValueError(f"model {name!r} is a diffusion transformer ({spec.pipeline_class}), not a UNet model")
    config = copy.deepcopy(spec.unet)
    return _build_module(partial(UNet2DConditionModel.from_config, config), "unet", seed, dtype, device)


def build_transformer(
    name: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32, seed: int = 0
) -> ModelMixin:
    """The diffusion transformer of DiT model `name`: empty on the meta device, else with the
    random weights of `seed` (those of the pipeline `build_pipeline(name, seed=seed)` builds)."""
    spec = get_spec(name)
    if spec.transformer is None:
        raise ValueError(f"model {name!r} is a UNet model ({spec.pipeline_class}), not a diffusion transformer")
    make = partial(getattr(diffusers, spec.transformer_class).from_config, copy.deepcopy(spec.transformer))
    return _build_module(make, "transformer", seed, dtype, device)


def build_vae(
    name: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32, seed: int = 0
) -> AutoencoderKL:
    """The VAE of model `name`: empty on the meta device, else with the random weights of `seed`
    (those of the pipeline `build_pipeline(name, seed=seed)` builds)."""
    config = copy.deepcopy(get_spec(name).vae)
    return _build_module(partial(AutoencoderKL.from_config, config), "vae", seed, dtype, device)


def build_pipeline(
    name: str,
    path: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> DiffusionPipeline:
    """Pipeline `name` with a DDIM scheduler (flow-matching Euler for SD3 and Flux): random weights
    from `seed`, or those of the directory `path`."""
    spec = get_spec(name)
    pipeline_class = getattr(diffusers, spec.pipeline_class)
    if path is not None:
        _check_pipeline_dir(Path(path), spec)
        pipe = pipeline_class.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        if spec.prediction_type != FLOW:
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        return pipe.to(device)
    logger.warning("building %r with RANDOM weights (seed %d): no checkpoint path was given", name, seed)
    components = _random_components(name, spec, dtype, device, seed)
    if spec.pipeline_class == "StableDiffusionXLPipeline":
        return pipeline_class(**components, add_watermarker=False)
    if spec.unet is None:
        return pipeline_class(**components)
    return pipeline_class(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _random_components(
    name: str, spec: ModelSpec, dtype: torch.dtype, device: str | torch.device, seed: int
) -> dict[str, object]:
    """The pipeline's constructor arguments, every model with random weights."""
    build_denoiser = build_unet if spec.unet is not None else build_transformer
    components: dict[str, object] = {
        spec.denoiser: build_denoiser(name, device, dtype, seed),
        "vae": build_vae(name, device, dtype, seed),
        "scheduler": build_scheduler("ddim", name),
    }
    for i, encoder in enumerate(spec.text_encoders):
        suffix = "" if i == 0 else f"_{i + 1}"
        components["text_encoder" + suffix] = _build_module(
            partial(_text_encoder, encoder), "text_encoder" + suffix, seed, dtype, device)
        if encoder.class_name == T5_ENCODER:
            components["tokenizer" + suffix] = build_t5_tokenizer(spec.max_sequence_length)
        else:
            components["tokenizer" + suffix] = build_tokenizer(encoder.pad_token, spec.max_length)
    return components


def _text_encoder(encoder: TextEncoderSpec) -> nn.Module:
    """An (uninitialised) text encoder of `encoder`'s class and config."""
    config_class = transformers.T5Config if encoder.class_name == T5_ENCODER else transformers.CLIPTextConfig
    return getattr(transformers, encoder.class_name)(config_class(**encoder.config))


def _build_module(
    make: Callable[[], nn.Module], prefix: str, seed: int, dtype: torch.dtype, device: str | torch.device
) -> nn.Module:
    """`make()` in eval mode with the random weights of `seed` (empty ones on the meta device).

    Holds `_META_LOCK` throughout: fake ranks build on threads at the same time, and
    assigning parameters while another build has `nn.Module` patched would put them on meta.
    """
    with _META_LOCK:
        return _build_module_locked(make, prefix, seed, dtype, device)


def _build_module_locked(
    make: Callable[[], nn.Module], prefix: str, seed: int, dtype: torch.dtype, device: str | torch.device
) -> nn.Module:
    with _parameters_on_meta():
        module = make()
    state = module.state_dict()
    shapes = {name: param.shape for name, param in module.named_parameters()}
    if torch.device(device).type == "meta":
        state.update({name: torch.empty(shape, dtype=dtype, device="meta") for name, shape in shapes.items()})
    else:

        def draw(name: str) -> torch.Tensor:
            return _random_tensor(f"{prefix}.{name}", shapes[name], seed).to(device=device, dtype=dtype)

        with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
            state.update(zip(shapes, pool.map(draw, shapes)))
    names = {id(param): name for name, param in module.named_parameters()}
    tied = {alias: names[id(param)] for alias, param in module.named_parameters(remove_duplicate=False)}
    state.update({alias: state[name] for alias, name in tied.items()})  # e.g. T5's embed_tokens is `shared`
    module.load_state_dict(state, assign=True)
    return module.to(device).eval()


def _random_tensor(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """Norm weights 1, biases 0, others U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default scale).

    The generator (numpy's PCG64, seeded from `seed` and `name`) and the float32 arithmetic give the
    same bits on every platform, and each parameter is independent of the others.
    """
    if len(shape) < 2:
        return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))
    values = torch.empty(shape)
    generator.random(out=values.numpy(), dtype=np.float32)
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))
    return values.mul_(2.0 * bound).sub_(bound)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every new parameter on the meta device (buffers stay real), so no init is computed.

    It patches `nn.Module` for the duration: callers hold `_META_LOCK`.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _check_pipeline_dir(path: Path, spec: ModelSpec) -> None:
    """Raise a clear error unless `path` is a diffusers directory of `spec`'s pipeline class."""
    if not path.is_dir():
        raise FileNotFoundError(f"pipeline directory {str(path)!r} does not exist")
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a diffusers pipeline directory: no model_index.json")
    class_name = json.loads(index.read_text()).get("_class_name")
    if class_name != spec.pipeline_class:
        raise ValueError(f"{str(path)!r} holds a {class_name}, expected a {spec.pipeline_class}")


def _byte_symbols() -> list[str]:
    """The 256 characters standing for bytes in byte-level BPE vocabularies, in CLIP's vocab order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
