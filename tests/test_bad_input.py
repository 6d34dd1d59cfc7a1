"""Bad input fails before any work (no model built), on every backend, with an error saying what to change.

The checks themselves are tested in-process (`check_request`, `check_same_config` on fake ranks);
the `python -m distrifusion` runs (a few seconds each, nearly all of it imports) test that the app
reaches them: fake ranks before any starts, launched ranks (torchrun, mpiexec) at their start,
every rank failing, none left waiting. The launched ranks' image check is the same call on every
launcher, so it runs under one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import UNet2DConditionModel
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from backends.emulated import EmulatedCommunicator
from backends.fake import spawn
from distrifusion import ParallelConfig, parallelize
from distrifusion.config import register
from distrifusion.patch_unet import check_height
from distrifusion.preflight import ConfigError, check_request, check_same_config
from launchers import backend_of, launch_command, run_ranks
from test_app import run_app

CONF = Path(__file__).resolve().parents[1] / "conf"
BUILT = "RANDOM weights"  # the log line of a model build: its absence means no work was done
LAUNCH_TIMEOUT = 120  # seconds; these runs stop at their first collective, a hang would take the backend's 60


def config(*overrides: str) -> DictConfig:
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("overrides,world_size,message", [
    (("sampler.steps=0",), 2, "sampler.steps=0: a generation needs at least 1 denoising step"),
    (("sampler.steps=-5",), 2, "sampler.steps=-5: a generation needs at least 1"),
    (("warmup_runs=-1",), 2, "warmup_runs=-1: the untimed generations before the timed one must be 0 or more"),
    (("world_size=0",), 0, "world_size=0: a run needs at least 1 rank; leave world_size out"),
    (("world_size=-2",), -2, "world_size=-2: a run needs at least 1 rank"),
    (("sampler.steps=1000",), 2, "the ddim scheduler of model tiny was trained on 1000 timesteps"),
    (("sampler.steps=1000",), 2, "at most 999 distinct steps; set sampler.steps<=999"),
    (("sampler=euler", "sampler.steps=1000"), 2, "the euler scheduler of model tiny"),
    (("sampler=euler", "sampler.steps=1000"), 2, "set sampler.steps<=999"),
    (("sampler=euler", "sampler.steps=1000000000"), 2, "set sampler.steps<=999"),
    (("model.height=72",), 4, "model.height=72 on 4 ranks (split CFG: 2 row patches per guidance branch)"),
    (("model.height=72",), 4, "(image 72) cannot be cut into 2 row patches"),
    (("model.height=72",), 4, "image heights such as [48, 64, 80, 96]"),
    (("model.height=72", "parallel.split_cfg=false"), 2, "cannot be cut into 2 row patches"),
    (("model.height=80", "sampler.guidance_scale=1"), 4, "cannot be cut into 4 row patches"),
    (("model=sdxl", "model.height=1040"), 4, "(image 1040) cannot be cut into 2 row patches"),
    (("model=sdxl", "model.height=1040"), 4, "image heights such as [960, 1024, 1088, 1152]"),
    (("task=quality", "parallel=none", "model.height=72"), 4, "cannot be cut into 2 row patches"),
    (("model.height=70",), 1, "model.height=70: the diffusers pipelines need a positive multiple of 8"),
    (("model.width=0",), 1, "model.width=0: the diffusers pipelines need a positive multiple of 8"),
    (("sampler.guidance_scale=-1",), 2, "sampler.guidance_scale=-1 is negative"),
    (("model.name=tiny2",), 2, "model.name=tiny2: unknown model 'tiny2'; choose one of"),
    (("sampler.name=dpm",), 2, "sampler.name=dpm: unknown scheduler kind 'dpm'; choose one of ('ddim', 'euler')"),
    (("backend.timeout=0",), 2, "backend.timeout=0: the seconds a collective may wait must be positive"),
    (("parallel.warmup_steps=-1",), 2, "ParallelConfig.warmup_steps must be >= 0"),
    (("parallel.compress=int4",), 2, "ParallelConfig.compress must be one of ('none', 'fp8', 'int8'), got 'int4'"),
    (("parallel.delta=true",), 2, "ParallelConfig.delta=true needs compress=fp8 or int8"),
    (("task=allgather_demo", "demo.repeats=0"), 2, "demo.mib=64 demo.repeats=0: the demo gathers"),
    (("task=allgather_demo", "demo.mib=-1"), 2, "demo.mib=-1 demo.repeats=5: the demo gathers"),
    (("task=quality", "quality.seeds=[]"), 2, "quality.seeds=[]: the study needs at least one seed"),
    (("task=quality", "quality.baselines=[none]"), 2, "each must be one of ('sync_patch', 'naive_patch')"),
    (("task=quality", "quality.groupnorms=[fresh]"), 2, "quality.groupnorms=['fresh']: each must be one of"),
    (("task=quality", "quality.warmups=[-1]"), 2, "quality.warmups=[-1]: warm-up step counts must be >= 0"),
    (("task=quality", "quality.amplify=0"), 2, "differences multiplied by a positive factor"),
    (("task=quality", "quality.compressions=[none]"), 2, "quality.compressions=['none']: each must be one of "
                                                         "('fp8', 'int8') (uncompressed displaced runs are always"),
    (("task=quality", "quality.deltas=[]"), 2, "quality.deltas=[]: each compression runs with each of the deltas"),
])
def test_a_request_that_cannot_run_says_what_to_change(overrides, world_size, message):
    with pytest.raises(ConfigError) as error:
        check_request(config(*overrides), world_size)
    assert message in str(error.value)


@pytest.mark.parametrize("overrides,world_size", [
    ((), 1), ((), 2), ((), 4), (("world_size=4",), 4),
    (("sampler.steps=999",), 2), (("sampler=euler", "sampler.steps=999"), 2), (("sampler.steps=1",), 2),
    (("model.height=80",), 4),  # 40 latent rows: split CFG makes 2 patches, and 40 is a multiple of 2*2^2
    (("parallel=none", "model.height=72"), 4),
    (("sampler.guidance_scale=0",), 2),
    (("task=allgather_demo",), 3),  # no image: 3 ranks need not cut one
    (("task=quality", "quality.warmups=[]", "quality.groupnorms=[]"), 2),
    (("task=quality", "quality.compressions=[]", "quality.deltas=[]"), 2),
    (("task=quality", "quality.compressions=[int8,fp8]", "quality.deltas=[true]"), 2),
])
def test_a_request_that_can_run_passes(overrides, world_size):
    check_request(config(*overrides), world_size)


def test_the_height_message_uses_the_vae_factor_it_is_given():
    with pytest.raises(ValueError, match=r"\(image 72\).*image heights such as \[48, 64, 80, 96\]"):
        check_height(36, 2, 2, vae_factor=2)
    with pytest.raises(ValueError, match=r"latent heights such as \[24, 32, 40, 48\]") as error:
        check_height(36, 2, 2)
    assert "image" not in str(error.value)


def rank_errors(configs: list[DictConfig]) -> list[str | None]:
    """What `check_same_config` raised on each of len(configs) fake ranks (None: nothing)."""
    def run(comm):
        try:
            check_same_config(comm, configs[comm.rank])
        except ConfigError as e:
            return str(e)
        return None

    return spawn(run, len(configs), timeout=10)


def test_ranks_with_different_configs_all_fail_naming_the_keys_and_ranks():
    same, other = config("seed=0"), config("seed=1", "sampler.steps=7")
    errors = rank_errors([same, same, other])
    assert all(e is not None for e in errors), errors
    for rank, error in enumerate(errors):
        assert "ranks [2] differ from rank 0 in sampler.steps, seed" in error
        assert f"rank {rank} has sampler.steps={7 if rank == 2 else 20}, seed={int(rank == 2)}" in error


def test_ranks_with_the_same_config_pass():
    assert rank_errors([config("seed=3")] * 3) == [None, None, None]


@pytest.mark.parametrize("overrides,message", [
    (("sampler.steps=0",), "distrifusion: sampler.steps=0: a generation needs at least 1 denoising step"),
    (("model.height=72", "world_size=4"), "distrifusion: model.height=72 on 4 ranks"),  # checked with world_size
])
def test_fake_ranks_fail_before_any_starts(tmp_path, overrides, message):
    proc = run_app("backend=fake", f"output_dir={tmp_path / 'out'}", *overrides, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and BUILT not in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()


def run_launched(launcher: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_ranks(launcher, 2, "-m", "distrifusion", f"backend={backend_of(launcher)}",
                     f"output_dir={tmp_path / 'out'}", *overrides, timeout=LAUNCH_TIMEOUT)


def assert_failed_before_work(proc: subprocess.CompletedProcess, tmp_path: Path, *messages: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    for message in messages:
        assert message in output, output[-3000:]
    assert BUILT not in output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("launcher,name", [("torch", "torchrun"), ("mpich", "mpiexec")])
def test_a_world_size_the_launcher_did_not_start_fails(tmp_path, launcher, name):
    proc = run_launched(launcher, tmp_path, "world_size=3")
    assert_failed_before_work(proc, tmp_path, f"world_size=3 was asked for but {name} started 2 ranks")


def test_launched_ranks_check_the_image_against_the_ranks_started(tmp_path):
    proc = run_launched("mpich", tmp_path, "model.height=72", "parallel.split_cfg=false")
    assert_failed_before_work(proc, tmp_path, "model.height=72 on 2 ranks: a latent of height 36 (image 72)")


def test_torchrun_ranks_with_different_configs_fail(tmp_path):
    proc = run_launched("torch", tmp_path, "seed=${oc.env:RANK}")  # each rank resolves its own seed
    assert_failed_before_work(proc, tmp_path, "ranks [1] differ from rank 0 in seed (rank 0 has seed=0)",
                              "ranks [1] differ from rank 0 in seed (rank 1 has seed=1)")


def test_mpiexec_ranks_with_different_configs_fail(tmp_path):
    cmd, env = launch_command("mpich", 1)
    app = (sys.executable, "-m", "distrifusion", "backend=mpi", f"output_dir={tmp_path / 'out'}")
    cmd = [*cmd, *app, "seed=0", ":", *cmd[1:], *app, "seed=1"]  # MPMD: one rank per program
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=env)
    assert_failed_before_work(proc, tmp_path, "ranks [1] differ from rank 0 in seed")


def test_compression_in_a_mode_without_stale_activations_says_it_does_nothing(caplog):
    def patched(config: ParallelConfig) -> str:
        unet = UNet2DConditionModel(block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                    down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                    layers_per_block=1, sample_size=8)
        caplog.clear()
        with caplog.at_level("WARNING", logger="distrifusion"):
            parallelize(unet, EmulatedCommunicator(2, rank=0), config)
        return caplog.text

    assert "parallel.compress=int8 has no effect in mode sync_patch" in patched(ParallelConfig("sync_patch", compress="int8"))
    assert "no effect" not in patched(ParallelConfig(compress="int8"))
