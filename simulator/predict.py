"""One prediction: the whole generation on N devices and on one device, through one path.

The UNet loops of both come from recorded (cached) traces replayed by `simulate` on the same
hardware; the baseline is the same model on one device in mode "none". The text encoders, the
scheduler's per-step work (`simulator.generation`, priced by the same compute model) run on every
rank as on one device; the VAE decode too, unless it is patch-parallel (`vae` "patch" in a patch
mode: `simulator.vae_decode`, its compute and its blocking collectives replayed by the engine),
so what a user waits for is

    latency_s = text_encoders_s + unet_s + scheduler_s + vae_decode_s,
    scheduler_s = steps * (the sampler's kernels + the host's exposed time) per step

and `speedup` is the baseline's latency_s over this one (the baseline decodes whole). `rank_compute_seconds` prices one
rank's steady UNet step with no communication (what `shared/reference/h100_sdxl_displaced_step.json`
measures); `ceiling_speedup` is the single device's step over the compute-only ceiling step of
the same configuration (`simulator.ceiling`), the most any patch-parallel runtime could reach.
`Prediction.summary` is the JSON line `python -m simulator` ends with. The
whole-generation parts, the peak memory and the ceiling are recorded when first asked for, so
a caller that only reads `result` pays for none of them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .compute_model import CalibrationProfile, ComputeModel
from .engine import SimResult, simulate
from .hardware import Hardware, load_hardware
from .memory import patched_decode
from .vae_decode import DEFAULT_CHUNK_MIB
from .workload import load_or_record

GIB = 2**30
RECORDED_WARMUP = 4  # the warm-up count traces are cached under; `with_warmup` sets the one replayed


def rank_compute_seconds(trace: dict, hardware: Hardware | str, profile: CalibrationProfile | None = None) -> float:
    """Seconds of one rank's steady UNet step with communication removed.

    The sum of the trace's steady-phase compute events, priced by `ComputeModel` on `hardware`'s
    device in the trace's dtype (`profile` replacing roofline times where it measured), as the
    engine prices them; the slowest role where a trace has several.
    """
    if isinstance(hardware, str):
        hardware = load_hardware(hardware)
    model = ComputeModel(hardware.device, trace.get("meta", {}).get("dtype", ""), profile)
    return max(sum(model.event_seconds(ev) for ev in role["phases"].get("steady", []) if ev["type"] == "compute")
               for role in trace["roles"])


def steady_step_seconds(result: SimResult) -> float | None:
    """The last denoising step's duration, communication included (from `step_end_s`): the step
    as it repeats once the warm-up and the eager steps before graph replay are over. None when
    every step is a warm-up step."""
    ends = result.step_end_s
    warm = min(int(result.meta.get("warmup_steps", 0)), result.steps)
    last = result.steps - 1
    if last < warm:
        return None
    return ends[last] - (ends[last - 1] if last > 0 else 0.0)


@functools.lru_cache(maxsize=64)
def _trace(model: str, resolution: int, world_size: int, mode: str, warmup_steps: int, groupnorm: str,
           split_cfg: bool, dtype: str, cfg: bool, cache_dir: str | None, compress: str = "none",
           delta: bool = False) -> dict:
    """`load_or_record`, memoised in the process: a sweep reads each trace file once."""
    return load_or_record(model, resolution, world_size, mode, warmup_steps, groupnorm, split_cfg, dtype, cfg,
                          cache_dir, compress, delta)


@functools.lru_cache(maxsize=64)
def _stages(model: str, resolution: int, dtype: str, cfg: bool, cache_dir: str | None) -> dict:
    from .generation import load_or_record_stages

    return load_or_record_stages(model, resolution, dtype=dtype, cfg=cfg, cache_dir=cache_dir)


@functools.lru_cache(maxsize=64)
def _decode(model: str, resolution: int, world_size: int, dtype: str, chunk_mib: int, cache_dir: str | None) -> dict:
    from .vae_decode import load_or_record_decode

    return load_or_record_decode(model, resolution, world_size, dtype, chunk_mib, cache_dir)


@functools.lru_cache(maxsize=256)
def _peak_memory(model: str, resolution: int, world_size: int, mode: str, split_cfg: bool, cfg: bool, dtype: str,
                 warmup_steps: int, groupnorm: str, vae: str, vae_chunk_mib: int, cache_dir: str | None,
                 compress: str, delta: bool) -> dict:
    from .memory import peak_memory

    return peak_memory(model, resolution, world_size, mode, split_cfg=split_cfg, cfg=cfg, dtype=dtype,
                       warmup_steps=warmup_steps, groupnorm=groupnorm, cache_dir=cache_dir, vae=vae,
                       vae_chunk_mib=vae_chunk_mib, compress=compress, delta=delta)


@functools.lru_cache(maxsize=64)
def _ceiling(model: str, resolution: int, world_size: int, split_cfg: bool, cfg: bool, dtype: str,
             cache_dir: str | None) -> dict:
    from .ceiling import load_or_record_ceiling

    return load_or_record_ceiling(model, resolution, world_size, split_cfg=split_cfg, cfg=cfg, dtype=dtype,
                                  cache_dir=cache_dir)


@dataclass
class Prediction:
    """The parallel run's UNet loop, the baseline's, and what the rest of the generation adds.

    `setup` holds the arguments of `predict` (hardware by name); `trace` and `single_trace` are
    the two traces replayed.
    """

    result: SimResult
    baseline: SimResult
    setup: dict[str, Any]
    trace: dict
    single_trace: dict
    hardware: Hardware
    profile: CalibrationProfile | None = None
    cache_dir: str | None = None
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)

    def _once(self, key: str, make) -> Any:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    @property
    def stages(self) -> dict[str, float]:
        """`generation.stage_seconds` on this hardware: `text_encoders_s`, `vae_decode_s` (the
        whole decode, as the baseline runs it), `scheduler_per_step_s`, `host_per_step_s`."""
        def make() -> dict[str, float]:
            from .generation import stage_seconds

            s = self.setup
            stages = _stages(s["model"], s["resolution"], s["dtype"], s["cfg"], self.cache_dir)
            return stage_seconds(stages, ComputeModel(self.hardware.device, s["dtype"], self.profile))
        return self._once("stages", make)

    @property
    def patched_decode(self) -> bool:
        """Whether this run decodes patch-parallel (`memory.patched_decode`)."""
        s = self.setup
        return s["world_size"] > 1 and patched_decode(s["parallel"], s["vae"])

    @property
    def decode(self) -> dict[str, float]:
        """This run's decode: `vae_decode_s`, `vae_compute_s`, `vae_comm_s` (exposed), patched
        (`vae_decode.decode_seconds`) or whole (the stage's, no communication)."""
        def make() -> dict[str, float]:
            from .vae_decode import decode_seconds

            s = self.setup
            if not self.patched_decode:
                return {"vae_decode_s": self.stages["vae_decode_s"], "vae_compute_s": self.stages["vae_decode_s"],
                        "vae_comm_s": 0.0}
            decode = _decode(s["model"], s["resolution"], s["world_size"], s["dtype"], s["vae_chunk_mib"],
                             self.cache_dir)
            return decode_seconds(decode, self.hardware, self.profile)
        return self._once("decode", make)

    def whole_latency_s(self, unet: SimResult, decode_s: float) -> float:
        """A generation's latency around the UNet loop `unet` and a decode of `decode_s` (see the
        module docstring)."""
        return self.stages["text_encoders_s"] + unet.latency_s + self.scheduler_s(unet.steps) + decode_s

    def scheduler_s(self, steps: int) -> float:
        """The sampling loop's time outside the UNet over `steps` steps."""
        return steps * (self.stages["scheduler_per_step_s"] + self.stages["host_per_step_s"])

    @property
    def latency_s(self) -> float:
        return self.whole_latency_s(self.result, self.decode["vae_decode_s"])

    @property
    def baseline_latency_s(self) -> float:
        return self.whole_latency_s(self.baseline, self.stages["vae_decode_s"])

    @property
    def speedup(self) -> float:
        """The single device's generation latency over this run's."""
        return self.baseline_latency_s / self.latency_s

    @property
    def rank_compute_s(self) -> float:
        """One rank's steady UNet step without communication (`rank_compute_seconds`)."""
        return self._once("rank", lambda: rank_compute_seconds(self.trace, self.hardware, self.profile))

    @property
    def single_step_s(self) -> float:
        """The single device's steady UNet step."""
        return self._once("single", lambda: rank_compute_seconds(self.single_trace, self.hardware, self.profile))

    @property
    def ceiling_step_s(self) -> float:
        """One rank's compute-only, zero-overhead patch step of this configuration (`simulator.ceiling`);
        on one device, the single device's step."""
        s = self.setup
        if s["world_size"] == 1:
            return self.single_step_s
        return self._once("ceiling", lambda: rank_compute_seconds(
            _ceiling(s["model"], s["resolution"], s["world_size"], s["split_cfg"], s["cfg"], s["dtype"],
                     self.cache_dir), self.hardware, self.profile))

    @property
    def comm_hidden_fraction(self) -> float:
        """The share of the comm stream's busy time the compute stream did not wait for (1 without comm)."""
        r = self.result
        return 1.0 if r.comm_s <= 0 else min(1.0, max(0.0, 1.0 - r.comm_exposed_s / r.comm_s))

    @property
    def memory(self) -> dict[str, Any]:
        """`simulator.memory.peak_memory` of this configuration (bytes per rank); recorded with the
        traces' warm-up count, as the memory (recorded over one warm-up step) does not depend on it."""
        s = self.setup
        return self._once("memory", lambda: _peak_memory(
            s["model"], s["resolution"], s["world_size"], s["parallel"], s["split_cfg"], s["cfg"], s["dtype"],
            RECORDED_WARMUP, s["groupnorm"], s["vae"], s["vae_chunk_mib"], self.cache_dir, s["compress"],
            s["delta"]))

    def summary(self) -> dict[str, Any]:
        """The figures `python -m simulator` prints as its JSON line (times in s unless named ms)."""
        r, st, decode = self.result, self.stages, self.decode
        step = steady_step_seconds(r)
        memory = self.memory
        peak = memory["peak_bytes"]
        capacity = self.hardware.device.memory_gib
        return {
            **self.setup,
            "latency_s": self.latency_s, "single_device_latency_s": self.baseline_latency_s, "speedup": self.speedup,
            "unet_s": r.latency_s, "text_encoders_s": st["text_encoders_s"], "vae_decode_s": decode["vae_decode_s"],
            "vae_decode_comm_s": decode["vae_comm_s"], "single_device_vae_decode_s": st["vae_decode_s"],
            "scheduler_s": self.scheduler_s(r.steps),
            "unet_speedup": self.baseline.latency_s / r.latency_s,
            "rank_compute_ms_per_step": self.rank_compute_s * 1e3,
            "step_ms": None if step is None else step * 1e3,
            "single_device_step_ms": self.single_step_s * 1e3, "ceiling_step_ms": self.ceiling_step_s * 1e3,
            "ceiling_speedup": self.single_step_s / self.ceiling_step_s,
            "compute_s": r.compute_s, "comm_s": r.comm_s, "comm_exposed_s": r.comm_exposed_s,
            "comm_hidden_fraction": self.comm_hidden_fraction, "comm_bytes_per_device": r.comm_bytes_per_device,
            "peak_memory_gib_per_rank": peak / GIB, "peak_memory_phase": memory["peak_phase"],
            "stale_buffer_gib_per_rank": memory["stale_buffer_bytes"] / GIB,
            "weights_gib_per_rank": memory["weights_bytes"] / GIB,
            "vae_decode_gib": memory["vae_decode_peak_bytes"] / GIB, "vae_decode": memory["vae_decode"],
            "device_memory_gib": capacity,
            "fits_in_memory": None if capacity is None else peak <= capacity * GIB,
        }

    def row(self) -> dict[str, Any]:
        """A sweep CSV row: the trace's setup, then `summary`'s figures of the run."""
        head = {k: v for k, v in self.result.to_row().items()
                if k in ("model", "resolution", "mode", "dtype", "hardware", "devices", "steps")}
        s = self.summary()
        return {**head, **{k: s[k] for k in (
            "parallel", "compress", "delta", "latency_s", "single_device_latency_s", "speedup", "unet_s", "step_ms",
            "rank_compute_ms_per_step", "ceiling_speedup", "compute_s", "comm_s", "comm_exposed_s",
            "comm_hidden_fraction", "comm_bytes_per_device", "peak_memory_gib_per_rank")}}


def with_warmup(trace: dict, warmup_steps: int) -> dict:
    """`trace` replayed with another number of synchronous warm-up steps (a shallow copy).

    A trace's phases do not depend on the warm-up count (the recording always runs one
    warm-up step); only `meta.warmup_steps`, which the engine reads, does.
    """
    return {**trace, "meta": {**trace["meta"], "warmup_steps": max(1, int(warmup_steps))}}


def predict(model: str, resolution: int, world_size: int, parallel: str, hardware: Hardware, steps: int,
            warmup_steps: int = 4, groupnorm: str = "corrected", split_cfg: bool = True, cfg: bool = True,
            dtype: str = "float16", profile: CalibrationProfile | None = None,
            cache_dir: str | Path | None = None, graphs: str = "cold", vae: str = "patch",
            vae_chunk_mib: int = DEFAULT_CHUNK_MIB, compress: str = "none", delta: bool = False) -> Prediction:
    """Simulate `model` on `world_size` devices of `hardware` in mode `parallel` and on one device,
    `graphs` saying which steps replay CUDA graphs (`simulator.engine.GRAPHS`), `vae` and
    `vae_chunk_mib` how the image is decoded (`parallel.vae`, `parallel.vae_chunk_mib`),
    `compress` and `delta` how displaced steps send K/V and halos (`parallel.compress`,
    `parallel.delta`: 8-bit payloads, their encoding and decoding recorded as kernels).

    Both traces are read (or recorded) with the default warm-up count and replayed with
    `warmup_steps` (`with_warmup`), so predictions that differ only in it share their traces.
    """
    cache = None if cache_dir is None else str(cache_dir)
    common = (RECORDED_WARMUP, groupnorm, split_cfg, dtype, cfg, cache)
    trace = with_warmup(_trace(model, resolution, world_size, parallel, *common, compress, delta), warmup_steps)
    single = with_warmup(_trace(model, resolution, 1, "none", *common), warmup_steps)
    setup = {"model": model, "resolution": resolution, "world_size": world_size, "hardware": hardware.name,
             "parallel": parallel, "steps": steps, "dtype": dtype, "warmup_steps": warmup_steps,
             "groupnorm": groupnorm, "split_cfg": split_cfg, "cfg": cfg, "graphs": graphs, "vae": vae,
             "vae_chunk_mib": vae_chunk_mib, "compress": compress, "delta": delta}
    return Prediction(simulate(trace, hardware, steps, profile, graphs=graphs),
                      simulate(single, hardware, steps, profile, graphs=graphs), setup, trace, single, hardware,
                      profile, cache)
