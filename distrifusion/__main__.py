"""`python -m distrifusion`: the Hydra app, unchanged under torchrun, mpiexec or in-process ranks.

Every rank runs the same task; only rank 0 prints the summary and writes files.
"""

from __future__ import annotations

import json
import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

import backends
from backends import Communicator

from .config import Task, backend_options, known_world_size, register
from .demo import allgather_demo
from .generate import generate
from .preflight import ConfigError, check_ranks, check_request
from .quality import quality

log = logging.getLogger("distrifusion")
register()


def run_rank(comm: Communicator, cfg: DictConfig) -> dict:
    """What one rank does for `cfg.task`; rank 0 reports."""
    if comm.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    check_ranks(comm, cfg)
    if cfg.task == Task.generate:
        return generate(comm, cfg)
    if cfg.task == Task.quality:
        return quality(comm, cfg)
    if cfg.task == Task.serve:
        from .serve.service import serve  # FastAPI and uvicorn: the `serve` extra

        return serve(comm, cfg)
    if cfg.task == Task.allgather_demo:
        result = allgather_demo(comm, cfg.demo.mib, cfg.demo.repeats)
        if comm.rank == 0:
            print(f"backend={cfg.backend.name}: {comm.world_size} ranks each all-gathered "
                  f"{result['mib_per_rank']:g} MiB of float32 into {result['out_shape']} in "
                  f"{result['median_s'] * 1e3:.1f} ms (median of {cfg.demo.repeats}); "
                  f"contents {'verified' if result['verified'] else 'WRONG'}")
            print(json.dumps(result))
        if not result["verified"]:
            raise RuntimeError(f"rank {comm.rank}: all-gather returned wrong data")
        return result
    raise ValueError(f"unknown task {cfg.task}")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Entry point: build this process's communicator(s) and run the task on each rank."""
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    world_size = known_world_size(cfg)
    try:
        if world_size is not None:  # fake ranks fail before any starts; launched ones in check_ranks
            check_request(cfg, world_size)
        backends.launch(cfg.backend.name, lambda comm: run_rank(comm, cfg), **backend_options(cfg))
    except ConfigError as e:
        sys.exit(f"distrifusion: {e}")


if __name__ == "__main__":
    main()
