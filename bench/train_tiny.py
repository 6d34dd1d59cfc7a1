"""Train the `tiny` pipeline on crops of scikit-image's photographs, and save it for `model.path`.

Random weights carry none of the step-to-step structure DistriFusion relies on, so quality
figures need a trained model; no hub is reachable, but scikit-image's wheel ships images. The
`tiny` architecture (distrifusion/model_configs.py) is trained in two stages, reproducibly (fixed
seed, crops drawn from one seeded generator, one process):

1. its VAE as an autoencoder (L1 + small KL) on 32x32 crops (it is convolutional, and 4x cheaper
   than 64x64): the `tiny` VAE's random latent space decodes to noise, and a latent UNet is only
   as good as its decoder;
2. its UNet on the frozen VAE's scaled latents, epsilon prediction with the pipeline's own noise
   schedule, conditioned on the image's name through the pipeline's (frozen, random-weight) text
   encoders; 10% of prompts are "" so classifier-free guidance has an unconditional branch.

Text encoders stay random: the name's embedding only has to be a fixed, distinct code per class.

    python bench/train_tiny.py --out bench/tiny_trained            # the committed run
"""

from __future__ import annotations

import argparse
import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline

from distrifusion.pipeline_factory import build_pipeline

MODEL = "tiny"
IMAGES: tuple[str, ...] = (
    "brick", "grass", "gravel", "coffee", "chelsea", "astronaut", "hubble_deep_field", "immunohistochemistry",
)
UNCOND_FRACTION = 0.1
KL_WEIGHT = 1e-6


def load_images(names: tuple[str, ...] = IMAGES, downscale: int = 2) -> list[torch.Tensor]:
    """Each named `skimage.data` image as float RGB in [-1, 1], shape (3, H, W), shrunk `downscale`x
    (area average) so a 64-pixel crop holds several bricks, pebbles or blades of grass."""
    import skimage.data

    images = []
    for name in names:
        array = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        image = torch.from_numpy(array[..., :3]).permute(2, 0, 1)[None]
        images.append(F.avg_pool2d(image, downscale)[0] * 2.0 - 1.0)
    return images


