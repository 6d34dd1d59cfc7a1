"""The diffusion transformers (tiny PixArt, SD3, Flux) in the app: launched generations on gloo and
MPI, the CUDA dtype rules on the whole generation, local weights, the initial noise, bad sizes."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from backends import launch
from distrifusion.generate import generate, initial_noise, parallel_pipeline, sample
from distrifusion.parallel_config import ParallelConfig
from distrifusion.pipeline_factory import build_pipeline
from distrifusion.preflight import ConfigError, check_request
from dit_app_worker import DITS
from launchers import backend_of, library_of, run_ranks
from strict_dtypes import StrictDtypes
from test_bad_input import config

WORKER = Path(__file__).resolve().parent / "dit_app_worker.py"
# 2 row patches for every model (Flux has no CFG batch; the others keep theirs together)
GENERATION = ("parallel=displaced", "parallel.split_cfg=false", "parallel.warmup_steps=1", "sampler.steps=3")
LAUNCHED = (*GENERATION, "save_latents=true")


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Callable[[str], Path]:
    """The output directory of 2 ranks started by a launcher that generated each tiny DiT (`LAUNCHED`)."""

    @functools.cache
    def run(launcher: str) -> Path:
        out = tmp_path_factory.mktemp(launcher)
        proc = run_ranks(launcher, 2, str(WORKER), backend_of(launcher), f"output_dir={out}", *LAUNCHED)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        if launcher != "torch":
            assert f"mpi: 2 ranks on {library_of(launcher)}" in proc.stdout, proc.stdout[:2000]
        return out

    return run


@pytest.mark.parametrize("launcher", ["torch", "mpich", "openmpi5"])  # Open MPI: what most clusters run
def test_two_launched_ranks_write_each_dits_image(launched, launcher):
    out = launched(launcher)
    for model in DITS:
        stem = f"{model}_displaced_2ranks_seed0"
        image = np.asarray(Image.open(out / f"{stem}.png"))
        assert image.shape == (64, 64, 3) and image.std() > 0, model
        report = json.loads((out / f"{stem}.json").read_text())
        assert report["world_size"] == 2 and len(report["step_times_s"]) == 3
        assert report["bytes_per_step"][-1].get("attn", 0) > 0, (model, report["bytes_per_step"])  # stale K/V


def test_gloo_and_mpi_ranks_make_the_same_latents(launched):
    """Both launchers run every rank at one thread, so the same seed must give the same bits."""
    for model in DITS:
        stem = f"{model}_displaced_2ranks_seed0.latents.pt"
        gloo, mpi = (torch.load(launched(launcher) / stem) for launcher in ("torch", "mpich"))
        assert gloo.isfinite().all() and torch.equal(gloo, mpi), model


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("model", DITS)
def test_generation_obeys_cuda_dtype_rules(model, dtype):
    cfg = config(f"model={model}", f"model.dtype={dtype}", *GENERATION)
    parallel = ParallelConfig(**OmegaConf.to_container(cfg.parallel))

    def rank(comm):
        pipe = parallel_pipeline(comm, cfg, parallel, progress=False)
        with StrictDtypes() as strict:
            out = sample(pipe, cfg, 0, lambda _pipe, _step, _t, kwargs: kwargs)
        return out.images, strict.calls

    (first, calls), (second, _) = launch("fake", rank, world_size=2)
    assert calls > 100, "the mode must see the generation's aten calls"
    assert first.shape == (1, 3, 64, 64) and first.isfinite().all() and torch.equal(first, second)


@pytest.mark.parametrize("model", DITS)
def test_initial_noise_is_the_pipelines_own_draw_in_every_dtype(model):
    """The noise `sample` passes is what the pipeline would draw from the same generator in float32
    (Flux's packed into 2x2-pixel tokens); in half precision it is that noise rounded."""
    pipe = build_pipeline(model)
    channels = pipe.transformer.config.in_channels // (4 if model == "flux" else 1)
    own = pipe.prepare_latents(1, channels, 64, 48, torch.float32, "cpu", torch.Generator().manual_seed(5))
    own = own[0] if isinstance(own, tuple) else own  # Flux returns its token positions too
    noise = initial_noise(pipe, 64, 48, torch.Generator().manual_seed(5))
    assert noise.dtype == torch.float32 and torch.equal(noise, own)
    half = initial_noise(pipe.to(torch.bfloat16), 64, 48, torch.Generator().manual_seed(5))
    assert half.dtype == torch.bfloat16 and torch.equal(half, own.to(torch.bfloat16))


def test_local_weights_are_loaded_from_model_path(tmp_path):
    build_pipeline("flux", seed=7).save_pretrained(tmp_path / "flux7")
    runs = {}
    for name, args in {"saved": (f"model.path={tmp_path / 'flux7'}",), "seed7": ("model.weights_seed=7",),
                       "seed0": ()}.items():
        cfg = config("model=flux", "parallel=none", "world_size=1", "sampler.steps=2", "save_latents=true",
                     f"output_dir={tmp_path / name}", *args)
        launch("fake", lambda comm, cfg=cfg: generate(comm, cfg), world_size=1)
        runs[name] = torch.load(tmp_path / name / "flux_none_1ranks_seed0.latents.pt")
    assert torch.equal(runs["saved"], runs["seed7"]) and not torch.equal(runs["saved"], runs["seed0"])


@pytest.mark.parametrize("overrides,world_size,message", [
    (("model=flux", "model.height=60"), 2, "model.height=60: model flux .FluxPipeline. needs a positive multiple "
                                           "of 8 .8, and 4 pixels per image token: VAE factor 2 x 2 latent"),
    (("model=sd3_medium", "model.width=1000"), 2, "model.width=1000: model sd3_medium .* multiple of 16 "
                                                  ".8, and 16 pixels per image token"),
    (("model=flux_dev", "model.height=1032"), 2, "multiple of 16"),
    (("model=sd3", "model.height=264"), 2, "model.height=264: model sd3 .* at most 64 tokens .256 pixels. per side"),
    (("model=pixart", "model.height=8", "parallel.split_cfg=false"), 4,
     "model.height=8 on 4 ranks: 2 rows cannot be cut into 4 row patches .* of image tokens, 4 pixels high"),
])
def test_bad_dit_sizes_fail_saying_what_to_change(overrides, world_size, message):
    with pytest.raises(ConfigError, match=message):
        check_request(config(*overrides), world_size)


def test_flux_guidance_is_no_cfg_batch_and_token_rows_may_split_unevenly():
    """Flux embeds its guidance (no CFG batch to split): 4 ranks cut the 2 token rows of an 8 px
    image into 4 patches, refused, where SD3's guidance branches take 2 ranks each, 1 row per rank;
    6 rows over 4 ranks split unevenly (2, 2, 1, 1): accepted."""
    with pytest.raises(ConfigError, match="model.height=8 on 4 ranks: 2 rows cannot be cut into 4 row patches"):
        check_request(config("model=flux", "model.height=8", "sampler.guidance_scale=5"), 4)
    check_request(config("model=sd3", "model.height=8", "sampler.guidance_scale=5"), 4)
    check_request(config("model=flux", "model.height=24"), 4)
