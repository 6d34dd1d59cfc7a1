"""One rank of a patch-parallel denoiser (a UNet or a diffusion transformer), played alone: the
emulated rank the simulator records (on the meta device) and calibrates (on a real device), one
denoising step per `step()`."""

from __future__ import annotations

from typing import Any, Callable

import torch

from backends import Work
from backends.emulated import EmulatedCommunicator
from backends.recording import Recorder
from distrifusion import ParallelConfig, parallelize
from distrifusion.model_configs import get_spec
from distrifusion.pipeline_factory import build_transformer, build_unet
from distrifusion.rank_replica import unet_replica

from .op_counter import OpCounter
from .transformer_inputs import transformer_inputs

PROMPT_TOKENS = 77
COMM = "emulated_comm"


class QuietEmulated(EmulatedCommunicator):
    """An emulated rank whose synthesised collectives (local copies) `counter` does not count
    as ops; a timing counter times them as its region `COMM`."""

    def __init__(self, world_size: int, rank: int, device: str | torch.device, counter: OpCounter):
        super().__init__(world_size, rank, device)
        self.counter = counter

    def _quiet(self, fn: Callable[[], Work]) -> Work:
        with self.counter.region(COMM):
            return fn()

    def _all_gather(self, tensor, out):
        return self._quiet(lambda: super(QuietEmulated, self)._all_gather(tensor, out))

    def _all_reduce(self, tensor, op):
        return self._quiet(lambda: super(QuietEmulated, self)._all_reduce(tensor, op))

    def _split(self, groups, members):
        return QuietEmulated(len(members), members.index(self.rank), self.device, self.counter)


def role_rank(world_size: int) -> int:
    """The rank recorded for all: rank 1 where there is one (it has a neighbour on each side
    in groups of 3 or more, so it does the most halo work), else rank 0."""
    return min(1, world_size - 1)


def latent_size(model: str, resolution: int) -> int:
    """Latent height and width of a square `resolution` image; ValueError unless it is a whole
    number of latent pixels (of image tokens, for a diffusion transformer)."""
    spec = get_spec(model)
    unit = spec.vae_scale_factor if spec.transformer is None else spec.pixels_per_token
    if resolution <= 0 or resolution % unit:
        what = "VAE factor" if spec.transformer is None else "VAE factor times image token side"
        raise ValueError(f"resolution {resolution} must be a positive multiple of {model}'s {what} {unit}")
    return resolution // spec.vae_scale_factor


def unet_inputs(model: str, resolution: int, batch: int, dtype: torch.dtype, device: str | torch.device,
                seed: int = 0, graphable: bool = False) -> dict[str, Any]:
    """Keyword arguments of one UNet call: latents, timestep, text embeddings (and SDXL's
    pooled embeddings and time ids), random on a real device, empty on meta. `graphable`: the
    timestep as a (batch,) tensor on `device`, as a CUDA graph needs it (a Python number would
    be copied from the host inside the call)."""
    unet = get_spec(model).unet
    size = latent_size(model, resolution)
    generator = torch.Generator().manual_seed(seed)

    def tensor(*shape: int) -> torch.Tensor:
        if torch.device(device).type == "meta":
            return torch.empty(shape, dtype=dtype, device="meta")
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    inputs: dict[str, Any] = {
        "sample": tensor(batch, unet["in_channels"], size, size),
        "timestep": torch.full((batch,), 999, device=device) if graphable else 999,
        "encoder_hidden_states": tensor(batch, PROMPT_TOKENS, unet["cross_attention_dim"]),
    }
    if unet.get("addition_embed_type") == "text_time":
        pooled = unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {"text_embeds": tensor(batch, pooled), "time_ids": tensor(batch, 6)}
    return inputs


def build_denoiser(model: str, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """`model`'s denoising model (its UNet or its transformer), empty on meta."""
    build = build_unet if get_spec(model).unet is not None else build_transformer
    return build(model, device, dtype)


def denoiser_inputs(model: str, denoiser: torch.nn.Module, resolution: int, batch: int, dtype: torch.dtype,
                    device: str | torch.device, graphable: bool = False) -> dict[str, Any]:
    """Keyword arguments of one call of `denoiser`, `model`'s UNet (`unet_inputs`) or
    transformer (`transformer_inputs.transformer_inputs`, whose timestep is always a tensor)."""
    if get_spec(model).unet is not None:
        return unet_inputs(model, resolution, batch, dtype, device, graphable=graphable)
    return transformer_inputs(model, denoiser, latent_size(model, resolution), batch, dtype, device)


class EmulatedUNet:
    """Rank `rank` of `world_size` running `model`'s denoiser (its UNet, or its diffusion
    transformer: `unet` holds either) patch-parallel in `mode`.

    Collectives go through a `Recorder` (with `on_event`) over a `QuietEmulated` rank, so
    `recorder.records` lists them and `counter` sees only the model's own ops. Every
    `step()` is one denoising step of one generation; `finish()` ends it. `unet`: run a
    replica of this one (sharing its weights) instead of building `model`'s. `graphable`:
    inputs a CUDA graph can capture, and no graphs of the model's own (the caller captures).
    """

    def __init__(self, model: str, resolution: int, world_size: int, mode: str, counter: OpCounter,
                 device: str | torch.device = "meta", dtype: torch.dtype = torch.float16, cfg: bool = True,
                 warmup_steps: int = 1, groupnorm: str = "corrected", split_cfg: bool = True,
                 compress: str = "none", delta: bool = False, on_event: Callable[[dict], None] | None = None, rank: int | None = None,
                 unet: torch.nn.Module | None = None, graphable: bool = False):
        self.rank = role_rank(world_size) if rank is None else rank
        self.unet = build_denoiser(model, device, dtype) if unet is None else unet_replica(unet)
        self.comm = QuietEmulated(world_size, self.rank, device, counter)
        self.recorder = Recorder(self.comm, on_event)
        config = ParallelConfig(mode=mode, warmup_steps=warmup_steps, groupnorm=groupnorm, split_cfg=split_cfg,
                                compress=compress, delta=delta, cuda_graph=not graphable)
        parallelize(self.unet, self.recorder, config)
        self.inputs = denoiser_inputs(model, self.unet, resolution, 2 if cfg else 1, dtype, device, graphable)

    @property
    def context(self) -> Any:
        """The patch context (None in mode "none", which leaves the denoiser whole)."""
        return getattr(self.unet.forward, "ctx", None)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One denoiser call: the next denoising step."""
        return self.unet(**self.inputs, return_dict=False)[0]

    def finish(self) -> None:
        """End the generation: wait for every gather in flight."""
        if self.context is not None:
            self.context.finish()
