"""The image service (task=serve): a 2-rank gloo service under torchrun answering concurrent
clients, bad requests among them, with the batch app's images; its end when a rank dies, and when
asked to stop; and, in-process on fake ranks, a job that fails without stopping the service."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

import backends
from distrifusion.serve import worker
from distrifusion.serve.http import create_app
from distrifusion.serve.job import JobQueue
from distrifusion.serve.metrics import ServiceMetrics
from distrifusion.serve.warm import WarmPipelines
from launchers import launch_command, rank_env
from test_bad_input import config

TIMEOUT = 10.0  # backend.timeout of the services: a dead rank must end the others within it
STEPS = 4
SERVICE = ("task=serve", "backend=torch", f"backend.timeout={TIMEOUT:g}", f"sampler.steps={STEPS}",
           "serve.port=0", "serve.linger_s=3", "serve.max_steps=30", "serve.prewarm=[[64,64]]")
# torchrun SIGTERMs the other ranks 0.1 s after one died; polling every 5 s shows the service end on its own.
MONITOR_S = 5
TORCHRUN_ARGS = (f"--monitor-interval={MONITOR_S}",)


class Service:
    """A 2-rank service under torchrun; `url` once rank 0 listens, `output` what the ranks printed."""

    def __init__(self, *overrides: str):
        cmd, env = launch_command("torch", 2)
        self.proc = subprocess.Popen([*cmd[:1], *TORCHRUN_ARGS, *cmd[1:], sys.executable, "-m", "distrifusion",
                                      *SERVICE, *overrides], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        deadline = time.monotonic() + 180
        while not (url := re.search(r"listening on (http://\S+)", self.output)):
            assert self.proc.poll() is None and time.monotonic() < deadline, f"no service:\n{self.output[-3000:]}"
            time.sleep(0.1)
        self.url = url[1]
        self.pids = self.workers()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def workers(self) -> dict[int, int]:
        """The pid of every worker process (a child of torchrun, RANK in its environment), by rank."""
        found = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                ppid = int(re.search(r"PPid:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1])
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except (OSError, TypeError):
                continue
            ranks = [int(v[5:]) for v in environ if v.startswith(b"RANK=")]
            if ppid == self.proc.pid and ranks:
                found[ranks[0]] = int(pid)
        return found

    def rank_pid(self, rank: int) -> int:
        pid = self.workers().get(rank)
        assert pid is not None, f"no rank {rank} among torchrun's children"
        return pid

    def stop(self) -> None:
        """Kill torchrun and its workers (torchrun starts them in sessions of their own, so
        killing its process group alone would leave them serving, orphaned)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self.pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


def running(pid: int) -> bool:
    """Whether process `pid` runs (an exited child its parent has not reaped yet does not)."""
    try:
        state = re.search(r"State:\s+(\w)", Path(f"/proc/{pid}/status").read_text())[1]
    except (OSError, TypeError):
        return False
    return state not in "ZX"


@pytest.fixture
def service():
    running = Service()
    yield running
    running.stop()


def batch_png(tmp_path: Path, prompt: str, seed: int) -> bytes:
    """The batch app's image of `prompt` and `seed` at the service's settings, on 2 fake ranks."""
    proc = subprocess.run([sys.executable, "-m", "distrifusion", "backend=fake", "world_size=2", f"seed={seed}",
                           f"prompt={prompt}", f"sampler.steps={STEPS}", f"output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120, env=rank_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (tmp_path / f"tiny_displaced_2ranks_seed{seed}.png").read_bytes()


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE)[1])


GOOD = [{"prompt": "a lighthouse", "seed": seed} for seed in range(5)] + [
    {"prompt": "a lighthouse", "seed": 1, "output": "latents"}]
BAD = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "steps": 31}, "serve.max_steps=30"),
    ({"prompt": "x", "height": 128}, "height=128 width=64"),
    ({"prompt": "x", "mode": "fast"}, "mode"),
]


