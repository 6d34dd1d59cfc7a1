"""Hydra callback of `python -m simulator -m ...`: a sweep's CSV starts empty and ends plotted."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("simulator")
DEFAULT_CSV = "results.csv"


def sweep_csv(config: DictConfig, sweep_dir: str | Path) -> Path:
    """The CSV rows of this sweep go to: `out_csv`, else `<sweep dir>/results.csv`."""
    return Path(config.out_csv) if config.out_csv else Path(sweep_dir) / DEFAULT_CSV


class PlotSweep(Callback):
    """Clears the sweep dir's default CSV when a multirun starts; plots it when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.out_csv:
            sweep_csv(config, config.hydra.sweep.dir).unlink(missing_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = sweep_csv(config, config.hydra.sweep.dir)
        if not path.is_file():
            log.warning("no sweep results at %s to plot", path)
            return
        from .plot import plot_sweep  # matplotlib: only when a sweep ends

        png = plot_sweep(path, path.with_suffix(".png"))
        log.info("sweep results: %s, plot: %s", path, png)
