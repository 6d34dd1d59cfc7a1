"""What a run of the app asks for, checked before any work, with errors that say what to change.

`check_request` needs the config and the number of ranks alone: no model is built (the VAE factor,
the UNet's depth and a DiT's token size come from `model_configs`, the step limit from the scheduler itself).
`check_ranks` runs at the start of every rank: one small collective compares the ranks' resolved
configs, so ranks launched with different overrides all stop together, then `check_request`.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Iterator

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from omegaconf import DictConfig, OmegaConf

from backends import Communicator

from .config import Config, Task
from .generate import image_size
from .exact_rows import split_rows
from .model_configs import FLOW, ModelSpec, get_spec
from .parallel_config import COMPRESSIONS, GROUPNORMS, ParallelConfig
from .patch_unet import check_height
from .pipeline_factory import build_scheduler


BASELINES = ("sync_patch", "naive_patch")
COMPRESSED = tuple(kind for kind in COMPRESSIONS if kind != "none")  # the study always runs "none"


class ConfigError(ValueError):
    """A config that cannot run; the message names the keys and what to change."""


def check_request(cfg: DictConfig, world_size: int) -> None:
    """Raise `ConfigError` unless `cfg` can run on `world_size` ranks."""
    if cfg.world_size is not None and cfg.world_size < 1:
        raise ConfigError(f"world_size={cfg.world_size}: a run needs at least 1 rank; leave world_size out "
                          "to use as many as the launcher started (2 for backend=fake)")
    if cfg.backend.timeout <= 0:
        raise ConfigError(f"backend.timeout={cfg.backend.timeout:g}: the seconds a collective may wait "
                          "must be positive (default 60)")
    parallel = _parallel(cfg)
    if cfg.task == Task.allgather_demo:
        if cfg.demo.mib < 0 or cfg.demo.repeats < 1:
            raise ConfigError(f"demo.mib={cfg.demo.mib:g} demo.repeats={cfg.demo.repeats}: the demo gathers "
                              "at least 0 MiB per rank, at least once")
        return
    if cfg.sampler.steps < 1:
        raise ConfigError(f"sampler.steps={cfg.sampler.steps}: a generation needs at least 1 denoising step")
    if cfg.warmup_runs < 0:
        raise ConfigError(f"warmup_runs={cfg.warmup_runs}: the untimed generations before the timed one "
                          "must be 0 or more")
    if cfg.sampler.guidance_scale < 0:
        raise ConfigError(f"sampler.guidance_scale={cfg.sampler.guidance_scale:g} is negative; use 0 or 1 for "
                          "no classifier-free guidance, or a value above 1 (default 5)")
    try:
        spec = get_spec(cfg.model.name)
    except ValueError as e:
        raise ConfigError(f"model.name={cfg.model.name}: {e} (or pick one with model=NAME)") from e
    try:
        scheduler = build_scheduler(cfg.sampler.name, cfg.model.name)
    except ValueError as e:
        raise ConfigError(f"sampler.name={cfg.sampler.name}: {e} (or pick one with sampler=NAME)") from e
    if spec.prediction_type != FLOW:  # a flow schedule's timesteps are continuous: any count is distinct
        _check_steps(scheduler, cfg)
    _check_size(cfg, spec)
    check_image_cut(cfg, parallel, world_size)
    if cfg.task == Task.quality:
        check_quality(cfg)


def _check_size(cfg: DictConfig, spec: ModelSpec) -> None:
    """Raise `ConfigError` unless the image's sides suit the model: multiples of 8 (the diffusers
    pipelines' rule), for a DiT also of its token side in pixels (VAE factor x latent pixels per
    token), and for SD3 at most as many tokens as its position embedding table holds."""
    unit, rule = 8, "the diffusers pipelines need a positive multiple of 8"
    if spec.transformer is not None:
        token = spec.pixels_per_token
        unit = math.lcm(8, token)
        rule = (f"model {cfg.model.name} ({spec.pipeline_class}) needs a positive multiple of {unit} (8, and "
                f"{token} pixels per image token: VAE factor {spec.vae_scale_factor} x {spec.latent_pixels_per_token} "
                "latent pixels per token)")
    for key in ("height", "width"):
        size = cfg.model[key]
        if size is not None and (size <= 0 or size % unit):
            raise ConfigError(f"model.{key}={size}: {rule} (or leave it out: {spec.resolution} for model "
                              f"{cfg.model.name})")
    most = (spec.transformer or {}).get("pos_embed_max_size")
    if most is not None:
        for key, size in zip(("height", "width"), image_size(cfg.model)):
            if size > most * spec.pixels_per_token:
                raise ConfigError(f"model.{key}={size}: model {cfg.model.name} ({spec.pipeline_class}) embeds "
                                  f"positions of at most {most} tokens ({most * spec.pixels_per_token} pixels) "
                                  "per side")


def check_quality(cfg: DictConfig) -> None:
    """Raise `ConfigError` unless the quality study names variants that exist, and can score them."""
    q = cfg.quality
    if not q.seeds:
        raise ConfigError("quality.seeds=[]: the study needs at least one seed, e.g. quality.seeds=[0,1]")
    if any(mode not in BASELINES for mode in q.baselines):
        raise ConfigError(f"quality.baselines={list(q.baselines)}: each must be one of {BASELINES}")
    if any(gn not in GROUPNORMS for gn in q.groupnorms):
        raise ConfigError(f"quality.groupnorms={list(q.groupnorms)}: each must be one of {GROUPNORMS}")
    if any(w < 0 for w in q.warmups):
        raise ConfigError(f"quality.warmups={list(q.warmups)}: warm-up step counts must be >= 0")
    if any(kind not in COMPRESSED for kind in q.compressions):
        raise ConfigError(f"quality.compressions={list(q.compressions)}: each must be one of {COMPRESSED} "
                          "(uncompressed displaced runs are always in the study)")
    if q.compressions and not q.deltas:
        raise ConfigError(f"quality.compressions={list(q.compressions)} quality.deltas=[]: each compression "
                          "runs with each of the deltas; give [false], [true] or [false,true]")
    if q.grid_seeds < 0 or q.amplify <= 0:
        raise ConfigError(f"quality.grid_seeds={q.grid_seeds} quality.amplify={q.amplify:g}: the grid shows "
                          "0 or more seeds, with differences multiplied by a positive factor")
    try:
        import skimage.metrics  # noqa: F401
    except ImportError as e:
        raise ConfigError("task=quality scores SSIM with scikit-image, which is not installed: "
                          "pip install 'distrifusion[quality]' (or scikit-image)") from e


def check_ranks(comm: Communicator, cfg: DictConfig) -> None:
    """Collective, at the start of every rank: the same config on every rank, and one that can run.

    Launched ranks check nothing before this: under mpiexec a rank that exits before the others
    have started MPI leaves them waiting forever.
    """
    check_same_config(comm, cfg)
    check_request(cfg, comm.world_size)


def check_image_cut(cfg: DictConfig, parallel: ParallelConfig, world_size: int) -> None:
    """Raise `ConfigError` unless each image can be cut into the row patches of `world_size` ranks."""
    if cfg.task == Task.quality:  # it compares the patch modes with `none`, whatever parallel.mode says
        parallel = ParallelConfig(**{**OmegaConf.to_container(cfg.parallel), "mode": "displaced"})
    if parallel.mode == "none":
        return
    spec = get_spec(cfg.model.name)
    guided = spec.classifier_free_guidance and cfg.sampler.guidance_scale > 1
    split = parallel.split_cfg and guided and world_size % 2 == 0
    patches = world_size // 2 if split else world_size
    height, _ = image_size(cfg.model)
    try:
        if spec.transformer is not None:
            split_rows(height // spec.pixels_per_token, patches)  # the rows of image tokens
        else:
            levels = len(spec.unet["down_block_types"]) - 1  # diffusers halves after every down block but the last
            check_height(height // spec.vae_scale_factor, patches, levels, spec.vae_scale_factor)
    except ValueError as e:
        how = f" (split CFG: {patches} row patches per guidance branch)" if split else ""
        tokens = f" of image tokens, {spec.pixels_per_token} pixels high" if spec.transformer is not None else ""
        raise ConfigError(f"model.height={height} on {world_size} ranks{how}: {e}{tokens}") from e


def check_same_config(comm: Communicator, cfg: DictConfig) -> None:
    """Collective: raise `ConfigError` on every rank unless all ranks resolved the same config.

    Every rank all-gathers one int64 digest per key of the schema, so the message can name the
    keys that differ and the ranks that differ from rank 0.
    """
    values = dict(_leaves(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)))
    keys = [key for key, _ in _leaves(OmegaConf.to_container(OmegaConf.structured(Config), enum_to_str=True))]
    mine = torch.tensor([_digest(values.get(key)) for key in keys], dtype=torch.int64, device=comm.device)
    rows = comm.all_gather(mine, tag="config").tolist()
    differ = [i for i, key in enumerate(keys) if len({row[i] for row in rows}) > 1]
    if not differ:
        return
    others = [r for r, row in enumerate(rows) if row != rows[0]]
    here = ", ".join(f"{keys[i]}={values.get(keys[i])!r}" for i in differ)
    raise ConfigError(f"the ranks were launched with different configs: ranks {others} differ from rank 0 in "
                      f"{', '.join(keys[i] for i in differ)} (rank {comm.rank} has {here}); give every rank "
                      "the same overrides")


def _parallel(cfg: DictConfig) -> ParallelConfig:
    try:
        return ParallelConfig(**OmegaConf.to_container(cfg.parallel))
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _check_steps(scheduler: SchedulerMixin, cfg: DictConfig) -> None:
    """Raise `ConfigError` unless the scheduler makes `sampler.steps` distinct timesteps it was trained on."""
    steps = cfg.sampler.steps
    if _fits(scheduler, steps):
        return
    trained = scheduler.config.num_train_timesteps
    most = next((n for n in range(min(steps, trained), 0, -1) if _fits(scheduler, n)), 0)
    raise ConfigError(f"sampler.steps={steps}: the {cfg.sampler.name} scheduler of model {cfg.model.name} was "
                      f"trained on {trained} timesteps (timestep_spacing={scheduler.config.timestep_spacing!r}, "
                      f"steps_offset={scheduler.config.steps_offset}), so it can run at most {most} distinct "
                      f"steps; set sampler.steps<={most}")


def _fits(scheduler: SchedulerMixin, steps: int) -> bool:
    trained = scheduler.config.num_train_timesteps
    if steps > trained:  # never distinct; and a huge count would make huge arrays
        return False
    scheduler.set_timesteps(steps)
    timesteps = set(scheduler.timesteps.tolist())
    return len(timesteps) == steps and 0 <= min(timesteps) and max(timesteps) < trained


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every non-dict value of a nested dict, in order."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _digest(value: Any) -> int:
    data = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(data[:8], "little", signed=True)
