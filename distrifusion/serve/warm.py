"""The service's warm pipelines: built once per (height, width, mode), the most recently used kept.

The model's weights load once per process (`generate.load_pipeline` shares them); each pipeline
here is a parallelized replica whose patch buffers, and on CUDA whose captured graphs, fit one
image size and mode, so a request of a size already seen skips building and capture. At most
`max_warm` stay; the least recently used goes first. Every rank builds and drops the same
pipelines in the same order (building is collective), as every rank serves the same jobs.
"""

from __future__ import annotations

import collections
from typing import Any

from omegaconf import DictConfig, OmegaConf

from backends import Communicator

from ..generate import image_size, parallel_pipeline
from ..parallel_config import ParallelConfig


class WarmPipelines:
    """An LRU cache of this rank's parallelized pipelines, keyed by (height, width, mode)."""

    def __init__(self, comm: Communicator, max_warm: int):
        self.comm, self.max_warm = comm, max_warm
        self._pipes: collections.OrderedDict[tuple, Any] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._pipes)

    def keys(self) -> list[tuple]:
        """The warm (height, width, mode), least recently used first."""
        return list(self._pipes)

    def get(self, cfg: DictConfig) -> Any:
        """Collective on a miss: the pipeline for `cfg`'s image size and `parallel` settings."""
        key = (*image_size(cfg.model), cfg.parallel.mode)
        if key in self._pipes:
            self._pipes.move_to_end(key)
            return self._pipes[key]
        while len(self._pipes) >= self.max_warm:
            self._pipes.popitem(last=False)
        parallel = ParallelConfig(**OmegaConf.to_container(cfg.parallel))
        self._pipes[key] = parallel_pipeline(self.comm, cfg, parallel, progress=False)
        return self._pipes[key]
