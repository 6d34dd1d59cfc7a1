"""What a client may ask for, checked on rank 0 so that a bad request never reaches another rank.

pydantic checks each field's type and range; `job_config` then makes the app config the job
generates with (the service's config with the request's values) and runs the batch app's own
start-up checks on it (`preflight.check_request`), so what the service accepts is what
`task=generate` would run, and a job runs exactly as that batch run would.
"""

from __future__ import annotations

from typing import Literal, Optional

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, Field

from ..generate import image_size
from ..parallel_config import MODES
from ..preflight import check_request

Mode = Literal[MODES]  # type: ignore[valid-type]


class GenerateRequest(BaseModel):
    """The body of POST /generate and POST /jobs; unset fields take the service's config."""

    model_config = {"extra": "forbid"}

    prompt: str = Field(min_length=1, max_length=1000)
    negative_prompt: str = Field(default="", max_length=1000)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    steps: Optional[int] = Field(default=None, ge=1)
    guidance_scale: Optional[float] = Field(default=None, ge=0, le=30)
    height: Optional[int] = None
    width: Optional[int] = None
    mode: Optional[Mode] = None
    output: Literal["png", "latents"] = "png"


def resolutions(cfg: DictConfig) -> list[tuple[int, int]]:
    """The (height, width) a request may ask for: `serve.resolutions`, or the model's own."""
    return [tuple(r) for r in cfg.serve.resolutions] or [image_size(cfg.model)]


def job_config(cfg: DictConfig, request: GenerateRequest, world_size: int) -> DictConfig:
    """The app config that generates `request`; raises `ValueError` (a `ConfigError`) saying why not."""
    height, width = request.height or image_size(cfg.model)[0], request.width or image_size(cfg.model)[1]
    if (height, width) not in resolutions(cfg):
        raise ValueError(f"height={height} width={width}: this service makes {resolutions(cfg)} (height, width)")
    steps = cfg.sampler.steps if request.steps is None else request.steps
    if steps > cfg.serve.max_steps:
        raise ValueError(f"steps={steps}: this service runs at most serve.max_steps={cfg.serve.max_steps}")
    job = OmegaConf.merge(cfg, {
        "prompt": request.prompt, "seed": request.seed,
        "model": {"height": height, "width": width},
        "sampler": {"steps": steps, "guidance_scale": request.guidance_scale if request.guidance_scale is not None
                    else cfg.sampler.guidance_scale},
        "parallel": {"mode": request.mode or cfg.parallel.mode},
    })
    check_request(job, world_size)
    return job
