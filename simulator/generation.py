"""The work of a generation around the denoising loop, recorded from the real code on meta.

A user waits for the text encoders, every denoising step (the UNet, which `workload` records,
plus the sampler's work on the latents) and the VAE decode. `record_stages` builds the model's
pipeline on the `meta` device and runs, under an `OpCounter` and a `LiveMemory`:

- `text_encoders`: the pipeline's own `encode_prompt` for one prompt with classifier-free
  guidance as the app asks for it (no negative prompt): SDXL's pipeline encodes the prompt once
  and uses zeros for the negative branch (`force_zeros_for_empty_prompt`); SD 1.5/2.1 also
  encode the empty negative prompt. CLIP pads every prompt to 77 tokens (T5, for the diffusion
  transformers, to the pipeline's `max_sequence_length`), so no prompt is special. SD3 and
  Flux give each of their text encoders the same prompt; Flux has no negative branch.
- `scheduler_step`: one step's work outside the UNet, as diffusers' sampling loop does it: the
  latents doubled for the two guidance branches, `scale_model_input` (not in flow-matching
  samplers), the guidance combine
  `uncond + g * (text - uncond)` and the sampler's `step`. Scalar arithmetic on the
  sampler's host-side tables (0-dim tensors only) is dropped: on a GPU it runs on the host.
- `vae_decode`: the whole decode, as one device runs it and as the app runs it when the UNet
  is not patch-parallel or `parallel.vae=none` (rank 0 alone, then a broadcast of the image:
  `distrifusion.parallel_pipeline.DistriPipeline`), `simulator.vae_decode.decode_on_meta`. The
  patch-parallel decode (`parallel.vae=patch`, the default in patch modes) is recorded apart,
  per rank count, by `simulator.vae_decode`.

Each stage is a trace compute event (`{"type": "compute", "tag", "flops", "bytes", "ops"}`, as
`ComputeModel.event_seconds` prices it) marked `"eager": True`: unlike the UNet's steady steps,
these run eagerly, one host launch per kernel. `memory` holds the weights and the activation
peaks of the stages (bytes, `simulator.live_memory`) for `simulator.memory`. Stages are cached
as JSON next to the UNet traces, keyed by their arguments, `workload.code_version()` and the
versions of the libraries they are recorded from; a cached stage loads without torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

from .workload import DEFAULT_CACHE, cached_at, code_version

SAMPLERS = ("ddim", "euler")  # distrifusion.pipeline_factory.SCHEDULER_KINDS, read without torch
GUIDANCE_SCALE = 5.0  # conf/sampler's; any value > 1 runs the same ops
LIBRARIES = ("torch", "diffusers", "transformers")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # the pipelines' attribute names
# Host time of one sampling-loop step around a stubbed UNet (diffusers' SDXL loop, DDIM, CFG):
# 0.20 ms measured on this project's 2-core CPU VM (tiny model, 52 minus 2 steps, best of 10).
# It is exposed on a GPU: DDIM indexes its host table with the step's device timestep, which
# waits for the device every step, so the host's next launches start only after the UNet ends.
HOST_STEP_S = 0.2e-3


def stages_args(model: str, resolution: int, dtype: str = "float16", cfg: bool = True,
                sampler: str = "ddim") -> dict[str, Any]:
    """The normalised arguments of a stages recording (what its cache key hashes)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return {"model": model, "resolution": int(resolution), "dtype": dtype, "cfg": bool(cfg), "sampler": sampler}


def versioned_path(kind: str, args: dict[str, Any], cache_dir: str | Path | None = None) -> Path:
    """Cache file of a `kind` recording of normalised `args`: keyed by the args, the code
    version and the versions of the libraries recorded through."""
    versions = {lib: importlib.metadata.version(lib) for lib in LIBRARIES}
    key = json.dumps({**args, "kind": kind, "version": code_version(), "libraries": versions}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir or DEFAULT_CACHE).expanduser() / f"{kind}-{args['model']}-{args['resolution']}-{digest}.json"


def load_or_record_stages(model: str, resolution: int, dtype: str = "float16", cfg: bool = True,
                          cache_dir: str | Path | None = None, sampler: str = "ddim") -> dict:
    """`{"text_encoders", "vae_decode", "scheduler_step"}` compute events and `memory` of one
    generation of `model` at a square `resolution` (module doc), cached."""
    args = stages_args(model, resolution, dtype, cfg, sampler)
    return cached_at(versioned_path("stages", args, cache_dir), lambda: record_stages(**args))


