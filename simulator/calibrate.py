"""Measure op times on a real device and write a `CalibrationProfile`.

    python -m simulator.calibrate --model tiny --resolution 256 --device cpu --dtype float32 \\
        --threads 1 --world-sizes 1 2 --modes sync_patch displaced naive_patch --no-split-cfg \\
        --out profile.json

For every configuration (world size x mode; world size 1 runs mode "none") it builds the
UNet with random weights on `--device`, patches it as rank `role_rank` of an emulated group
and runs two untimed steps (the synchronous one and the first displaced one). Then, per
repeat, one steady step with every aten op timed (`OpCounter(timed=True)`: synchronize and
perf_counter around each op), and one steady step timed whole without the counter.

A step's wall time exceeds the sum of its op times by the eager framework's own work (Python
modules, dispatch, allocation). That remainder, less the time of the emulated collectives'
copies, is spread evenly over the step's op launches, so a profile entry is the time of one
launch in an eager run, and the simulator, which charges it per launch, reproduces the
measured step. Entries of the same (kind, key) from several configurations are averaged.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from .compute_model import CalibrationProfile, ProfileEntry
from .op_counter import OpCounter, OpStat
from .unet_run import EmulatedUNet
from .workload import MODES


def measure(model: str, resolution: int, world_size: int, mode: str, device: str, dtype: torch.dtype,
            repeats: int, split_cfg: bool, cfg: bool) -> tuple[dict[tuple[str, str], OpStat], dict]:
    """Per-launch op totals over `repeats` steady steps (seconds include the spread framework
    overhead) and a summary of the configuration's timings."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
    counter = OpCounter(timed=True, sync=sync)
    run = EmulatedUNet(model, resolution, world_size, "none" if world_size == 1 else mode, counter, device=device,
                       dtype=dtype, cfg=cfg, warmup_steps=1, split_cfg=split_cfg)
    run.step()
    run.step()
    walls, comm = [], []
    for _ in range(repeats):
        with counter:
            run.step()
        busy = run.comm.busy_s
        if sync:
            sync()
        start = time.perf_counter()
        run.step()
        if sync:
            sync()
        walls.append(time.perf_counter() - start)
        comm.append(run.comm.busy_s - busy)
    run.finish()
    stats = counter.totals
    launches = sum(s.count for s in stats.values()) / repeats
    op_seconds = sum(s.seconds for s in stats.values()) / repeats
    wall, comm_s = statistics.median(walls), statistics.median(comm)
    overhead = max(0.0, wall - comm_s - op_seconds) / launches
    for s in stats.values():
        s.seconds += overhead * s.count
    summary = {"world_size": world_size, "mode": mode if world_size > 1 else "none", "step_wall_s": wall,
               "op_seconds": op_seconds, "emulated_comm_s": comm_s, "launches_per_step": launches,
               "overhead_per_launch_s": overhead}
    return stats, summary


def merge(tables: list[dict[tuple[str, str], OpStat]]) -> list[ProfileEntry]:
    """Average per launch over every configuration that ran (kind, key)."""
    total: dict[tuple[str, str], OpStat] = {}
    for table in tables:
        for k, s in table.items():
            t = total.setdefault(k, OpStat(s.kind, s.key))
            t.flops, t.bytes, t.count, t.seconds = t.flops + s.flops, t.bytes + s.bytes, t.count + s.count, \
                t.seconds + s.seconds
    return [ProfileEntry(s.kind, s.key, s.seconds / s.count, s.flops / s.count, s.bytes / s.count)
            for s in total.values()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulator.calibrate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", default=["sync_patch", "displaced", "naive_patch"],
                        choices=MODES)
    parser.add_argument("--split-cfg", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cfg", action=argparse.BooleanOptionalAction, default=True,
                        help="classifier-free guidance: batch 2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """CLI: measure every configuration, write the merged profile, print a summary per configuration."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    tables, summaries = [], []
    configs = [(ws, mode) for ws in args.world_sizes for mode in (["none"] if ws == 1 else args.modes)]
    for ws, mode in configs:
        stats, summary = measure(args.model, args.resolution, ws, mode, args.device, dtype, args.repeats,
                                 args.split_cfg, args.cfg)
        tables.append(stats)
        summaries.append(summary)
        print(json.dumps(summary))
    name = f"{args.device} ({torch.get_num_threads()} threads)" if args.device == "cpu" else args.device
    profile = CalibrationProfile(name, args.dtype, merge(tables))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(args.out)
    print(f"wrote {len(profile.entries)} entries to {args.out}")


if __name__ == "__main__":
    main()
