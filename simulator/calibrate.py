"""Measure op times on a real device and write a `CalibrationProfile`.

    python -m simulator.calibrate --model tiny --resolution 256 --device cpu --dtype float32 \\
        --threads 1 --world-sizes 1 2 --modes sync_patch displaced naive_patch --no-split-cfg \\
        --out profile.json

For every configuration (world size x mode; world size 1 runs mode "none") a `Calibration`
builds the UNet with random weights on `--device`, patches it as rank `role_rank` of an
emulated group and runs two untimed steps (the synchronous one and the first displaced one).
Each `sample()` then runs one steady step with every aten op timed (`OpCounter(timed=True)`:
synchronize and perf_counter around each op) and one steady step timed whole, without it.

A step's wall time exceeds the sum of its op times by the eager framework's own work (Python
modules, dispatch, allocation). That remainder (median over samples), less the time of the
emulated collectives' copies, is spread evenly over the step's op launches, so a profile
entry is the time of one launch in an eager run, and the simulator, which charges it per
launch, reproduces the measured step. Entries of the same (kind, key) from several
configurations are averaged.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from .compute_model import CalibrationProfile, ProfileEntry
from .op_counter import OpCounter, OpStat
from .unet_run import EmulatedUNet
from .workload import MODES


class Calibration:
    """Op times of one emulated configuration, sampled one step pair at a time."""

    def __init__(self, model: str, resolution: int, world_size: int, mode: str, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, split_cfg: bool = True, cfg: bool = True):
        sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
        self.counter = OpCounter(timed=True, sync=sync)
        self.mode = "none" if world_size == 1 else mode
        self.run = EmulatedUNet(model, resolution, world_size, self.mode, self.counter, device=device,
                                dtype=dtype, cfg=cfg, warmup_steps=1, split_cfg=split_cfg)
        self.run.step()
        self.run.step()
        self.walls: list[float] = []
        self.comm: list[float] = []

    def sample(self) -> None:
        """One steady step with its ops timed, one timed whole."""
        with self.counter:
            self.run.step()
        busy = self.run.comm.busy_s
        start = self.counter.clock()
        self.run.step()
        self.walls.append(self.counter.clock() - start)
        self.comm.append(self.run.comm.busy_s - busy)

    def result(self) -> tuple[dict[tuple[str, str], OpStat], dict]:
        """Op totals over the samples, framework overhead spread per launch, and a summary."""
        n = len(self.walls)
        if n == 0:
            raise RuntimeError("Calibration.result() needs at least one sample()")
        totals = self.counter.totals
        launches = sum(s.count for s in totals.values()) / n
        op_seconds = sum(s.seconds for s in totals.values()) / n
        wall, comm = statistics.median(self.walls), statistics.median(self.comm)
        overhead = max(0.0, wall - comm - op_seconds) / launches
        stats = {k: replace(s, seconds=s.seconds + overhead * s.count) for k, s in totals.items()}
        summary = {"world_size": self.run.comm.world_size, "mode": self.mode, "samples": n, "step_wall_s": wall,
                   "op_seconds": op_seconds, "emulated_comm_s": comm, "launches_per_step": launches,
                   "overhead_per_launch_s": overhead}
        return stats, summary


def merge(tables: list[dict[tuple[str, str], OpStat]]) -> list[ProfileEntry]:
    """Per-launch entries, averaged over every configuration that ran (kind, key)."""
    total: dict[tuple[str, str], OpStat] = {}
    for table in tables:
        for k, s in table.items():
            t = total.setdefault(k, OpStat(s.kind, s.key))
            t.flops += s.flops
            t.bytes += s.bytes
            t.count += s.count
            t.seconds += s.seconds
    return [ProfileEntry(s.kind, s.key, s.seconds / s.count, s.flops / s.count, s.bytes / s.count)
            for s in total.values()]


def device_name(device: str) -> str:
    """The profile's device label (CPU with its thread count)."""
    return f"cpu ({torch.get_num_threads()} threads)" if device == "cpu" else device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulator.calibrate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", default=["sync_patch", "displaced", "naive_patch"], choices=MODES)
    parser.add_argument("--split-cfg", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cfg", action=argparse.BooleanOptionalAction, default=True,
                        help="classifier-free guidance: batch 2")
    parser.add_argument("--repeats", type=int, default=3, help="samples per configuration")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """CLI: sample every configuration, write the merged profile, print a summary per configuration."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    configs = [(ws, mode) for ws in args.world_sizes for mode in (["none"] if ws == 1 else args.modes)]
    tables = []
    for ws, mode in configs:
        cal = Calibration(args.model, args.resolution, ws, mode, args.device, dtype, args.split_cfg, args.cfg)
        for _ in range(args.repeats):
            cal.sample()
        stats, summary = cal.result()
        tables.append(stats)
        print(json.dumps(summary))
    profile = CalibrationProfile(device_name(args.device), args.dtype, merge(tables))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(args.out)
    print(f"wrote {len(profile.entries)} entries to {args.out}")


if __name__ == "__main__":
    main()
