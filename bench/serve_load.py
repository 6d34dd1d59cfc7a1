"""Load test of a running image service (`python -m distrifusion task=serve`): throughput and
latency of N requests at each concurrency C, and the service's overhead against the batch app.

    python bench/serve_load.py --url http://127.0.0.1:8000 --requests 20 --concurrency 1,4 [--rounds 3] \
        [--compare-batch outputs/tiny_displaced_2ranks_seed0.json | SECONDS] [--steps 20 ...]

Each of C client threads posts to /generate until N requests have been made at that level, each
with a seed of its own (no two requests of the run share one); `--warmup` requests go first and
are not counted, so the measured service is warm. `--rounds R` runs the levels R times in turn
and pools each level's requests, so that a shared machine's slow spells hit every level alike.
Per level: images per second (the 200s over the level's wall time), latency percentiles of the
200s (nearest rank, as GET /metrics reports them) and the errors by status code; where the
service answers GET /metrics, also the mean generation time of the level's requests
(`distrifusion_generation_seconds` before and after), so that the service's own overhead (queue,
HTTP, encoding) is the mean latency less it. Ends with a table and one JSON line.

`--compare-batch`: the batch app's generation time for the same config, as seconds or as the
path of its JSON report (`generation_s`: decode included). `--batch-command CMD` runs the batch app
(CMD, in a shell, writing that report) once per round, in turn with the levels, and compares with
the median of its runs: a shared machine's slow spells last tens of seconds, so a batch time taken
before the service started says little about the service's. The service adds no real overhead when the median latency at
concurrency 1 is at most 5% + 50 ms over it; the queue keeps the ranks busy when the throughput
at the highest concurrency is at least that at concurrency 1. Exits 1 if a check that could be
made failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distrifusion.serve.metrics import nearest_rank  # noqa: E402

PERCENTILES = {"p50": "0.5", "p90": "0.9", "p99": "0.99"}
OVERHEAD_FRACTION, OVERHEAD_S = 0.05, 0.05


def generation_totals(http: httpx.Client) -> tuple[float, int] | None:
    """The service's (sum, count) of `distrifusion_generation_seconds`; None without /metrics."""
    try:
        response = http.get("/metrics")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    samples = dict(line.rsplit(" ", 1) for line in response.text.splitlines() if line and not line.startswith("#"))
    return float(samples["distrifusion_generation_seconds_sum"]), int(samples["distrifusion_generation_seconds_count"])


@dataclass
class Level:
    """What one concurrency's requests gave, over every round."""

    concurrency: int
    latencies: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    wall_s: float = 0.0
    generation_s: float = 0.0
    generated: int = 0

    def run(self, url: str, body: dict, requests: int, seeds: Iterator[int], timeout_s: float) -> None:
        """Post `body` to /generate `requests` times from `concurrency` threads, each time with
        the next of `seeds`, and add what came back."""
        lock, left = threading.Lock(), iter(range(requests))

        def client() -> None:
            with httpx.Client(base_url=url, timeout=timeout_s) as http:
                while True:
                    with lock:
                        if next(left, None) is None:
                            return
                        seed = next(seeds)
                    start = time.perf_counter()
                    try:
                        outcome = http.post("/generate", json=body | {"seed": seed}).status_code
                    except httpx.HTTPError as e:
                        outcome = type(e).__name__
                    elapsed = time.perf_counter() - start
                    with lock:
                        if outcome == 200:
                            self.latencies.append(elapsed)
                        else:
                            self.errors[str(outcome)] += 1

        threads = [threading.Thread(target=client) for _ in range(self.concurrency)]
        with httpx.Client(base_url=url, timeout=timeout_s) as http:
            before = generation_totals(http)
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.wall_s += time.perf_counter() - start
        with httpx.Client(base_url=url, timeout=timeout_s) as http:
            after = generation_totals(http)
        if before and after:
            self.generation_s += after[0] - before[0]
            self.generated += after[1] - before[1]

    def summary(self) -> dict:
        """Throughput, latency percentiles, errors and the mean generation time, as JSON."""
        ordered = sorted(self.latencies)
        latency = ({k: nearest_rank(ordered, q) for k, q in PERCENTILES.items()} | {"max": ordered[-1]}
                   if ordered else {})
        return {"concurrency": self.concurrency, "requests": len(ordered) + sum(self.errors.values()),
                "ok": len(ordered), "errors": dict(self.errors), "wall_s": self.wall_s,
                "throughput_img_s": len(ordered) / self.wall_s, "latency_s": latency,
                "latency_mean_s": sum(ordered) / len(ordered) if ordered else None,
                "generation_mean_s": self.generation_s / self.generated if self.generated else None}


def batch_seconds(value: str) -> float:
    """`--compare-batch`: seconds, or the batch app's JSON report whose `generation_s` (the whole
    generation, decode included, as a request's) they are."""
    try:
        return float(value)
    except ValueError:
        return float(json.loads(Path(value).read_text())["generation_s"])


