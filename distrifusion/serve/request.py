"""What a client may ask for, checked on rank 0 so that a bad request never reaches another rank.

pydantic checks each field's type and range; `JobConfigs` then makes the app config the job
generates with (the service's config with the request's values) and runs the batch app's own
start-up checks on it (`preflight.check_request`), so what the service accepts is what
`task=generate` would run, and a job runs exactly as that batch run would.
"""

from __future__ import annotations

import functools
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


class JobConfigs:
    """The app config of each request: the service's config `cfg` with the request's size, steps,
    guidance and mode, checked as `task=generate` checks its own. The prompt and seed stay the
    service's: a job takes them from its request (`generate.sample(prompt=...)`). Built and checked
    once per distinct settings (OmegaConf takes milliseconds, which rank 0's HTTP thread would
    otherwise take from the generation running beside it, per request)."""

    CACHED = 256

    def __init__(self, cfg: DictConfig, world_size: int):
        self.cfg, self.world_size = cfg, world_size
        self._build = functools.lru_cache(maxsize=self.CACHED)(self._settings_config)

    def __call__(self, request: GenerateRequest) -> DictConfig:
        """The config of `request`; raises `ValueError` (a `ConfigError`) saying why it cannot run."""
        height, width = request.height or image_size(self.cfg.model)[0], request.width or image_size(self.cfg.model)[1]
        steps = self.cfg.sampler.steps if request.steps is None else request.steps
        guidance = self.cfg.sampler.guidance_scale if request.guidance_scale is None else request.guidance_scale
        return self._build(height, width, steps, guidance, request.mode or self.cfg.parallel.mode)

    def _settings_config(self, height: int, width: int, steps: int, guidance: float, mode: str) -> DictConfig:
        if (height, width) not in resolutions(self.cfg):
            raise ValueError(f"height={height} width={width}: this service makes {resolutions(self.cfg)} (height, width)")
        if steps > self.cfg.serve.max_steps:
            raise ValueError(f"steps={steps}: this service runs at most serve.max_steps={self.cfg.serve.max_steps}")
        job = OmegaConf.merge(self.cfg, {"model": {"height": height, "width": width},
                                         "sampler": {"steps": steps, "guidance_scale": guidance},
                                         "parallel": {"mode": mode}})
        check_request(job, self.world_size)
        return job
