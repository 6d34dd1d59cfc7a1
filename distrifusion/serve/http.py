"""The HTTP API of the service, on rank 0: FastAPI, served by uvicorn in a thread of its own.

Why FastAPI + uvicorn: a maintained ASGI stack, used widely for model serving; pydantic checks
request bodies against `GenerateRequest` and answers what is wrong before anything is queued;
async endpoints let many clients wait on their jobs without a thread each, while rank 0's main
thread stays free for the collectives. The API (README, "Serving"):

- POST /generate: the image (image/png, or the latents as a float32 .npy) once generated.
- POST /jobs -> 202 {"id"}; GET /jobs/{id} -> its state and steps done; GET /jobs/{id}/result.
- GET /health -> 200, or 503 once a rank failed; GET /metrics -> Prometheus text format 0.0.4.

A bad request is answered 422 {"detail": reason}; a full queue 503 with Retry-After; a job
that failed 500 with the reason.
"""

from __future__ import annotations

import asyncio
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from omegaconf import DictConfig

from .job import Job, JobQueue, Rejected
from .metrics import ServiceMetrics
from .request import GenerateRequest, JobConfigs

MEDIA_TYPES = {"png": "image/png", "latents": "application/octet-stream"}
PROMETHEUS = "text/plain; version=0.0.4"


def create_app(cfg: DictConfig, queue: JobQueue, metrics: ServiceMetrics, world_size: int) -> FastAPI:
    """The ASGI app answering for a service of `world_size` ranks configured by `cfg`."""
    app, job_config = FastAPI(title="distrifusion"), JobConfigs(cfg, world_size)

    def reject(status: int, reason: str, **headers: str) -> JSONResponse:
        metrics.rejected()
        return JSONResponse({"detail": reason}, status_code=status, headers=headers)

    def submit(request: GenerateRequest) -> Job | JSONResponse:
        try:
            return queue.submit(Job(request, job_config(request)))
        except ValueError as e:
            return reject(422, str(e))
        except Rejected as e:
            return reject(503, str(e), **({"Retry-After": "1"} if e.retry else {}))

    def result(job: Job) -> Response:
        if job.state == "failed":
            return JSONResponse({"detail": job.error}, status_code=503 if queue.unhealthy else 500)
        return Response(job.result, media_type=MEDIA_TYPES[job.request.output])

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        return reject(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()))

    @app.post("/generate")
    async def generate(request: GenerateRequest) -> Response:
        job = submit(request)
        if isinstance(job, Response):
            return job
        loop, finished = asyncio.get_running_loop(), asyncio.Event()
        job.when_finished(lambda: loop.call_soon_threadsafe(finished.set))
        await finished.wait()
        return result(job)

    @app.post("/jobs", status_code=202)
    async def submit_job(request: GenerateRequest) -> Response:
        job = submit(request)
        return job if isinstance(job, Response) else JSONResponse({"id": job.id}, status_code=202)

    @app.get("/jobs/{job_id}")
    async def status(job_id: str) -> Response:
        job = queue.get(job_id)
        return JSONResponse(job.status()) if job else JSONResponse({"detail": "no such job"}, status_code=404)

    @app.get("/jobs/{job_id}/result")
    async def job_result(job_id: str) -> Response:
        job = queue.get(job_id)
        if job is None:
            return JSONResponse({"detail": "no such job"}, status_code=404)
        if not job.finished:
            return JSONResponse({"detail": f"job {job.state}"}, status_code=409)
        return result(job)

    @app.get("/health")
    async def health() -> Response:
        if queue.unhealthy:
            return JSONResponse({"status": "unhealthy", "reason": queue.unhealthy}, status_code=503)
        return JSONResponse({"status": "ok", "ranks": world_size, "queue": len(queue)})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(len(queue)), media_type=PROMETHEUS)

    return app


def start(app: FastAPI, host: str, port: int) -> tuple[uvicorn.Server, threading.Thread, int]:
    """Serve `app` on `host`:`port` (0: a free port) from a daemon thread; returns the server, the
    thread and the port."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the HTTP server could not start on {host}:{port} (see the log above)")
        time.sleep(0.01)
    return server, thread, server.servers[0].sockets[0].getsockname()[1]
