"""Measure all-gather latency and bandwidth of gloo over loopback, for the `cpu_gloo_loopback` preset.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/gloo_loopback.py

Times back-to-back `all_gather`s through `backends.create("torch")` (gloo on CPU, no
validation) for per-rank sizes from 1 KiB to 4 MiB (the median of 5 batches of 20 after a
barrier), then fits the simulator's ring model t = (g-1) * alpha + (g-1) * bytes / bandwidth
by least squares on relative error (every size counts alike). Rank 0 prints a table and,
last, one JSON object with `alpha_s`, `bandwidth_Bps` and the measured points.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

import backends

SIZES = [2**k for k in range(10, 23, 2)]  # bytes per rank: 1 KiB .. 4 MiB
BATCHES, PER_BATCH = 5, 20


def median_time(comm: backends.Communicator, nbytes: int) -> float:
    """Median over batches of the mean seconds of one all_gather of `nbytes` per rank (float32)."""
    x = torch.ones(nbytes // 4)
    out = torch.empty((comm.world_size, x.numel()))
    for _ in range(3):
        comm.all_gather(x, out=out)
    times = []
    for _ in range(BATCHES):
        comm.barrier()
        start = time.perf_counter()
        for _ in range(PER_BATCH):
            comm.all_gather(x, out=out)
        times.append((time.perf_counter() - start) / PER_BATCH)
    return statistics.median(times)


def fit(g: int, points: list[tuple[int, float]]) -> tuple[float, float]:
    """(alpha, bandwidth) of t = (g-1)*alpha + (g-1)*n/bw minimising the squared relative error."""
    rows = [((g - 1) * n, t) for n, t in points]
    # weighted normal equations of t ~ a + b*x with weights 1/t^2
    sw = sum(1 / t**2 for _, t in rows)
    sx = sum(x / t**2 for x, t in rows)
    sxx = sum(x * x / t**2 for x, t in rows)
    sy = sum(1 / t for _, t in rows)
    sxy = sum(x / t for x, t in rows)
    b = (sw * sxy - sx * sy) / (sw * sxx - sx * sx)
    a = (sy - b * sx) / sw
    return a / (g - 1), 1.0 / b


def main() -> None:
    """Measure every size, fit, print on rank 0."""
    with backends.create("torch", validate=False) as comm:
        points = [(n, median_time(comm, n)) for n in SIZES]
        if comm.rank == 0:
            alpha, bandwidth = fit(comm.world_size, points)
            for n, t in points:
                print(f"{n:>10} B/rank  {t * 1e6:>10.1f} us  {(comm.world_size - 1) * n / t / 1e9:6.2f} GB/s sent")
            print(json.dumps({"world_size": comm.world_size, "threads": torch.get_num_threads(), "alpha_s": alpha,
                              "bandwidth_Bps": bandwidth, "points": points}))


if __name__ == "__main__":
    main()
