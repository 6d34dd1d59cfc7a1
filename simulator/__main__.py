"""`python -m simulator [key=value ...]`: predict DistriFusion's latency and speedup.

    python -m simulator model=sdxl resolution=3840 world_size=8 hardware=a100_sxm_nvlink \\
        parallel=displaced steps=50 [parallel.warmup_steps=2] [model.dtype=bfloat16]
    python -m simulator -m world_size=1,2,4,8 resolution=1024,2048 hardware=a100_sxm_nvlink,a100_pcie

Prints a short table and, as its last line, one JSON object (see `Prediction.summary`).
Options are in `simulator/config.py`; traces are recorded once and cached.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .callbacks import sweep_csv
from .compute_model import CalibrationProfile
from .config import model_dtype, parallel_options, register
from .hardware import hardware_from_dict
from .predict import Prediction, predict

log = logging.getLogger("simulator")
register()


def table(p: Prediction) -> str:
    """The parallel run and the single-device baseline side by side."""
    s = p.setup
    lines = [f"{s['model']} {s['resolution']}px, {s['steps']} steps, {s['dtype']} on {s['hardware']}",
             f"{'':<22}{'latency':>10}{'compute':>10}{'comm':>10}{'exposed':>10}{'sent/device':>14}"]
    for name, r in ((f"{s['world_size']} x {s['parallel']}", p.result), ("1 device", p.baseline)):
        lines.append(f"{name:<22}{r.latency_s:>9.3f}s{r.compute_s:>9.3f}s{r.comm_s:>9.3f}s"
                     f"{r.comm_exposed_s:>9.3f}s{r.comm_bytes_per_device / 2**20:>10.1f} MiB")
    lines.append(f"speedup {p.speedup:.2f}x")
    return "\n".join(lines)


def default_resolution(model: str) -> int:
    """The model's native resolution (imports the model specs, hence diffusers)."""
    from distrifusion.model_configs import get_spec

    return get_spec(model).resolution


def run(cfg: DictConfig) -> Prediction:
    """Predict the configured run; write its CSV row and timeline where asked."""
    hardware = hardware_from_dict(OmegaConf.to_container(cfg.hardware, resolve=True))
    profile = CalibrationProfile.load(cfg.calibration) if cfg.calibration else None
    resolution = cfg.resolution or default_resolution(cfg.model.name)
    options = parallel_options(cfg.parallel)
    mode = options.pop("mode")
    prediction = predict(cfg.model.name, resolution, cfg.world_size, mode, hardware, cfg.steps, cfg=cfg.cfg,
                         dtype=model_dtype(cfg.model), profile=profile, cache_dir=cfg.trace_cache, **options)
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    csv_path = sweep_csv(cfg, hydra_cfg.sweep.dir) if multirun or cfg.out_csv else None
    if csv_path is not None:
        from .sweep import append_row

        append_row(csv_path, prediction.row())
    if cfg.timeline:
        write_timeline(prediction, cfg, hardware, profile, Path(hydra_cfg.runtime.output_dir))
    return prediction


def write_timeline(prediction: Prediction, cfg: DictConfig, hardware, profile, out_dir: Path) -> Path:
    """Chrome trace of the first `timeline_steps` steps (0: all): the run re-simulated that far."""
    from .chrome_trace import write_chrome_trace
    from .engine import simulate

    steps = min(cfg.timeline_steps, cfg.steps) if cfg.timeline_steps > 0 else cfg.steps
    spans = simulate(prediction.trace, hardware, steps, profile, timeline=True).spans
    s = prediction.setup
    path = out_dir / f"timeline_{s['model']}_{s['resolution']}_{s['world_size']}x{s['hardware']}_{s['parallel']}.json"
    write_chrome_trace(spans, path, {**s, "timeline_steps": steps})
    log.info("timeline of %d steps: %s", steps, path)
    return path


@hydra.main(config_path="../conf", config_name="simulate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Entry point: print the table, then the JSON summary as the last line."""
    prediction = run(cfg)
    print(table(prediction))
    print(json.dumps(prediction.summary()))


if __name__ == "__main__":
    main()
