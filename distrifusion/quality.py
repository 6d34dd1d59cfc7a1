"""The `quality` task: how far patch-parallel images are from the single-device ones.

For each seed it generates under `none` (the reference), `naive_patch` and `displaced` with
each warm-up count, and reports the PSNR of the image and the relative error of the final
latents against the reference (and LPIPS when the `lpips` package is installed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from backends import Communicator

from .generate import run_generation
from .parallel_config import ParallelConfig


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    mse = torch.mean((image.float() - reference.float()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return (torch.linalg.vector_norm((x - reference).float()) / torch.linalg.vector_norm(reference.float())).item()


def _lpips():
    try:
        import lpips
    except ImportError:
        return None
    return lpips.LPIPS(net="alex", verbose=False)


def variants(cfg: DictConfig) -> list[tuple[str, ParallelConfig]]:
    base = OmegaConf.to_container(cfg.parallel)
    found = [("naive_patch", ParallelConfig(**{**base, "mode": "naive_patch"}))]
    for w in cfg.quality.warmups:
        found.append((f"displaced (warm-up {w})", ParallelConfig(**{**base, "mode": "displaced", "warmup_steps": w})))
    return found


def quality(comm: Communicator, cfg: DictConfig) -> list[dict]:
    """Run the study; rank 0 prints the table and writes `quality.json`."""
    metric = _lpips() if comm.rank == 0 else None
    rows = []
    for seed in cfg.quality.seeds:
        ref = run_generation(comm, cfg, ParallelConfig(mode="none"), seed)
        for name, parallel in variants(cfg):
            got = run_generation(comm, cfg, parallel, seed)
            row = {"seed": seed, "variant": name, "psnr_db": psnr(got["image"], ref["image"]),
                   "latent_rel_err": relative_error(got["latents"], ref["latents"])}
            if metric is not None:
                row["lpips"] = metric(got["image"].float().cpu() * 2 - 1, ref["image"].float().cpu() * 2 - 1).item()
            rows.append(row)
    if comm.rank == 0:
        summary = _summarise(rows)
        print(f"quality vs none: {cfg.model.name}, {cfg.sampler.steps} steps, {comm.world_size} ranks, "
              f"seeds {list(cfg.quality.seeds)}")
        print(f"{'variant':<24}{'PSNR dB':>9}{'latent rel err':>16}")
        for name, r in summary.items():
            print(f"{name:<24}{r['psnr_db']:>9.2f}{r['latent_rel_err']:>16.2e}")
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality.json").write_text(json.dumps({"config": OmegaConf.to_container(cfg), "rows": rows,
                                                      "mean": summary}, indent=1, default=str))
        print(json.dumps(summary))
    return rows


def _summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean of every metric per variant, over the seeds."""
    summary: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        keys = [k for k in mine[0] if k not in ("seed", "variant")]
        summary[name] = {k: sum(r[k] for r in mine) / len(mine) for k in keys}
    return summary
