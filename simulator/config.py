"""Structured config of `python -m simulator` (`conf/simulate.yaml`), validated by Hydra.

Three config groups fill it: `hardware` (`conf/hardware/<name>.yaml`, checked by
`simulator.hardware.hardware_from_dict` against the `Hardware` dataclass), and `model` and
`parallel`, shared with the generation app. An unknown option of any group lists the
available ones; a bad key or value names the allowed ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Parallel(str, Enum):
    """How the model runs over the devices (`distrifusion.ParallelConfig.mode`)."""

    none = "none"
    naive_patch = "naive_patch"
    sync_patch = "sync_patch"
    displaced = "displaced"


class Task(str, Enum):
    """What `python -m simulator` does: predict one configuration, or advise on the fastest."""

    predict = "predict"
    advise = "advise"


class Vae(str, Enum):
    """How the image is decoded in a patch mode (`distrifusion.ParallelConfig.vae`)."""

    patch = "patch"
    none = "none"


class Compress(str, Enum):
    """How displaced steps send K/V and halo rows (`distrifusion.ParallelConfig.compress`)."""

    none = "none"
    fp8 = "fp8"
    int8 = "int8"


class GroupNorm(str, Enum):
    separate = "separate"
    stale = "stale"
    corrected = "corrected"
    sync = "sync"


class Graphs(str, Enum):
    """Which denoising steps replay CUDA graphs (`simulator.engine.GRAPHS`)."""

    cold = "cold"
    warm = "warm"
    all = "all"
    none = "none"


class DType(str, Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


@dataclass
class SimulateConfig:
    """One prediction: `model.name` at `resolution` px on `world_size` devices of `hardware`.

    model: the `model` group (`conf/model/*.yaml`, shared with `python -m distrifusion`); the
        simulator reads `name` and `dtype` (its own default: float16) and ignores the rest.
    parallel: the `parallel` group (`conf/parallel/*.yaml`, shared too); the simulator reads
        `mode`, `warmup_steps`, `groupnorm`, `split_cfg`, `vae`, `vae_chunk_mib`, `compress` and
        `delta` (see `parallel_options`).
    resolution: image height and width (null: the model's default).
    cfg: classifier-free guidance, i.e. a batch of 2 per denoiser call (null: as the model's
        pipeline runs, on for all but the guidance-distilled Flux).
    calibration: a `CalibrationProfile` JSON replacing roofline op times where it measured.
    trace_cache: directory of cached traces (null: ~/.cache/distrifusion/traces).
    timeline: write a Chrome trace of the first `timeline_steps` steps (0: all) to the run dir.
    out_csv: append the result row to this CSV; null: in a multirun, `<sweep dir>/results.csv`
        (a PNG of speedup, latency and exposed communication vs devices is drawn from it when
        the sweep ends), else nowhere.
    graphs: which steps replay CUDA graphs: `cold` (a process's first generation: warm-up and the
        first two steady steps eager), `warm` (a later one: graphs captured, warm-up steps still
        eager), `all`, `none` (`simulator.engine._graph_schedule`).
    task: `predict` this configuration, or `advise` (`simulator/advise.py`): try every device
        count up to `max_devices` (null: the preset's), split CFG on and off, the modes and
        warm-up counts, and print the `top` fastest; `world_size` and `parallel.mode` are then
        ignored. `python -m simulator advise ...` is short for `task=advise`.
    """

    model: Any = MISSING
    parallel: Any = MISSING
    hardware: Any = MISSING
    resolution: Optional[int] = None
    world_size: int = 8
    steps: int = 50
    cfg: Optional[bool] = None
    calibration: Optional[str] = None
    trace_cache: Optional[str] = None
    timeline: bool = False
    timeline_steps: int = 6
    out_csv: Optional[str] = None
    graphs: Graphs = Graphs.cold
    task: Task = Task.predict
    max_devices: Optional[int] = None
    top: int = 10


def _choice(enum: type[Enum], where: str, value: Any) -> str:
    try:
        return enum(value).value
    except ValueError:
        raise ValueError(f"{where} must be one of {[e.value for e in enum]}, got {value!r}") from None


def parallel_options(parallel: Any) -> dict[str, Any]:
    """mode, warmup_steps, groupnorm, split_cfg, vae, vae_chunk_mib, compress, delta of the
    `parallel` node (defaulting as `distrifusion.ParallelConfig`), checked; other keys (the
    generation app's, e.g. `cuda_graph`) do not change the recorded work and are ignored."""
    warmup = parallel.get("warmup_steps", 4)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"parallel.warmup_steps must be an integer >= 0, got {warmup!r}")
    split_cfg = parallel.get("split_cfg", True)
    if not isinstance(split_cfg, bool):
        raise ValueError(f"parallel.split_cfg must be true or false, got {split_cfg!r}")
    chunk = parallel.get("vae_chunk_mib", 256)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"parallel.vae_chunk_mib must be an integer >= 0, got {chunk!r}")
    compress = _choice(Compress, "parallel.compress", parallel.get("compress", "none"))
    delta = parallel.get("delta", False)
    if not isinstance(delta, bool):
        raise ValueError(f"parallel.delta must be true or false, got {delta!r}")
    if delta and compress == "none":
        raise ValueError("parallel.delta=true needs parallel.compress=fp8 or int8 (uncompressed values are exact)")
    return {"mode": _choice(Parallel, "parallel.mode", parallel.get("mode")), "warmup_steps": warmup,
            "groupnorm": _choice(GroupNorm, "parallel.groupnorm", parallel.get("groupnorm", "corrected")),
            "split_cfg": split_cfg, "vae": _choice(Vae, "parallel.vae", parallel.get("vae", "patch")),
            "vae_chunk_mib": chunk, "compress": compress, "delta": delta}


def model_dtype(model: Any) -> str:
    """`model.dtype`, checked against `DType`."""
    return _choice(DType, "model.dtype", model.get("dtype"))


def register() -> None:
    """Register the schema with Hydra's ConfigStore (`conf/simulate.yaml` names it)."""
    ConfigStore.instance().store(name="simulate_schema", node=SimulateConfig)
