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

from backends import launch
from distrifusion.generate import generate
from distrifusion.pipeline_factory import build_pipeline
from launchers import backend_of, library_of, rank_env, run_ranks
from test_app import last_json, run_app
from test_bad_input import config

COMMON = ("parallel.split_cfg=false", "parallel.warmup_steps=2", "sampler.steps=5", "save_latents=true")
STEM = "tiny_displaced_2ranks_seed0"
# The launched runs send displaced steps' K/V and halos as int8 deltas: every backend then carries
# uint8 payloads besides the warm-up gathers in the model's dtype and float32 GroupNorm statistics.
LAUNCHED = (*COMMON, "parallel.compress=int8", "parallel.delta=true")


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
    assert report["config"]["parallel"]["vae"] == "patch"
    assert report["vae_peak_memory_bytes"] is None  # no resettable peak off CUDA


@pytest.fixture(scope="module")
def fake_latents(tmp_path_factory) -> Callable[[str], torch.Tensor]:
    """The latents of 2 fake ranks in a dtype (`LAUNCHED`), computed at one thread per rank like the launched ranks."""

    @functools.cache
    def latents(dtype: str) -> torch.Tensor:
        out = tmp_path_factory.mktemp(f"fake_{dtype}")
        cmd = [sys.executable, "-m", "distrifusion", "backend=fake", "world_size=2", f"model.dtype={dtype}",
               f"output_dir={out}", *LAUNCHED]
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
                     f"output_dir={tmp_path}", *LAUNCHED)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    if launcher != "torch":
        assert f"mpi: 2 ranks on {library_of(launcher)}" in proc.stdout, proc.stdout[:2000]
    report = json.loads((tmp_path / f"{STEM}.json").read_text())
    assert report["config"]["parallel"]["compress"] == "int8" and report["config"]["parallel"]["delta"]
    assert torch.equal(torch.load(tmp_path / f"{STEM}.latents.pt"), fake_latents(dtype))


def test_local_weights_are_loaded_from_model_path(tmp_path):
    """The generate task on weights saved to a directory (`model.path`) makes the image of the
    random weights they were saved from, not those of the default seed (in-process: one rank)."""
    build_pipeline("tiny", seed=7).save_pretrained(tmp_path / "tiny7")
    runs = {}
    for name, args in {"saved": (f"model.path={tmp_path / 'tiny7'}",), "seed7": ("model.weights_seed=7",),
                       "seed0": ()}.items():
        cfg = config("parallel=none", f"output_dir={tmp_path / name}", "sampler.steps=2", "save_latents=true", *args)
        launch("fake", lambda comm, cfg=cfg: generate(comm, cfg), world_size=1)
        runs[name] = torch.load(tmp_path / name / "tiny_none_1ranks_seed0.latents.pt")
    assert torch.equal(runs["saved"], runs["seed7"]) and not torch.equal(runs["saved"], runs["seed0"])


def test_quality_reports_psnr_ssim_relative_error_and_a_grid(tmp_path):
    proc = run_app("task=quality", "world_size=2", "parallel.split_cfg=false", "sampler.steps=6",
                   "quality.seeds=[0,1,2]", "quality.warmups=[1,3]", "quality.groupnorms=[stale]",
                   "parallel.warmup_steps=3", "quality.grid_seeds=2", "quality.compressions=[int8]",
                   f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = last_json(proc.stdout)
    assert list(summary) == ["sync_patch", "naive_patch", "displaced w1 corrected", "displaced w3 corrected",
                             "displaced w3 stale", "displaced w3 corrected int8"]
    assert summary["displaced w3 corrected int8"]["against"] == "displaced w3 corrected"
    assert summary["displaced w3 corrected"]["against"] == "sync_patch"
    assert "against displaced w3 corrected: " in proc.stdout
    assert summary["displaced w3 corrected"]["latent_rel_err"] < summary["naive_patch"]["latent_rel_err"]
    assert summary["displaced w3 corrected"]["psnr_db"] > summary["naive_patch"]["psnr_db"]
    assert summary["sync_patch"]["ssim"] > summary["displaced w3 corrected"]["ssim"] > summary["naive_patch"]["ssim"]
    assert summary["sync_patch"]["latent_rel_err"] < 1e-4 < summary["displaced w1 corrected"]["latent_rel_err"]
    assert (tmp_path / "quality.json").exists() and "PSNR dB" in proc.stdout
    grid = Image.open(tmp_path / "quality_grid.png")  # 2 seeds, 5 columns of 64 px images shown at 192
    assert grid.size == (5 * 192, 16 + 2 * 192)


def test_quality_references_are_each_seeds_own_single_device_image(tmp_path):
    """Seeds are dealt out over the ranks for the references: each must still be its own seed's."""
    proc = run_app("task=quality", "world_size=2", "parallel.split_cfg=false", "sampler.steps=3",
                   "quality.seeds=[5,6,7]", "quality.warmups=[]", "quality.groupnorms=[]",
                   "quality.baselines=[sync_patch]", "quality.compressions=[]", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "quality.json").read_text())["rows"]
    # sync_patch is the single-device result up to fp32 rounding (~1e-6); another seed's is ~1 away
    # (60 dB: a root-mean-square pixel error of 1e-3)
    assert [r["seed"] for r in rows] == [5, 6, 7], rows
    assert all(r["latent_rel_err"] < 1e-3 and r["psnr_db"] > 60 for r in rows), rows


def test_warm_up_runs_leave_the_image_and_report_the_timed_run(tmp_path):
    """`warmup_runs` generate on the same pipeline first: the timed run's image is the cold one's
    (the reused stale, compressed and delta buffers start over), its report counts its steps only."""
    reports = {}
    for runs in (0, 2):
        cfg = config(*LAUNCHED, f"warmup_runs={runs}", f"output_dir={tmp_path / str(runs)}")
        reports[runs] = launch("fake", lambda comm, cfg=cfg: generate(comm, cfg), world_size=2)[0]
    cold, warm = (torch.load(tmp_path / str(runs) / f"{STEM}.latents.pt") for runs in (0, 2))
    assert torch.equal(cold, warm)
    assert len(reports[2]["step_times_s"]) == 5
    assert reports[2]["bytes_per_step"] == reports[0]["bytes_per_step"]
