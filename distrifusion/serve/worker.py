"""The loop every rank runs: rank 0 takes the next job, every rank generates it together.

Each round rank 0 shares one message (a job, idle, or shutdown); after a job every rank says
whether it failed there, so all agree: a job that failed on any rank fails (500) and the next
round starts on every rank together. A `CommError` (a peer died, a collective timed out or the
ranks fell out of step) is not a failed job: it ends the loop on every rank that sees it.
"""

from __future__ import annotations

import io
import logging
import os
import time
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig

from backends import CommError, Communicator

from ..generate import sample, to_pil
from .broadcast import IDLE, SHUTDOWN, failed_ranks, share
from .job import Job, JobQueue
from .metrics import ServiceMetrics
from .request import GenerateRequest, JobConfigs
from .warm import WarmPipelines

log = logging.getLogger("distrifusion")


def idle_wait(cfg: DictConfig) -> float:
    """Seconds rank 0 waits for a job before an idle round: well inside a collective's timeout."""
    return min(1.0, cfg.backend.timeout / 4)


def message_of(job: Optional[Job], queue: JobQueue) -> dict:
    if job is not None:
        return {"kind": "job", "id": job.id, "request": job.request.model_dump()}
    return SHUTDOWN if queue.drained else IDLE


def run(comm: Communicator, cfg: DictConfig, warm: WarmPipelines,
        queue: Optional[JobQueue] = None, metrics: Optional[ServiceMetrics] = None) -> None:
    """Serve until rank 0 (which passes the `queue` and `metrics`) shares shutdown, or until the
    launcher that started this process is gone (killed torchrun or mpiexec: no orphans serving)."""
    launcher, job_config = os.getppid(), JobConfigs(cfg, comm.world_size)
    while True:
        job = queue.next(idle_wait(cfg)) if comm.rank == 0 else None
        message = share(comm, message_of(job, queue) if comm.rank == 0 else None)
        if os.getppid() != launcher:
            raise CommError(f"rank {comm.rank}: its launcher (pid {launcher}) is gone; the service stops")
        if message["kind"] == "shutdown":
            return
        if message["kind"] == "idle":
            continue
        run_job(comm, job_config, warm, GenerateRequest.model_validate(message["request"]), job, metrics)


def run_job(comm: Communicator, job_config: JobConfigs, warm: WarmPipelines, request: GenerateRequest,
            job: Optional[Job], metrics: Optional[ServiceMetrics]) -> None:
    """Collective: generate `request`; rank 0 finishes its `job` with the PNG/latents or the error."""
    error, result, started = None, None, time.perf_counter()
    try:
        result = generate(comm, job_config(request), warm, request, job)
    except CommError:
        raise
    except Exception as e:  # noqa: BLE001 - any other failure fails this job alone
        log.exception("rank %d: job failed", comm.rank)
        error = f"{type(e).__name__}: {e}"
    generation_s = time.perf_counter() - started
    failed = failed_ranks(comm, error is not None)
    if comm.rank != 0:
        return
    if error is None and failed:
        error = f"the job failed on rank(s) {failed}; their logs say why"
    if error is None:
        try:
            job.finish(encode(result, request.output))
            metrics.observe(job.latency_s, generation_s)
            return
        except Exception as e:  # noqa: BLE001 - an image that cannot be encoded fails its job
            error = f"{type(e).__name__}: {e}"
    job.finish(None, error)
    metrics.failed()


def generate(comm: Communicator, cfg: DictConfig, warm: WarmPipelines, request: GenerateRequest,
             job: Optional[Job]) -> dict[str, torch.Tensor]:
    """Collective: the image and final latents of `request` (generated as `cfg`, its `JobConfigs`
    config, says), as `task=generate` makes them."""
    final = {}

    def on_step_end(_pipe: Any, step: int, _t: Any, kwargs: dict) -> dict:
        final["latents"] = kwargs["latents"]
        if job is not None:
            job.steps_done = step + 1
        return kwargs

    out = sample(warm.get(cfg), cfg, request.seed, on_step_end, prompt=request.prompt,
                 negative_prompt=request.negative_prompt or None)
    return {"image": out.images, "latents": final["latents"]}


def encode(result: dict[str, torch.Tensor], output: str) -> bytes:
    """The PNG of the image, or the latents as a float32 .npy file."""
    buffer = io.BytesIO()
    if output == "latents":
        np.save(buffer, result["latents"].float().cpu().numpy())
    else:
        to_pil(result["image"]).save(buffer, format="PNG")
    return buffer.getvalue()
