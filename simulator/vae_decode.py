"""The VAE decode at the end of a generation, whole or patch-parallel, recorded on meta.

The pipeline decodes once its loop ends (`decode_on_meta`, which `simulator.generation` runs for
the whole decode too): SDXL's pipeline casts a float16 VAE to float32 first (`force_upcast`) and
back after, the latents are unscaled (and unshifted, for SD3 and Flux) and decoded, the image is denormalised to [0, 1]
(`postprocess`, output "pt") and kept in float32. With `parallel.vae=patch` and a patch mode
(`distrifusion.patch_vae`) every rank decodes its rows of the latent and the image rows are
all-gathered; post-processing then runs on every rank on the whole image.

`record_decode` runs that decode for rank 0 of `world_size` emulated ranks (rank 0 holds the
most rows, `exact_rows.split_rows`): the real patched code on the `meta` device under an
`OpCounter` cut at every collective (`workload.StepEvents`, as the UNet's trace is) and a
`LiveMemory`. The collectives are blocking and follow each other: each 3x3 convolution's edge
rows, each GroupNorm's moments, the mid-block attention's K/V, then the image rows
(`output:vae`). `decode_seconds` replays these events on the engine (every rank as rank 0,
eager): the decode's time is its compute segments plus the collectives, none hidden. A
world_size of 1 records the stock, unpatched decode. Recordings are cached like the stages
(`generation.versioned_path`); a cached one loads without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .compute_model import CalibrationProfile
from .engine import simulate
from .generation import quiet_loggers, versioned_path
from .hardware import Hardware
from .workload import StepEvents, cached_at

DEFAULT_CHUNK_MIB = 256  # distrifusion.ParallelConfig.vae_chunk_mib's default, read without torch
VAES = ("patch", "none")  # distrifusion.parallel_config.VAES, read without torch


def decode_args(model: str, resolution: int, world_size: int, dtype: str = "float16",
                decode_dtype: str | None = None, chunk_mib: int = DEFAULT_CHUNK_MIB) -> dict[str, Any]:
    """The normalised arguments of a decode recording (what its cache key hashes): `dtype` is
    the run's, `decode_dtype` the VAE's while it decodes (None: as the model's pipeline does,
    `pipeline_decode_dtype`); `chunk_mib` only matters when patched (world_size > 1)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if chunk_mib < 0:
        raise ValueError(f"chunk_mib must be >= 0, got {chunk_mib}")
    return {"model": model, "resolution": int(resolution), "world_size": int(world_size), "dtype": dtype,
            "decode_dtype": decode_dtype, "chunk_mib": int(chunk_mib) if world_size > 1 else 0}


def pipeline_decode_dtype(model: str, dtype: str) -> str:
    """The dtype `model`'s pipeline decodes in when it runs in `dtype`: SDXL's upcasts a float16
    VAE to float32 (`force_upcast`, diffusers' default when the config leaves it out)."""
    from distrifusion.model_configs import get_spec

    spec = get_spec(model)
    upcast = (spec.pipeline_class == "StableDiffusionXLPipeline" and dtype == "float16"
              and spec.vae.get("force_upcast", True))
    return "float32" if upcast else dtype


def load_or_record_decode(model: str, resolution: int, world_size: int, dtype: str = "float16",
                          chunk_mib: int = DEFAULT_CHUNK_MIB, cache_dir: str | Path | None = None) -> dict:
    """`record_decode` of the pipeline's decode, cached."""
    args = decode_args(model, resolution, world_size, dtype, chunk_mib=chunk_mib)
    return cached_at(versioned_path("vae", args, cache_dir), lambda: record_decode(**args))


def decode_on_meta(vae: Any, latents: Any, decode_dtype: Any, image_processor: Any) -> tuple[int, int]:
    """Run the pipeline's decode of `latents` (module doc) with `vae` (patched or not) and
    return (bytes of the VAE's weights in `decode_dtype`, peak bytes above them and the latents)."""
    import torch

    from .live_memory import LiveMemory, storage_bytes

    run_dtype = next(vae.parameters()).dtype
    vae.to(decode_dtype)
    weights = storage_bytes((*vae.parameters(), *vae.buffers()))
    with LiveMemory() as memory:
        latents = latents.to(decode_dtype) / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):  # SD3's and Flux's latents are shifted too
            latents = latents + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        image_processor.postprocess(image, output_type="pt").to(torch.float32)
        del image
    vae.to(run_dtype)
    return weights, memory.peak


def record_decode(model: str, resolution: int, world_size: int, dtype: str = "float16",
                  decode_dtype: str | None = None, chunk_mib: int = DEFAULT_CHUNK_MIB) -> dict:
    """Rank 0's decode of one `resolution`-square image on `world_size` ranks (module doc):
    `{"meta", "events"` (compute, issue and wait, as a trace phase's), `"memory"`
    (`vae_decode_weights_bytes`, `vae_decode_peak_bytes` above them)`}`."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from backends.recording import Recorder
    from distrifusion.patch_vae import patch_vae
    from distrifusion.pipeline_factory import build_vae

    from .meta_memo import MetaMemo
    from .op_counter import OpCounter
    from .unet_run import QuietEmulated, latent_size

    args = decode_args(model, resolution, world_size, dtype, decode_dtype, chunk_mib)
    decode_dtype = decode_dtype or pipeline_decode_dtype(model, dtype)
    counter = OpCounter()
    events = StepEvents(counter)
    with quiet_loggers("distrifusion", "diffusers"), torch.no_grad(), MetaMemo(), counter:
        vae = build_vae(model, "meta", getattr(torch, dtype))
        if world_size > 1:
            recorder = Recorder(QuietEmulated(world_size, 0, "meta", counter), events.on_event)
            events.records = recorder.records
            patch_vae(vae, recorder, args["chunk_mib"] * 2**20)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        latents = torch.empty(1, vae.config.latent_channels, latent_size(model, resolution),
                              latent_size(model, resolution), dtype=getattr(torch, dtype), device="meta")
        counter.cut("set-up")
        weights, peak = decode_on_meta(vae, latents, getattr(torch, decode_dtype),
                                       VaeImageProcessor(vae_scale_factor=factor))
        decode = events.end_step()
    for event in decode:
        if event["type"] == "compute":
            event["eager"] = True
    issues = [e for e in decode if e["type"] == "issue"]
    meta = {**args, "decode_dtype": decode_dtype, "recorded_rank": 0, "collectives": len(issues),
            "comm_bytes": sum(e["bytes"] for e in issues)}
    return {"meta": meta, "events": decode,
            "memory": {"vae_decode_weights_bytes": weights, "vae_decode_peak_bytes": peak}}


def decode_seconds(decode: dict, hardware: Hardware, profile: CalibrationProfile | None = None) -> dict[str, float]:
    """The recorded decode on `hardware`, every rank as rank 0, eager: `vae_decode_s` (its time),
    `vae_compute_s` and `vae_comm_s` (the collectives', all exposed)."""
    meta = decode["meta"]
    trace = {"meta": {"world_size": meta["world_size"], "warmup_steps": 1, "dtype": meta["dtype"], "mode": "none"},
             "roles": [{"ranks": list(range(meta["world_size"])), "phases": {"warmup": decode["events"]}}]}
    result = simulate(trace, hardware, 1, profile, graphs="none")
    return {"vae_decode_s": result.latency_s, "vae_compute_s": result.compute_s,
            "vae_comm_s": result.comm_exposed_s}
