"""bench/train_tiny.py: its losses fall on a short run, and the committed trained pipeline loads."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import train_tiny  # noqa: E402

sys.path.pop(0)

from distrifusion.model_configs import get_spec  # noqa: E402
from distrifusion.pipeline_factory import build_pipeline  # noqa: E402

TRAINED = ROOT / "bench" / "tiny_trained"


def _falls(losses: list[float]) -> tuple[float, float]:
    """(drop of the mean loss from the first to the last third, 3 standard errors of that drop):
    the drop counts only above the noise that random crops and timesteps put on each step's loss."""
    k = len(losses) // 3
    first, last = np.array(losses[:k]), np.array(losses[-k:])
    return first.mean() - last.mean(), 3.0 * math.sqrt((first.var(ddof=1) + last.var(ddof=1)) / k)


def test_short_run_losses_are_finite_and_fall() -> None:
    pipe, losses = train_tiny.train(vae_steps=60, unet_steps=60, batch=8, size=16, vae_size=16, seed=0)
    for stage in ("vae", "unet"):
        assert all(math.isfinite(x) for x in losses[stage]), stage
        drop, noise = _falls(losses[stage])
        assert drop > noise, f"{stage}: mean loss fell {drop:.4f}, noise {noise:.4f}"
    assert math.isfinite(pipe.vae.config.scaling_factor) and pipe.vae.config.scaling_factor > 0


def test_crop_order_is_fixed_by_seed() -> None:
    images = train_tiny.load_images(("brick", "coffee"))
    a, b = train_tiny.CropSampler(images, 8, 3)(5), train_tiny.CropSampler(images, 8, 3)(5)
    c = train_tiny.CropSampler(images, 8, 4)(5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_committed_pipeline_loads_and_denoises() -> None:
    pipe = build_pipeline("tiny", path=str(TRAINED))
    assert dict(pipe.unet.config)["block_out_channels"] == get_spec("tiny").unet["block_out_channels"]
    assert pipe.vae.config.scaling_factor != get_spec("tiny").vae["scaling_factor"]  # set by training
    image = pipe("brick", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
