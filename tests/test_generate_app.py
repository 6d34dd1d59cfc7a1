"""The generate and quality tasks through `python -m distrifusion`, on every backend."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

from distrifusion.pipeline_factory import build_pipeline
from launchers import backend_of, library_of, rank_env, run_ranks
from test_app import last_json, run_app

COMMON = ("parallel.split_cfg=false", "parallel.warmup_steps=2", "sampler.steps=5", "save_latents=true")
STEM = "tiny_displaced_2ranks_seed0"


def test_generate_writes_image_and_report(tmp_path):
    proc = run_app("backend=fake", "world_size=2", f"output_dir={tmp_path}", *COMMON)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = last_json(proc.stdout)
    assert Path(summary["image"]).exists()
    assert Image.open(tmp_path / f"{STEM}.png").size == (64, 64)
    report = json.loads((tmp_path / f"{STEM}.json").read_text())
    assert len(report["step_times_s"]) == 5 and report["peak_memory_bytes"] > 0
    assert set(report["bytes_per_step"][-1]) == {"conv", "attn", "norm", "output"}
    assert report["comm_buffer_bytes"] > 0 and report["config"]["parallel"]["mode"] == "displaced"


@pytest.fixture(scope="module")
def fake_latents(tmp_path_factory) -> Callable[[str], torch.Tensor]:
    """The latents of 2 fake ranks in a dtype, computed at one thread per rank like the launched ranks."""

    @functools.cache
    def latents(dtype: str) -> torch.Tensor:
        out = tmp_path_factory.mktemp(f"fake_{dtype}")
        cmd = [sys.executable, "-m", "distrifusion", "backend=fake", "world_size=2", f"model.dtype={dtype}",
               f"output_dir={out}", *COMMON]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=rank_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        return torch.load(out / f"{STEM}.latents.pt")

    return latents


# The Open MPIs in float16, the dtype Open MPI 4.1 has no MPI type for (their conformance runs
# check float32 too); torchrun and MPICH in the default float32.
@pytest.mark.parametrize("launcher,dtype", [("torch", "float32"), ("mpich", "float32"),
                                            ("openmpi4", "float16"), ("openmpi5", "float16")])
def test_same_seed_same_latents_on_every_backend(tmp_path, launcher, dtype, fake_latents):
    proc = run_ranks(launcher, 2, "-m", "distrifusion", f"backend={backend_of(launcher)}", f"model.dtype={dtype}",
                     f"output_dir={tmp_path}", *COMMON)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    if launcher != "torch":
        assert f"mpi: 2 ranks on {library_of(launcher)}" in proc.stdout, proc.stdout[:2000]
    assert torch.equal(torch.load(tmp_path / f"{STEM}.latents.pt"), fake_latents(dtype))


def test_local_weights_are_loaded_from_model_path(tmp_path):
    build_pipeline("tiny", seed=7).save_pretrained(tmp_path / "tiny7")
    runs = {}
    for name, args in {"saved": (f"model.path={tmp_path / 'tiny7'}",), "seed7": ("model.weights_seed=7",),
                       "seed0": ()}.items():
        proc = run_app("world_size=1", "parallel=none", f"output_dir={tmp_path / name}", "sampler.steps=2",
                       "save_latents=true", *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = torch.load(tmp_path / name / "tiny_none_1ranks_seed0.latents.pt")
    assert torch.equal(runs["saved"], runs["seed7"]) and not torch.equal(runs["saved"], runs["seed0"])


def test_quality_reports_psnr_and_relative_error(tmp_path):
    proc = run_app("task=quality", "world_size=2", "parallel.split_cfg=false", "sampler.steps=6",
                   "quality.seeds=[0]", "quality.warmups=[1,3]", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = last_json(proc.stdout)
    assert list(summary) == ["naive_patch", "displaced (warm-up 1)", "displaced (warm-up 3)"]
    assert summary["displaced (warm-up 3)"]["latent_rel_err"] < summary["naive_patch"]["latent_rel_err"]
    assert summary["displaced (warm-up 3)"]["psnr_db"] > summary["naive_patch"]["psnr_db"]
    assert (tmp_path / "quality.json").exists() and "PSNR dB" in proc.stdout
