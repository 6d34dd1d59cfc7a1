"""`task=serve`: every rank keeps the model warm and runs the worker loop; rank 0 also answers HTTP.

Start-up: every rank builds the pipelines of `serve.prewarm` and generates once with each; then
rank 0 listens and prints `listening on http://HOST:PORT`. Shutdown: SIGTERM or SIGINT on rank 0
stops accepting, the jobs already queued run, and every rank returns (exit 0); the other ranks
ignore both signals and follow rank 0 (torchrun sends them to every rank). A rank that fails ends
the service: rank 0 fails the waiting jobs, answers 503 on /health for `serve.linger_s`, and every
surviving rank raises, within a collective's timeout, so the launcher exits non-zero.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from omegaconf import DictConfig

from backends import CommError, Communicator

from ..preflight import ConfigError
from . import worker
from .http import create_app, start
from .job import JobQueue
from .metrics import ServiceMetrics
from .request import GenerateRequest, JobConfigs, resolutions
from .warm import WarmPipelines

log = logging.getLogger("distrifusion")


def check_serve(cfg: DictConfig, world_size: int) -> None:
    """Raise `ConfigError` unless every resolution the service offers can run (as task=generate)."""
    s = cfg.serve
    if s.max_steps < 1 or s.queue_size < 1 or s.max_warm < 1 or s.linger_s < 0:
        raise ConfigError(f"serve.max_steps={s.max_steps} serve.queue_size={s.queue_size} serve.max_warm="
                          f"{s.max_warm} serve.linger_s={s.linger_s:g}: each must be at least 1 (linger_s 0)")
    job_config = JobConfigs(cfg, world_size)
    for height, width in resolutions(cfg):
        job_config(GenerateRequest(prompt=cfg.prompt, height=height, width=width))
    offered = resolutions(cfg)
    if any(tuple(r) not in offered for r in s.prewarm):
        raise ConfigError(f"serve.prewarm={[list(r) for r in s.prewarm]}: each must be one of {offered}")


def serve(comm: Communicator, cfg: DictConfig) -> dict:
    """The `serve` task on one rank; returns when rank 0 shuts the service down."""
    check_serve(cfg, comm.world_size)
    warm, job_config = WarmPipelines(comm, cfg.serve.max_warm), JobConfigs(cfg, comm.world_size)
    for height, width in cfg.serve.prewarm:
        request = GenerateRequest(prompt=cfg.prompt, height=height, width=width)
        worker.generate(comm, job_config(request), warm, request, None)
    if comm.rank != 0:
        _on_signals(signal.SIG_IGN)
        worker.run(comm, cfg, warm)
        return {"warm": warm.keys()}
    queue, metrics = JobQueue(cfg.serve.queue_size), ServiceMetrics()
    server, thread, port = start(create_app(cfg, queue, metrics, comm.world_size), cfg.serve.host, cfg.serve.port)
    print(f"distrifusion serve: {comm.world_size} ranks listening on http://{cfg.serve.host}:{port}", flush=True)
    _on_signals(lambda signum, _frame: queue.close(f"shutting down ({signal.Signals(signum).name})"))
    try:
        worker.run(comm, cfg, warm, queue, metrics)
    except CommError as e:
        queue.fail_all(f"{type(e).__name__}: {e}")
        log.error("rank 0: a rank failed (%s); answering 503 for %g s, then exiting", e, cfg.serve.linger_s)
        time.sleep(cfg.serve.linger_s)
        raise
    server.should_exit = True
    thread.join()  # the last responses go out before the process ends
    return {"warm": warm.keys(), "port": port}


def _on_signals(handler) -> None:
    """Handle SIGTERM and SIGINT with `handler` where this thread may (fake ranks are threads)."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, handler)
