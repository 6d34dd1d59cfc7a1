"""One prediction: the patch-parallel run and its single-device baseline, through one path.

Both come from recorded (cached) traces replayed by `simulate` on the same hardware; the
baseline is the same model on one device in mode "none".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .compute_model import CalibrationProfile
from .engine import SimResult, simulate
from .hardware import Hardware
from .workload import load_or_record


@dataclass
class Prediction:
    """The parallel run's result, the baseline's, and the setup that produced them."""

    result: SimResult
    baseline: SimResult
    setup: dict[str, Any]
    trace: dict

    @property
    def speedup(self) -> float:
        return self.baseline.latency_s / self.result.latency_s

    def summary(self) -> dict[str, Any]:
        """The figures `python -m simulator` prints as its JSON line."""
        r = self.result
        return {**self.setup, "latency_s": r.latency_s, "single_device_latency_s": self.baseline.latency_s,
                "speedup": self.speedup, "compute_s": r.compute_s, "comm_s": r.comm_s,
                "comm_exposed_s": r.comm_exposed_s, "comm_bytes_per_device": r.comm_bytes_per_device}

    def row(self) -> dict[str, Any]:
        """A sweep CSV row: `SimResult.to_row()` plus parallel, baseline latency and speedup."""
        return {**self.result.to_row(), "parallel": self.setup["parallel"],
                "single_device_latency_s": self.baseline.latency_s, "speedup": self.speedup}


def predict(model: str, resolution: int, world_size: int, parallel: str, hardware: Hardware, steps: int,
            warmup_steps: int = 4, groupnorm: str = "corrected", split_cfg: bool = True, cfg: bool = True,
            dtype: str = "float16", profile: CalibrationProfile | None = None,
            cache_dir: str | Path | None = None) -> Prediction:
    """Simulate `model` on `world_size` devices of `hardware` in mode `parallel` and on one device."""
    common = {"warmup_steps": warmup_steps, "groupnorm": groupnorm, "split_cfg": split_cfg, "cfg": cfg,
              "dtype": dtype, "cache_dir": cache_dir}
    trace = load_or_record(model, resolution, world_size, parallel, **common)
    single = load_or_record(model, resolution, 1, "none", **common)
    setup = {"model": model, "resolution": resolution, "world_size": world_size, "hardware": hardware.name,
             "parallel": parallel, "steps": steps, "dtype": dtype}
    return Prediction(simulate(trace, hardware, steps, profile), simulate(single, hardware, steps, profile),
                      setup, trace)