@dataclass
class CropSampler:
    """Batches of random `size`-pixel crops (random image, position, horizontal flip), in an order
    fixed by `seed`: returns the crops and the index of the image each came from."""

    images: list[torch.Tensor]
    size: int
    seed: int

    def __post_init__(self) -> None:
        self._rng = np.random.Generator(np.random.PCG64(self.seed))

    def __call__(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = self._rng.integers(len(self.images), size=batch)
        crops = []
        for label in labels:
            image = self.images[label]
            top = self._rng.integers(image.shape[1] - self.size + 1)
            left = self._rng.integers(image.shape[2] - self.size + 1)
            crop = image[:, top : top + self.size, left : left + self.size]
            crops.append(crop.flip(2) if self._rng.random() < 0.5 else crop)
        return torch.stack(crops), torch.from_numpy(labels)


def vae_loss(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """L1 reconstruction plus a small KL term (keeps latents near unit scale, as SD's VAE does)."""
    posterior = vae.encode(pixels).latent_dist
    reconstruction = vae.decode(posterior.sample(generator)).sample
    return F.l1_loss(reconstruction, pixels) + KL_WEIGHT * posterior.kl().mean()


@dataclass
class Conditioning:
    """The UNet's conditioning per class (and "" last): token embeddings, pooled embedding, time ids."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor

    @classmethod
    def of(cls, pipe: DiffusionPipeline, prompts: list[str], pixels: int) -> "Conditioning":
        """Encoded exactly as the pipeline encodes a prompt at `pixels` x `pixels` resolution."""
        with torch.no_grad():
            encoded = [pipe.encode_prompt(p, device="cpu", do_classifier_free_guidance=False) for p in prompts + [""]]
        embeds = torch.cat([e[0] for e in encoded])
        pooled = torch.cat([e[2] for e in encoded])
        time_ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]], dtype=torch.float32)
        return cls(embeds, pooled, time_ids)

    def select(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """UNet keyword arguments for a batch of class `labels` (the last index is the "" prompt)."""
        return {
            "encoder_hidden_states": self.embeds[labels],
            "added_cond_kwargs": {
                "text_embeds": self.pooled[labels],
                "time_ids": self.time_ids.expand(len(labels), -1),
            },
        }


def unet_loss(
    pipe: DiffusionPipeline, cond: Conditioning, pixels: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Epsilon-prediction MSE at uniformly drawn timesteps, on scaled latents of the frozen VAE."""
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
    batch = len(labels)
    drop = torch.rand(batch, generator=generator) < UNCOND_FRACTION
    labels = torch.where(drop, torch.full_like(labels, len(cond.embeds) - 1), labels)
    noise = torch.randn(latents.shape, generator=generator)
    steps = torch.randint(pipe.scheduler.config.num_train_timesteps, (batch,), generator=generator)
    noisy = pipe.scheduler.add_noise(latents, noise, steps)
    prediction = pipe.unet(noisy, steps, **cond.select(labels)).sample
    return F.mse_loss(prediction, noise)


def optimise(
    module: torch.nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    steps: int,
    lr: float,
    log: Callable[[int, float], None],
) -> list[float]:
    """AdamW on `module` for `steps` steps (linear warm-up over the first 5%); the losses, in order."""
    module.train().requires_grad_(True)
    optimiser = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda i: min(1.0, (i + 1) / warmup))
    losses = []
    for step in range(steps):
        loss = loss_fn()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        log(step, losses[-1])
    module.eval().requires_grad_(False)
    return losses


def latent_scale(vae: AutoencoderKL, sampler: CropSampler, batch: int, generator: torch.Generator) -> float:
    """1 / std of the VAE's latents on one batch of crops: the pipeline's `scaling_factor`."""
    with torch.no_grad():
        return 1.0 / vae.encode(sampler(batch)[0]).latent_dist.sample(generator).std().item()


def train(
    vae_steps: int,
    unet_steps: int,
    batch: int,
    size: int,
    vae_size: int,
    seed: int,
    log_path: Path | None = None,
    log_every: int = 10,
) -> tuple[DiffusionPipeline, dict[str, list[float]]]:
    """The `tiny` pipeline (random weights of `seed`) with its VAE trained on `vae_size` crops,
    then its UNet on `size` crops; the losses of every step of each stage."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    pipe = build_pipeline(MODEL, seed=seed)
    for module in (pipe.vae, pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    images = load_images()
    vae_sampler, sampler = CropSampler(images, vae_size, seed), CropSampler(images, size, seed + 1)
    cond = Conditioning.of(pipe, list(IMAGES), size)
    rows: list[tuple[str, int, float, float]] = []
    start = time.perf_counter()

    def logger(stage: str) -> Callable[[int, float], None]:
        def log(step: int, loss: float) -> None:
            if step % log_every == 0 or step + 1 in (vae_steps, unet_steps):
                rows.append((stage, step, loss, time.perf_counter() - start))
                print(f"{stage} step {step:5d} loss {loss:.4f} {rows[-1][3]:7.1f} s", flush=True)

        return log

    losses = {"vae": optimise(
        pipe.vae, lambda: vae_loss(pipe.vae, vae_sampler(batch)[0], generator), vae_steps, 1e-3, logger("vae")
    )}
    pipe.vae.register_to_config(scaling_factor=latent_scale(pipe.vae, sampler, 64, generator))
    losses["unet"] = optimise(
        pipe.unet, lambda: unet_loss(pipe, cond, *sampler(batch), generator), unet_steps, 5e-4, logger("unet")
    )
    if log_path is not None:
        with log_path.open("w", newline="") as f:
            csv.writer(f).writerows([("stage", "step", "loss", "seconds"), *rows])
    return pipe, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="diffusers pipeline directory to write")
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="crop size in pixels (the model's resolution)")
    parser.add_argument("--vae-size", type=int, default=32, help="crop size in pixels for the VAE stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipe, losses = train(
        args.vae_steps, args.unet_steps, args.batch, args.size, args.vae_size, args.seed,
        log_path=args.out / "train_log.csv",
    )
    pipe.save_pretrained(args.out, safe_serialization=True)
    last = min(100, len(losses["unet"]))
    print(f"trained in {time.perf_counter() - start:.0f} s; mean UNet loss of the last {last} steps "
          f"{np.mean(losses['unet'][-last:]):.4f}; VAE L1 {np.mean(losses['vae'][-last:]):.4f}")


if __name__ == "__main__":
    main()
