"""Structured (dataclass) configs of the `python -m distrifusion` app, validated by Hydra.

The YAML files under `conf/` pick values; these classes say which keys exist, their types and
their defaults, so a misspelt key or a bad value fails at start-up with the allowed choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from .parallel_config import ParallelConfig


class Choice(str, Enum):
    """One of a key's allowed strings; it prints, and interpolates (`${model.dtype}`), as itself."""

    def __str__(self) -> str:
        return self.value


class Task(Choice):
    generate = "generate"
    quality = "quality"
    allgather_demo = "allgather_demo"
    serve = "serve"


class Dtype(Choice):
    float32 = "float32"
    float64 = "float64"  # a reference for rounding studies (quality), on CPU
    float16 = "float16"
    bfloat16 = "bfloat16"


@dataclass
class BackendConfig:
    """Which Communicator to build and its options (see `backends.create`)."""

    name: str = "fake"
    timeout: float = 60.0
    validate: bool = True
    device: Optional[str] = None


@dataclass
class ModelConfig:
    """Which model: an architecture of `distrifusion.model_configs`, random weights unless
    `path` names a local diffusers directory; `height`/`width` default to the model's own."""

    name: str = "tiny"
    path: Optional[str] = None
    dtype: Dtype = Dtype.float32
    height: Optional[int] = None
    width: Optional[int] = None
    weights_seed: int = 0


@dataclass
class SamplerConfig:
    """The diffusers scheduler (`ddim`, `euler`), step count and guidance scale."""

    name: str = "ddim"
    steps: int = 20
    guidance_scale: float = 5.0


@dataclass
class QualityConfig:
    """The quality study: per seed, `none` against the `baselines`, `displaced` at each of the
    `warmups` (with parallel.groupnorm) and with each of the `groupnorms` (at parallel.warmup_steps),
    and `displaced` (at both) sending each of the `compressions` (parallel.compress) with each of
    the `deltas` (parallel.delta); the grid shows the first `grid_seeds` seeds, differences
    multiplied by `amplify`."""

    seeds: list[int] = field(default_factory=lambda: [0, 1])
    baselines: list[str] = field(default_factory=lambda: ["sync_patch", "naive_patch"])
    warmups: list[int] = field(default_factory=lambda: [1, 2, 4])
    groupnorms: list[str] = field(default_factory=lambda: ["separate", "stale", "corrected", "sync"])
    compressions: list[str] = field(default_factory=lambda: ["fp8", "int8"])
    deltas: list[bool] = field(default_factory=lambda: [False])
    grid_seeds: int = 4
    amplify: float = 8.0


@dataclass
class DemoConfig:
    """The all-gather demo: `mib` MiB of float32 per rank, timed over `repeats` runs."""

    mib: float = 64.0
    repeats: int = 5


@dataclass
class ServeConfig:
    """The image service (task=serve): rank 0 listens on `host`:`port` (0: any free port, printed);
    requests may ask for the `resolutions` listed ([height, width]; empty: the model's own) and at
    most `max_steps` steps; at most `queue_size` wait; the pipelines of the `max_warm` most recently
    used (height, width, mode) stay built, with their CUDA graphs; `prewarm` resolutions are
    generated once at start; after a rank fails, rank 0 answers 503 for `linger_s` seconds, then exits."""

    host: str = "127.0.0.1"
    port: int = 8000
    resolutions: list[list[int]] = field(default_factory=list)
    max_steps: int = 100
    queue_size: int = 64
    max_warm: int = 4
    prewarm: list[list[int]] = field(default_factory=list)
    linger_s: float = 2.0


@dataclass
class Config:
    backend: BackendConfig = field(default_factory=BackendConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    task: Task = Task.generate
    prompt: str = "a watercolor painting of a lighthouse at dawn"
    world_size: Optional[int] = None
    output_dir: str = "outputs"
    seed: int = 0
    save_latents: bool = False
    warmup_runs: int = 0  # task=generate: untimed generations first, so the report times a warm one


FAKE_RANKS = 2


def known_world_size(cfg: Any) -> Optional[int]:
    """The number of ranks, known before any starts for fake ranks (default 2); None under a
    launcher (torchrun, mpiexec), whose count the backend checks against `world_size`."""
    if cfg.backend.name != "fake":
        return None
    return FAKE_RANKS if cfg.world_size is None else cfg.world_size


def backend_options(cfg: Any) -> dict:
    """Keyword options for `backends.launch` from the config."""
    if cfg.backend.name == "fake":
        return {"timeout": cfg.backend.timeout, "world_size": known_world_size(cfg)}
    options: dict = {"timeout": cfg.backend.timeout, "world_size": cfg.world_size, "validate": cfg.backend.validate}
    if cfg.backend.device is not None:
        options["device"] = cfg.backend.device
    return options


def register() -> None:
    """Register the schema with Hydra's ConfigStore (the YAML defaults list names it)."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
