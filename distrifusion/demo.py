"""The all-gather demo: every rank contributes a tensor, all-gathers it, checks and times it."""

from __future__ import annotations

import statistics
import time

import torch

from backends import Communicator


def allgather_demo(comm: Communicator, mib: float = 64.0, repeats: int = 5) -> dict:
    """All-gather `mib` MiB of float32 from each rank `repeats` times; verify and time it."""
    numel = int(mib * 2**20) // 4
    mine = torch.full((numel,), float(comm.rank), device=comm.device)
    out = torch.empty((comm.world_size, numel), device=comm.device)
    times = []
    for _ in range(repeats):
        comm.barrier()
        start = time.perf_counter()
        comm.all_gather(mine, out=out)
        times.append(time.perf_counter() - start)
    expected = torch.arange(comm.world_size, dtype=out.dtype, device=out.device)
    ok = bool((out[:, :: max(1, numel // 1024)] == expected[:, None]).all())
    return {"rank": comm.rank, "world_size": comm.world_size, "mib_per_rank": mib,
            "out_shape": list(out.shape), "median_s": statistics.median(times), "verified": ok}
