"""Measure this CPU's roofline for the `cpu_gloo_loopback` preset: matmul FLOP/s per dtype and
copy bandwidth, with the thread count the validation ranks use.

    OMP_NUM_THREADS=1 python bench/cpu_device.py

Prints one JSON object: `peak_flops` per dtype (best of 5 square matmuls, `SIZES`) and
`memory_bandwidth` (bytes read + written per second, best of 5 copies of 256 MiB).
"""

from __future__ import annotations

import json
import time

import torch

SIZES = {"float32": 2048, "bfloat16": 512, "float16": 512}  # half precision is slow without AMX
COPY_BYTES = 256 * 2**20


def best_seconds(fn, repeats: int = 5) -> float:
    """The fastest of `repeats` timed calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    """Measure and print."""
    peaks = {}
    for name, n in SIZES.items():
        a = torch.randn(n, n).to(getattr(torch, name))
        peaks[name] = 2 * n**3 / best_seconds(lambda: a @ a)
    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    bandwidth = 2 * COPY_BYTES / best_seconds(lambda: dst.copy_(src))
    print(json.dumps({"threads": torch.get_num_threads(), "peak_flops": peaks, "memory_bandwidth": bandwidth}))


if __name__ == "__main__":
    main()
