"""The `generate` task: one image across the ranks, with a report of where time and bytes go."""

from __future__ import annotations

import json
import resource
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from backends import Communicator
from backends.recording import Recorder

from .config import Dtype
from .model_configs import get_spec
from .parallel_config import ParallelConfig
from .parallel_pipeline import parallelize
from .pipeline_factory import build_pipeline, build_scheduler
from .rank_replica import replica

_BUILT: dict[tuple, Any] = {}
_BUILD_LOCK = threading.Lock()


def load_pipeline(model: DictConfig, device: torch.device) -> Any:
    """This rank's pipeline; ranks sharing a process share one build (and its weights)."""
    key = (model.name, model.path, str(model.dtype), str(device), model.weights_seed)
    with _BUILD_LOCK:
        if key not in _BUILT:
            dtype = getattr(torch, Dtype(model.dtype).value)
            _BUILT[key] = build_pipeline(model.name, model.path, dtype, device, model.weights_seed)
        return replica(_BUILT[key])


def image_size(model: DictConfig) -> tuple[int, int]:
    default = get_spec(model.name).resolution
    return model.height or default, model.width or default


def run_generation(comm: Communicator, cfg: DictConfig, parallel: ParallelConfig, seed: int,
                   progress: bool = True) -> dict:
    """Generate one image on every rank; returns images, latents and the measurements. Rank 0
    shows a progress bar if `progress`."""
    recorder = Recorder(comm)
    pipe = load_pipeline(cfg.model, comm.device)
    pipe.scheduler = build_scheduler(cfg.sampler.name, cfg.model.name)
    pipe.set_progress_bar_config(disable=not progress or comm.rank != 0, desc=f"rank 0 of {comm.world_size}")
    pipe = parallelize(pipe, recorder, parallel)
    marks, stamps, final = [0], [], {}
    steps_peak = _PeakSince(comm.device)

    def on_step_end(_pipe, step, _t, kwargs):
        if comm.device.type == "cuda":
            torch.cuda.synchronize(comm.device)
        steps_peak.restart()  # what follows the last step's end is the decode
        stamps.append(time.perf_counter())
        marks.append(len(recorder.records))
        final["latents"] = kwargs["latents"]
        return kwargs

    height, width = image_size(cfg.model)
    generator = torch.Generator(comm.device).manual_seed(seed)
    noise = initial_noise(pipe, height, width, generator)
    stamps.append(time.perf_counter())
    out = pipe(cfg.prompt, height=height, width=width, num_inference_steps=cfg.sampler.steps,
               guidance_scale=cfg.sampler.guidance_scale, generator=generator, latents=noise, output_type="pt",
               callback_on_step_end=on_step_end)
    context = pipe.context
    vae_peak = steps_peak.since()
    peak = _peak_memory(comm.device) if vae_peak is None else max(steps_peak.before, vae_peak)
    return {
        "image": out.images,
        "latents": final["latents"],
        "step_times_s": [b - a for a, b in zip(stamps, stamps[1:])],
        "bytes_per_step": _bytes_per_step(recorder, marks),
        "comm_buffer_bytes": context.allocated_bytes if context else 0,
        "peak_memory_bytes": peak,
        "vae_peak_memory_bytes": vae_peak,
    }


def initial_noise(pipe: Any, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """The starting latent noise, drawn in float32 and cast to the UNet's dtype, so one seed
    starts every dtype from the same noise and their images can be compared."""
    f = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, height // f, width // f)
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(pipe.unet.dtype)


def _bytes_per_step(recorder: Recorder, marks: list[int]) -> list[dict[str, int]]:
    """Bytes each rank receives per step (= sends, in a ring), by layer kind (tag prefix)."""
    steps = []
    for lo, hi in zip(marks, marks[1:]):
        kinds: dict[str, int] = defaultdict(int)
        for rec in recorder.records[lo:hi]:
            kinds[(rec.tag or rec.kind).split(":")[0]] += rec.bytes * (rec.group_size - 1)
        steps.append(dict(kinds))
    return steps


class _PeakSince:
    """On CUDA, the most memory allocated since the last `restart()` (`since()`), and before it
    (`before`); elsewhere there is no resettable peak, and `since()` is None."""

    def __init__(self, device: torch.device):
        self.device, self.before = device, 0

    def restart(self) -> None:
        if self.device.type == "cuda":
            self.before = max(self.before, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)

    def since(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def to_pil(image: torch.Tensor):
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(image.float().cpu()))[0]


def generate(comm: Communicator, cfg: DictConfig) -> dict:
    """The `generate` task; rank 0 writes `<stem>.png`, `<stem>.json` (and latents if asked)."""
    parallel = ParallelConfig(**OmegaConf.to_container(cfg.parallel))
    result = run_generation(comm, cfg, parallel, cfg.seed)
    times = result["step_times_s"]
    report = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "world_size": comm.world_size,
        "device": str(comm.device),
        "total_s": sum(times),
        "step_times_s": times,
        "bytes_per_step": result["bytes_per_step"],
        "comm_buffer_bytes": result["comm_buffer_bytes"],
        "peak_memory_bytes": result["peak_memory_bytes"],
        "vae_peak_memory_bytes": result["vae_peak_memory_bytes"],
    }
    if comm.rank == 0:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{cfg.model.name}_{parallel.mode}_{comm.world_size}ranks_seed{cfg.seed}"
        to_pil(result["image"]).save(out / f"{stem}.png")
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
        if cfg.save_latents:
            torch.save(result["latents"].cpu(), out / f"{stem}.latents.pt")
        steady = sum(sum(s.values()) for s in report["bytes_per_step"][-1:])
        print(f"{cfg.model.name} {parallel.mode} on {comm.world_size} ranks: {len(times)} steps in "
              f"{report['total_s']:.2f} s ({1e3 * sum(times) / len(times):.0f} ms/step); last step "
              f"exchanged {steady / 2**20:.2f} MiB per rank; wrote {out / stem}.png and .json")
        print(json.dumps({k: report[k] for k in ("world_size", "total_s", "comm_buffer_bytes", "peak_memory_bytes",
                                                 "vae_peak_memory_bytes")}
                         | {"image": str(out / f"{stem}.png")}))
    return report
