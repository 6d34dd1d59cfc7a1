"""bench/serve_load.py against a stand-in for the service (one generation at a time, a fixed
time each): distinct seeds, concurrent clients, errors counted by status, and the checks."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from distrifusion.serve.metrics import CONTENT_TYPE, ServiceMetrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import serve_load  # noqa: E402

sys.path.pop(0)

GENERATION_S = 0.06
FAILING_SEED = 3


@pytest.fixture(scope="module")
def stand_in():
    """The URL of a stand-in service, and the request bodies it received."""
    app, one_at_a_time, bodies, metrics = FastAPI(), threading.Lock(), [], ServiceMetrics()

    @app.post("/generate")
    def generate(body: dict) -> Response:
        bodies.append(body)
        if body["seed"] == FAILING_SEED:
            return JSONResponse({"detail": "failed on rank 1"}, status_code=500)
        with one_at_a_time:
            time.sleep(GENERATION_S)
            metrics.observe(GENERATION_S, GENERATION_S)
        return Response(b"\x89PNG", media_type="image/png")

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(0), media_type=CONTENT_TYPE)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", bodies
    server.should_exit = True
    thread.join()


def _run(url: str, capsys, *args: str) -> tuple[int, dict]:
    code = serve_load.main(["--url", url, *args])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_levels_seeds_errors_and_queueing(stand_in, capsys):
    url, bodies = stand_in
    bodies.clear()
    code, report = _run(url, capsys, "--requests", "8", "--concurrency", "1,4", "--steps", "3",
                        "--compare-batch", "100")
    seeds = [b["seed"] for b in bodies]
    assert sorted(seeds) == list(range(1 + 8 + 8)) and all(b["steps"] == 3 for b in bodies)
    single, four = report["levels"]
    assert (single["concurrency"], four["concurrency"]) == (1, 4)
    assert single["ok"] == 7 and single["errors"] == {"500": 1}  # the warm-up took seed 0
    assert four["ok"] == 8 and four["errors"] == {}
    assert single["latency_s"]["p50"] >= GENERATION_S
    assert [single["generation_mean_s"], four["generation_mean_s"]] == pytest.approx([GENERATION_S] * 2)
    # four requests always outstanding, one served at a time: from the fourth on each waits for
    # three others, so at least half the latencies are >= 3 generations
    assert four["latency_s"]["p50"] >= 3 * GENERATION_S
    assert four["latency_s"]["max"] >= four["latency_s"]["p99"] >= four["latency_s"]["p90"] >= four["latency_s"]["p50"]
    assert report["latency_ok"] is True and report["overhead_s"] < 0
    assert report["throughput_ok"] == (four["throughput_img_s"] >= single["throughput_img_s"])
    assert code == (0 if report["throughput_ok"] else 1)


def test_overhead_over_the_batch_time_fails(stand_in, capsys, tmp_path):
    url, _ = stand_in
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps({"generation_s": 0.0}))
    code, report = _run(url, capsys, "--requests", "1", "--rounds", "2", "--concurrency", "1", "--warmup", "0",
                        "--first-seed", "10", "--compare-batch", str(batch))
    assert report["levels"][0]["requests"] == report["levels"][0]["ok"] == 2 and report["batch_s"] == 0.0 and report["overhead_s"] >= GENERATION_S
    assert report["latency_ok"] is False and report["throughput_ok"] is None and code == 1


def test_the_batch_app_runs_once_per_round_in_turn_with_the_levels(stand_in, capsys, tmp_path):
    url, bodies = stand_in
    report_path, log = tmp_path / "batch.json", tmp_path / "turns.log"
    # a stand-in batch app: its n-th run reports generation_s = n / 10 and logs its turn
    command = (f"echo batch >> {log} && {sys.executable} -c \"import json; n = len(open('{log}').read().split()); "
               f"json.dump({{'generation_s': n / 10}}, open('{report_path}', 'w'))\"")
    bodies.clear()
    code, report = _run(url, capsys, "--requests", "1", "--rounds", "3", "--concurrency", "1,4", "--warmup", "0",
                        "--first-seed", "100", "--compare-batch", str(report_path), "--batch-command", command)
    assert log.read_text().split() == ["batch"] * 3 and len(bodies) == 6
    assert report["batch_runs_s"] == pytest.approx([0.1, 0.2, 0.3]) and report["batch_s"] == pytest.approx(0.2)
    assert report["overhead_s"] == pytest.approx(report["levels"][0]["latency_s"]["p50"] - 0.2)


def test_a_batch_command_that_fails_stops_the_run(stand_in, tmp_path):
    url, _ = stand_in
    with pytest.raises(SystemExit, match="--batch-command exited 3 without writing"):
        serve_load.main(["--url", url, "--requests", "1", "--concurrency", "1", "--warmup", "0",
                         "--compare-batch", str(tmp_path / "none.json"), "--batch-command", "exit 3"])
