"""`python -m simulator [advise] [key=value ...]`: predict DistriFusion's latency and speedup.

    python -m simulator model=sdxl resolution=3840 world_size=8 hardware=a100_sxm_nvlink \\
        parallel=displaced steps=50 [parallel.warmup_steps=2] [model.dtype=bfloat16] [graphs=warm] \\
        [parallel.compress=int8] [parallel.delta=true]
    python -m simulator model=flux_dev resolution=2048 world_size=8 hardware=h100_pcie steps=28 \\
        model.dtype=bfloat16      # a diffusion transformer (pixart_sigma, sd3_medium, flux_dev); cfg follows the model
    python -m simulator -m world_size=1,2,4,8 resolution=1024,2048 hardware=a100_sxm_nvlink,a100_pcie
    python -m simulator advise model=sdxl resolution=2048 hardware=a100_pcie max_devices=8

The first prints a short table and, as its last line, one JSON object (`Prediction.summary`:
latency_s, speedup, rank_compute_ms_per_step, step_ms, comm_hidden_fraction,
peak_memory_gib_per_rank, the latency's parts, ...). The multirun writes a CSV row per run and
plots it when it ends. `advise` (`simulator/advise.py`) ranks every device count, split CFG
choice, mode and warm-up, and ends with one JSON line too. Options are in
`simulator/config.py`; traces are recorded once and cached.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .callbacks import sweep_csv
from .compute_model import CalibrationProfile
from .config import Task, model_dtype, parallel_options, register
from .hardware import Hardware, hardware_from_dict
from .predict import Prediction, predict

log = logging.getLogger("simulator")
register()


def table(p: Prediction) -> str:
    """The parallel run and the single-device baseline side by side, then the latency's parts."""
    s, summary = p.setup, p.summary()
    lines = [f"{s['model']} {s['resolution']}px, {s['steps']} steps, {s['dtype']} on {s['hardware']}",
             f"{'':<22}{'latency':>10}{'denoiser':>10}{'compute':>10}{'comm':>10}{'exposed':>10}{'sent/device':>14}"]
    sent = "" if s["compress"] == "none" else f" +{s['compress']}" + (" +delta" if s["delta"] else "")
    for name, r, total in ((f"{s['world_size']} x {s['parallel']}{sent}", p.result, p.latency_s),
                           ("1 device", p.baseline, p.baseline_latency_s)):
        lines.append(f"{name:<22}{total:>9.3f}s{r.latency_s:>9.3f}s{r.compute_s:>9.3f}s{r.comm_s:>9.3f}s"
                     f"{r.comm_exposed_s:>9.3f}s{r.comm_bytes_per_device / 2**20:>10.1f} MiB")
    step = "-" if summary["step_ms"] is None else f"{summary['step_ms']:.1f} ms"
    lines.append(f"speedup {p.speedup:.2f}x (denoising loop {summary['unet_speedup']:.2f}x, compute-only ceiling "
                 f"{summary['ceiling_speedup']:.2f}x); text encoders "
                 f"{summary['text_encoders_s']:.3f}s, scheduler {summary['scheduler_s']:.3f}s, "
                 f"VAE decode {summary['vae_decode_s']:.3f}s ({summary['vae_decode']})")
    lines.append(f"steady step {step} ({summary['rank_compute_ms_per_step']:.1f} ms of compute per rank, "
                 f"{summary['comm_hidden_fraction']:.0%} of comm hidden); peak memory "
                 f"{summary['peak_memory_gib_per_rank']:.2f} GiB per rank ({summary['peak_memory_phase']})")
    return "\n".join(lines)


def default_resolution(model: str) -> int:
    """The model's native resolution (imports the model specs, hence diffusers)."""
    from distrifusion.model_configs import get_spec

    return get_spec(model).resolution


