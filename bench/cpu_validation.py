"""Measure real patch-parallel UNet generations on CPU ranks (gloo): the simulator's ground truth.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/cpu_validation.py \\
        --modes sync_patch displaced naive_patch --no-split-cfg --profile p2.json > m2.jsonl
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 1 bench/cpu_validation.py --modes none \\
        --profile p1.json > m1.jsonl
    python bench/cpu_compare.py m1.jsonl m2.jsonl

Per mode: the model's UNet with random weights (seed 0) on CPU, float32, parallelized over
`backends.create("torch")` (gloo, no validation), fed the same seeded inputs on every rank.
One generation is `--steps` UNet calls (the first `--warmup-steps` synchronous), then the
context's `finish()`; its latency is the slowest rank's time from a common barrier to its
finish. After an untimed 3-step generation per mode, every repeat runs, per mode, one
calibration sample and one timed generation, so that calibration and measurement see the same
CPU contention (every rank calibrates at the same time, as every rank computes in a real
run) and the same drift of this shared machine. The calibration (`simulator.calibrate`,
rank 0's samples) times the emulated rank's ops and never sees the real communication.
Rank 0 writes the profile and prints one JSON line per mode (median over repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import backends
from distrifusion import ParallelConfig, parallelize
from distrifusion.pipeline_factory import build_unet
from simulator.calibrate import Calibration, device_name, merge
from simulator.compute_model import CalibrationProfile
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


def parallel_unet(comm: backends.Communicator, args: argparse.Namespace, mode: str) -> torch.nn.Module:
    """A fresh random-weight UNet patched for `mode` (patching is in place, one UNet per mode)."""
    unet = build_unet(args.model, "cpu", torch.float32)
    return parallelize(unet, comm, ParallelConfig(mode=mode, warmup_steps=args.warmup_steps,
                                                  split_cfg=args.split_cfg))


def main() -> None:
    """CLI: calibrate and measure every mode, interleaved; rank 0 writes the profile and prints."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--modes", nargs="+", default=["sync_patch", "displaced", "naive_patch"])
    parser.add_argument("--split-cfg", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", type=Path, required=True, help="where rank 0 writes the calibration")
    args = parser.parse_args()
    inputs = unet_inputs(args.model, args.resolution, 2, torch.float32, "cpu")
    with backends.create("torch", validate=False) as comm:
        unets = {mode: parallel_unet(comm, args, mode) for mode in args.modes}
        cals = {mode: Calibration(args.model, args.resolution, comm.world_size, mode, "cpu", torch.float32,
                                  args.split_cfg) for mode in args.modes}
        runs: dict[str, list[float]] = {mode: [] for mode in args.modes}
        for mode in args.modes:
            generation(unets[mode], inputs, 3, comm)
        for _ in range(args.repeats):
            for mode in args.modes:
                comm.barrier()
                cals[mode].sample()
                runs[mode].append(generation(unets[mode], inputs, args.steps, comm))
        if comm.rank != 0:
            return
        results = {mode: cals[mode].result() for mode in args.modes}
        profile = CalibrationProfile(device_name("cpu"), "float32", merge([stats for stats, _ in results.values()]))
        profile.save(args.profile)
        for mode in args.modes:
            print(json.dumps({"model": args.model, "resolution": args.resolution, "world_size": comm.world_size,
                              "mode": mode, "split_cfg": args.split_cfg, "steps": args.steps,
                              "warmup_steps": args.warmup_steps, "threads": torch.get_num_threads(),
                              "latency_s": statistics.median(runs[mode]), "runs_s": runs[mode],
                              "profile": str(args.profile.resolve()), "calibration": results[mode][1]}),
                  flush=True)


if __name__ == "__main__":
    main()