def test_service_serves_concurrent_clients_the_batch_apps_images_and_ends_when_a_rank_dies(service, tmp_path):
    with httpx.Client(base_url=service.url, timeout=120) as client, ThreadPoolExecutor(10) as pool:
        job = client.post("/jobs", json={"prompt": "a lighthouse", "seed": 7, "steps": 30}).json()["id"]
        good = [pool.submit(client.post, "/generate", json=body) for body in GOOD]
        bad = [pool.submit(client.post, "/generate", json=body) for body, _ in BAD]
        bad.append(pool.submit(client.post, "/generate", content=b"{not json", headers={"content-type": "application/json"}))
        seen = []
        while (status := client.get(f"/jobs/{job}").json())["state"] not in ("done", "failed"):
            seen.append(status["steps_done"])
            time.sleep(0.02)
        good, bad = [f.result() for f in good], [f.result() for f in bad]
        result = client.get(f"/jobs/{job}/result")
        health, metrics = client.get("/health"), client.get("/metrics").text
        unknown = client.get("/jobs/nope/result")

    assert [r.status_code for r in good] == [200] * len(GOOD), [r.text for r in good]
    pngs = [r.content for r in good[:5]]
    assert all(r.headers["content-type"] == "image/png" for r in good[:5]) and len(set(pngs)) == 5
    latents = np.load(io.BytesIO(good[5].content))
    assert latents.dtype == np.float32 and latents.shape == (1, 4, 32, 32)
    for response, (_, reason) in zip(bad, BAD + [(None, "JSON")]):
        assert response.status_code == 422 and reason in response.json()["detail"], response.text
    assert status == {"id": job, "state": "done", "steps_done": 30, "steps": 30, "error": None,
                      "latency_s": status["latency_s"]} and status["latency_s"] > 0
    assert any(0 < done < 30 for done in seen), f"no progress seen while running: {seen}"
    assert result.status_code == 200 and result.content not in pngs and unknown.status_code == 404
    assert health.json() == {"status": "ok", "ranks": 2, "queue": 0}
    served = len(GOOD) + 1
    assert metric(metrics, "distrifusion_images_served_total") == served
    assert metric(metrics, "distrifusion_request_latency_seconds_count") == served
    assert metric(metrics, "distrifusion_requests_rejected_total") == len(BAD) + 1
    assert metric(metrics, "distrifusion_requests_failed_total") == 0
    assert pngs[3] == batch_png(tmp_path, "a lighthouse", 3)

    os.kill(service.rank_pid(1), signal.SIGKILL)
    killed = time.monotonic()
    unhealthy = None
    while service.proc.poll() is None and unhealthy is None and time.monotonic() - killed < TIMEOUT:
        response = httpx.get(f"{service.url}/health")
        unhealthy = response.json() if response.status_code == 503 else None
        time.sleep(0.05)
    assert unhealthy is not None and unhealthy["status"] == "unhealthy", service.output[-3000:]
    rank0 = service.pids[0]
    while running(rank0) and time.monotonic() - killed < TIMEOUT:
        time.sleep(0.05)
    assert not running(rank0), f"rank 0 still runs {TIMEOUT:g} s after rank 1 died:\n{service.output[-3000:]}"
    # torchrun itself notices at its next poll, and ends non-zero
    assert service.proc.wait(timeout=MONITOR_S + TIMEOUT) != 0, service.output[-3000:]
    assert "rank 0: a rank failed" in service.output


def test_sigterm_drains_the_queue_and_exits_zero(service):
    with httpx.Client(base_url=service.url, timeout=120) as client, ThreadPoolExecutor(3) as pool:
        waiting = [pool.submit(client.post, "/generate", json={"prompt": "x", "seed": s, "steps": 10}) for s in range(3)]
        while client.get("/health").json()["queue"] < 2:
            time.sleep(0.01)
        os.kill(service.rank_pid(0), signal.SIGTERM)
        time.sleep(0.2)
        refused = client.post("/generate", json={"prompt": "late"})
        answers = [f.result() for f in waiting]
    assert refused.status_code == 503 and "shutting down (SIGTERM)" in refused.json()["detail"]
    assert [r.status_code for r in answers] == [200] * 3
    assert service.proc.wait(timeout=TIMEOUT) == 0, service.output[-3000:]


@pytest.mark.timeout(60)  # a worker that died with the job would leave its request waiting
def test_a_job_failing_on_every_rank_fails_alone(monkeypatch):
    cfg = config("sampler.steps=2")
    generate = worker.generate

    def failing(comm, cfg, warm, request, job):
        if request.prompt == "boom":
            raise RuntimeError(f"rank {comm.rank} cannot")
        return generate(comm, cfg, warm, request, job)

    monkeypatch.setattr(worker, "generate", failing)
    queue, metrics = JobQueue(4), ServiceMetrics()

    def rank(comm):
        worker.run(comm, cfg, WarmPipelines(comm, 1), *((queue, metrics) if comm.rank == 0 else ()))

    ranks = threading.Thread(target=backends.launch, args=("fake", rank), kwargs={"world_size": 2})
    ranks.start()
    with TestClient(create_app(cfg, queue, metrics, 2)) as client:
        failed = client.post("/generate", json={"prompt": "boom"})
        served = client.post("/generate", json={"prompt": "fine"})
    queue.close("test over")
    ranks.join(timeout=30)
    assert failed.status_code == 500 and failed.json()["detail"] == "RuntimeError: rank 0 cannot"
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert "distrifusion_requests_failed_total 1" in metrics.render(0) and not ranks.is_alive()


@pytest.mark.timeout(60)
def test_ranks_stop_when_their_launcher_is_gone(monkeypatch):
    cfg = config("backend.timeout=2")  # idle rounds every 0.5 s
    parents = iter([4242] * 4)  # each rank's start and first rounds see its launcher, then pid 1
    monkeypatch.setattr(worker.os, "getppid", lambda: next(parents, 1))

    def rank(comm):
        worker.run(comm, cfg, WarmPipelines(comm, 1), *((JobQueue(4), ServiceMetrics()) if comm.rank == 0 else ()))

    with pytest.raises(backends.CommError, match="launcher .pid 4242. is gone"):
        backends.launch("fake", rank, world_size=2)