def guidance(cfg: DictConfig) -> bool:
    """`cfg.cfg`, or where null whether the model's pipeline runs classifier-free guidance
    (Flux-dev does not: its guidance is an embedding)."""
    if cfg.cfg is not None:
        return cfg.cfg
    from distrifusion.model_configs import get_spec

    return get_spec(cfg.model.name).classifier_free_guidance


def run(cfg: DictConfig) -> Prediction:
    """Predict the configured run; write its CSV row and timeline where asked."""
    hardware, profile, resolution = setting(cfg)
    options = parallel_options(cfg.parallel)
    mode = options.pop("mode")
    prediction = predict(cfg.model.name, resolution, cfg.world_size, mode, hardware, cfg.steps, cfg=guidance(cfg),
                         dtype=model_dtype(cfg.model), profile=profile, cache_dir=cfg.trace_cache,
                         graphs=cfg.graphs.value, **options)
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    csv_path = sweep_csv(cfg, hydra_cfg.sweep.dir) if multirun or cfg.out_csv else None
    if csv_path is not None:
        from .sweep import append_row

        append_row(csv_path, prediction.row())
    if cfg.timeline:
        write_timeline(prediction, cfg, hardware, profile, Path(hydra_cfg.runtime.output_dir))
    return prediction


def setting(cfg: DictConfig) -> tuple[Hardware, CalibrationProfile | None, int]:
    """The hardware preset, calibration profile and resolution the config names."""
    hardware = hardware_from_dict(OmegaConf.to_container(cfg.hardware, resolve=True))
    profile = CalibrationProfile.load(cfg.calibration) if cfg.calibration else None
    return hardware, profile, cfg.resolution or default_resolution(cfg.model.name)


def run_advise(cfg: DictConfig) -> dict:
    """`task=advise`: rank the configurations up to `max_devices` (see `simulator.advise`)."""
    from .advise import advise

    hardware, profile, resolution = setting(cfg)
    options = parallel_options(cfg.parallel)
    return advise(cfg.model.name, resolution, hardware, cfg.max_devices or hardware.num_devices, cfg.steps,
                  cfg=guidance(cfg), dtype=model_dtype(cfg.model), groupnorm=options["groupnorm"], profile=profile,
                  cache_dir=cfg.trace_cache, graphs=cfg.graphs.value, vae=options["vae"],
                  vae_chunk_mib=options["vae_chunk_mib"], compress=options["compress"], delta=options["delta"])


def write_timeline(prediction: Prediction, cfg: DictConfig, hardware, profile, out_dir: Path) -> Path:
    """Chrome trace of the first `timeline_steps` steps (0: all): the run re-simulated that far."""
    from .chrome_trace import write_chrome_trace
    from .engine import simulate

    steps = min(cfg.timeline_steps, cfg.steps) if cfg.timeline_steps > 0 else cfg.steps
    spans = simulate(prediction.trace, hardware, steps, profile, timeline=True, graphs=cfg.graphs.value).spans
    s = prediction.setup
    path = out_dir / f"timeline_{s['model']}_{s['resolution']}_{s['world_size']}x{s['hardware']}_{s['parallel']}.json"
    write_chrome_trace(spans, path, {**s, "timeline_steps": steps})
    log.info("timeline of %d steps: %s", steps, path)
    return path


@hydra.main(config_path="../conf", config_name="simulate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Entry point: print the table, then the JSON summary as the last line."""
    if cfg.task == Task.advise:
        from .advise import render

        advice = run_advise(cfg)
        print(render(advice, cfg.top))
        print(json.dumps(advice))
        return
    prediction = run(cfg)
    print(table(prediction))
    print(json.dumps(prediction.summary()))


def subcommand(argv: list[str]) -> list[str]:
    """`advise ...` (or `predict ...`) as the first argument becomes the override `task=advise`."""
    if len(argv) > 1 and argv[1] in {t.value for t in Task}:
        return [argv[0], f"task={argv[1]}", *argv[2:]]
    return argv


if __name__ == "__main__":
    sys.argv = subcommand(sys.argv)
    main()
