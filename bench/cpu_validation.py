"""Measure real patch-parallel UNet step latency on CPU ranks (gloo), the simulator's ground truth.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/cpu_validation.py \\
        --modes sync_patch displaced naive_patch --no-split-cfg
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 1 bench/cpu_validation.py --modes none

Per mode: the model's UNet with random weights (seed 0) on CPU, float32, parallelized over
`backends.create("torch")` (gloo, no validation), fed the same seeded inputs on every rank.
One generation is `--steps` UNet calls (the first `--warmup-steps` synchronous), then the
context's `finish()`; its latency is the slowest rank's time from a common barrier to its
finish. One untimed 3-step generation warms up; the median of `--repeats` timed ones is
reported. Rank 0 prints one JSON line per mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import backends
from distrifusion import ParallelConfig, parallelize
from distrifusion.pipeline_factory import build_unet
from simulator.unet_run import unet_inputs


def generation(unet: torch.nn.Module, inputs: dict, steps: int, comm: backends.Communicator) -> float:
    """Seconds of one generation on the slowest rank."""
    ctx = getattr(unet.forward, "ctx", None)
    if ctx is not None:
        ctx.reset()
    comm.barrier()
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            unet(**inputs, return_dict=False)
    if ctx is not None:
        ctx.finish()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    return float(comm.all_reduce(elapsed, op="max").item())


def measure(comm: backends.Communicator, args: argparse.Namespace, mode: str) -> dict:
    """Median generation latency of `mode` over `args.repeats` runs."""
    unet = build_unet(args.model, "cpu", torch.float32)
    config = ParallelConfig(mode=mode, warmup_steps=args.warmup_steps, split_cfg=args.split_cfg)
    parallelize(unet, comm, config)
    inputs = unet_inputs(args.model, args.resolution, 2, torch.float32, "cpu")
    generation(unet, inputs, 3, comm)
    runs = [generation(unet, inputs, args.steps, comm) for _ in range(args.repeats)]
    return {"model": args.model, "resolution": args.resolution, "world_size": comm.world_size, "mode": mode,
            "split_cfg": args.split_cfg, "steps": args.steps, "warmup_steps": args.warmup_steps,
            "threads": torch.get_num_threads(), "latency_s": statistics.median(runs), "runs_s": runs}


def main() -> None:
    """CLI: measure every mode, print JSON lines on rank 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--modes", nargs="+", default=["sync_patch", "displaced", "naive_patch"])
    parser.add_argument("--split-cfg", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with backends.create("torch", validate=False) as comm:
        for mode in args.modes:
            result = measure(comm, args, mode)
            if comm.rank == 0:
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