def run_batch(command: str, report: str) -> float:
    """Run the batch app (`command`, in a shell) and return the `generation_s` of its `report`."""
    Path(report).unlink(missing_ok=True)
    done = subprocess.run(command, shell=True, capture_output=True, text=True)
    if done.returncode != 0 or not Path(report).exists():
        raise SystemExit(f"--batch-command exited {done.returncode} without writing {report}:\n{done.stderr[-2000:]}")
    return batch_seconds(report)


def verdict(levels: list[dict], batch_s: float | None) -> dict:
    """The issue's two checks, each None where the levels or the batch time do not allow it."""
    by_c = {level["concurrency"]: level for level in levels}
    single, busiest = by_c.get(1), by_c[max(by_c)]
    out: dict = {"batch_s": batch_s, "overhead_s": None, "latency_ok": None, "throughput_ok": None}
    if single and single["latency_s"] and batch_s is not None:
        median = single["latency_s"]["p50"]
        out["overhead_s"] = median - batch_s
        out["latency_ok"] = median <= batch_s * (1 + OVERHEAD_FRACTION) + OVERHEAD_S
    if single and busiest is not single:
        out["throughput_ok"] = busiest["throughput_img_s"] >= single["throughput_img_s"]
    return out


def table(levels: list[dict], checks: dict) -> str:
    """The levels as a text table, then the checks in words."""
    rows = ["concurrency  requests   ok  errors        img/s   p50 s   p90 s   p99 s   max s"]
    for lv in levels:
        lat = [f"{lv['latency_s'][k]:7.3f}" if lv["latency_s"] else "      -" for k in (*PERCENTILES, "max")]
        errors = ",".join(f"{k}x{v}" for k, v in lv["errors"].items()) or "0"
        rows.append(f"{lv['concurrency']:11d}  {lv['requests']:8d} {lv['ok']:4d}  {errors:>6s}  "
                    f"{lv['throughput_img_s']:11.3f} {' '.join(lat)}")
    single = next((lv for lv in levels if lv["concurrency"] == 1), None)
    if single and single["generation_mean_s"] is not None and single["latency_mean_s"] is not None:
        rows.append(f"at concurrency 1 the service generated for {single['generation_mean_s']:.3f} s of a mean "
                    f"latency of {single['latency_mean_s']:.3f} s (the rest: queue, HTTP, encoding)")
    if checks["latency_ok"] is not None:
        rows.append(f"median latency at concurrency 1 vs the batch app's {checks['batch_s']:.3f} s: "
                    f"{checks['overhead_s']:+.3f} s ({'within' if checks['latency_ok'] else 'over'} "
                    f"{OVERHEAD_FRACTION:.0%} + {1e3 * OVERHEAD_S:.0f} ms)")
    if checks["throughput_ok"] is not None:
        rows.append(f"throughput at concurrency {levels[-1]['concurrency']} "
                    f"{'>=' if checks['throughput_ok'] else '<'} at concurrency 1")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=20, help="requests per concurrency level and round")
    parser.add_argument("--concurrency", default="1,4", help="comma-separated levels, run in this order")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the levels this many times in turn, so that a machine's drift hits each alike")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted requests first, one at a time")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--compare-batch", default=None, metavar="SECONDS|REPORT.json")
    parser.add_argument("--batch-command", default=None, metavar="CMD",
                        help="run the batch app (writing --compare-batch's report) once per round, in turn with the levels")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--prompt", default="a watercolor painting of a lighthouse at dawn")
    for name, kind in (("negative-prompt", str), ("steps", int), ("guidance-scale", float), ("height", int),
                       ("width", int), ("mode", str), ("output", str)):
        parser.add_argument(f"--{name}", type=kind, default=None, help="the service's default if not given")
    args = parser.parse_args(argv)
    if args.batch_command and args.compare_batch is None:
        parser.error("--batch-command needs --compare-batch REPORT.json: the report it writes")
    fields = ("prompt", "negative_prompt", "steps", "guidance_scale", "height", "width", "mode", "output")
    body = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    seeds = iter(range(args.first_seed, sys.maxsize))
    if args.warmup:
        Level(1).run(args.url, body, args.warmup, seeds, args.timeout)
    levels = {c: Level(c) for c in map(int, args.concurrency.split(","))}
    batch_runs: list[float] = []
    turns = [*levels.values(), None] if args.batch_command else [*levels.values()]
    for r in range(args.rounds):
        for turn in turns[r % len(turns):] + turns[:r % len(turns)]:  # each round starts one later
            if turn is None:
                batch_runs.append(run_batch(args.batch_command, args.compare_batch))
            else:
                turn.run(args.url, body, args.requests, seeds, args.timeout)
    levels = [level.summary() for level in levels.values()]
    batch_s = statistics.median(batch_runs) if batch_runs else (
        None if args.compare_batch is None else batch_seconds(args.compare_batch))
    checks = verdict(levels, batch_s)
    print(table(levels, checks))
    print(json.dumps({"url": args.url, "request": body, "levels": levels, "batch_runs_s": batch_runs} | checks))
    return 1 if False in (checks["latency_ok"], checks["throughput_ok"]) else 0


if __name__ == "__main__":
    sys.exit(main())
