"""Structured (dataclass) configs of the `python -m distrifusion` app, validated by Hydra.

The YAML files under `conf/` pick values; these classes say which keys exist, their types and
their defaults, so a misspelt key or a bad value fails at start-up with the allowed choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


class Task(str, Enum):
    allgather_demo = "allgather_demo"


@dataclass
class BackendConfig:
    """Which Communicator to build and its options (see `backends.create`)."""

    name: str = "fake"
    timeout: float = 60.0
    validate: bool = True
    device: Optional[str] = None


@dataclass
class DemoConfig:
    """The all-gather demo: `mib` MiB of float32 per rank, timed over `repeats` runs."""

    mib: float = 64.0
    repeats: int = 5


@dataclass
class Config:
    backend: BackendConfig = field(default_factory=BackendConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    task: Task = Task.allgather_demo
    world_size: Optional[int] = None
    output_dir: str = "outputs"
    seed: int = 0


def backend_options(cfg: Any, default_world_size: int = 2) -> dict:
    """Keyword options for `backends.launch` from the config (fake ranks default to 2)."""
    options: dict = {"timeout": cfg.backend.timeout}
    if cfg.backend.name == "fake":
        options["world_size"] = cfg.world_size or default_world_size
        return options
    options["world_size"] = cfg.world_size
    options["validate"] = cfg.backend.validate
    if cfg.backend.device is not None:
        options["device"] = cfg.backend.device
    return options


def register() -> None:
    """Register the schema with Hydra's ConfigStore (the YAML defaults list names it)."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