def stage_seconds(stages: dict, model: Any) -> dict[str, float]:
    """Seconds of each stage on `model` (a `simulator.compute_model.ComputeModel`), and the
    host's exposed time per sampling step (`HOST_STEP_S`)."""
    return {"text_encoders_s": model.event_seconds(stages["text_encoders"]),
            "vae_decode_s": model.event_seconds(stages["vae_decode"]),
            "scheduler_per_step_s": model.event_seconds(stages["scheduler_step"]),
            "host_per_step_s": HOST_STEP_S}


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Silence loggers `names` below errors: the factory warns of random weights (meta has
    none), diffusers of casting the VAE with `to()` (which its own pipeline does)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _host_scalars_only(op: dict) -> bool:
    return all(shape == "scalar" for shape in op["key"].split("|")[1].split(","))


def _event(counter: Any, tag: str, keep: Callable[[dict], bool] = lambda op: True) -> dict:
    """The counter's ops since the last cut that `keep` accepts, as an eager compute event."""
    ops = [op for op in (counter.cut(tag) or {"ops": []})["ops"] if keep(op)]
    return {"type": "compute", "tag": tag, "flops": sum(o["flops"] for o in ops),
            "bytes": sum(o["bytes"] for o in ops), "ops": ops, "eager": True}


def record_stages(model: str, resolution: int, dtype: str = "float16", cfg: bool = True,
                  sampler: str = "ddim") -> dict:
    """Record the stages of one generation (module doc); see `load_or_record_stages`."""
    import torch

    from distrifusion.model_configs import get_spec
    from distrifusion.pipeline_factory import build_pipeline, build_scheduler

    from .live_memory import LiveMemory, storage_bytes
    from .meta_memo import MetaMemo
    from .op_counter import OpCounter
    from .prompt_encoding import encode_prompt
    from .unet_run import latent_size
    from .vae_decode import decode_on_meta, pipeline_decode_dtype

    args = stages_args(model, resolution, dtype, cfg, sampler)
    spec, torch_dtype, meta = get_spec(model), getattr(torch, dtype), torch.device("meta")
    latent_shape = (1, spec.vae["latent_channels"], *(latent_size(model, resolution),) * 2)
    with quiet_loggers("distrifusion", "diffusers"), torch.no_grad(), MetaMemo(), OpCounter() as counter:
        pipe = build_pipeline(model, dtype=torch_dtype, device=meta)
        counter.cut("set-up")
        with LiveMemory() as text_memory:
            encode_prompt(pipe, "a lighthouse", meta, cfg, spec.max_sequence_length)
        text = _event(counter, "text encoders")

        scheduler = build_scheduler(sampler, model)
        # Flux shifts its schedule by the image's token count; any shift runs the same ops
        scheduler.set_timesteps(50, **({"mu": 1.0} if scheduler.config.get("use_dynamic_shifting") else {}))
        if hasattr(scheduler, "set_begin_index"):  # as the pipeline does: no search of the timestep table
            scheduler.set_begin_index(0)
        t = scheduler.timesteps[0]
        latents = torch.empty(latent_shape, dtype=torch_dtype, device=meta)
        noise = torch.empty((2 if cfg else 1, *latent_shape[1:]), dtype=torch_dtype, device=meta)
        counter.cut("set-up")
        if hasattr(scheduler, "scale_model_input"):  # flow-matching schedulers have none
            scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
        if cfg:
            uncond, cond = noise.chunk(2)
            noise = uncond + GUIDANCE_SCALE * (cond - uncond)
        scheduler.step(noise, t, latents, return_dict=False)
        step = _event(counter, "scheduler step", lambda op: not _host_scalars_only(op))

        vae = pipe.vae
        decode_dtype = getattr(torch, pipeline_decode_dtype(model, dtype))
        decode_weights, decode_peak = decode_on_meta(vae, latents, decode_dtype, pipe.image_processor)
        decode = _event(counter, "vae decode")
    encoders = [m for m in (getattr(pipe, name, None) for name in TEXT_ENCODERS) if m is not None]
    memory = {
        "text_encoders_weights_bytes": storage_bytes(p for m in encoders for p in (*m.parameters(), *m.buffers())),
        "text_encoders_peak_bytes": text_memory.peak,
        "vae_weights_bytes": storage_bytes((*vae.parameters(), *vae.buffers())),
        "vae_decode_weights_bytes": decode_weights,
        "vae_decode_peak_bytes": decode_peak,
        "vae_decode_dtype": str(decode_dtype).removeprefix("torch."),
    }
    meta_info = {**args, "version": code_version(), "tokens": spec.max_length, "latent": list(latent_shape)}
    return {"meta": meta_info, "text_encoders": text, "scheduler_step": step, "vae_decode": decode, "memory": memory}
