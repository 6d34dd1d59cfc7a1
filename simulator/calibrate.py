"""Measure op times on a real device and write a `CalibrationProfile`.

    python -m simulator.calibrate --model tiny --resolution 256 --device cpu --dtype float32 \\
        --threads 1 --world-sizes 1 2 --modes sync_patch displaced naive_patch --no-split-cfg \\
        --out profile.json
    python -m simulator.calibrate --model sdxl --resolution 1024 --device cuda --dtype float16 \\
        --world-sizes 1 8 --modes displaced --out profile_h200_1024.json

For every configuration (world size x mode; world size 1 runs mode "none") the UNet with
random weights is patched as rank `role_rank` of an emulated group, runs two untimed steps (the
synchronous one and the first displaced one), and is then sampled in one of two ways
(`--replay`; default: graph on CUDA, eager elsewhere).

eager (`Calibration`, the CPU's way): each sample runs one steady step with every aten op
timed (a `HostClock`: synchronize and perf_counter around each op) and one steady step timed
whole, without it. The step's wall time exceeds the sum of its op times by the eager
framework's own work (Python modules, dispatch, allocation). That remainder (median over
samples), less the time of the emulated collectives' copies, is spread evenly over the step's
op launches, so a profile entry is the time of one launch in an eager run, and the simulator,
which charges it per launch, reproduces the measured step.

graph (`GraphCalibration`, CUDA's way): a rank on a GPU replays its steady step as a CUDA graph
(`distrifusion.cuda_graph`), where kernels follow one another without eager launch gaps, so an
eager profile overstates every small op; and the eager counter's synchronisations cannot be
captured at all. The steady step (the UNet call and the wait for its gathers, what the app's
graph holds) is therefore captured twice: once with an `OpCounter` on an `EventClock`, which
records an external timing event between consecutive ops (event-record nodes in the graph,
re-recorded at each replay), and once plain. Each sample replays both; after a wait outside
either graph, the marked replay's intervals give each op's time as the replay ran it, the
plain replay the step's. The events cost some device time of their own: the plain step less
the marked span is spread over the intervals as one equal amount each (negative: the events'
cost; no interval below zero), so the simulator reproduces the replayed step. Why events and
not a profiler trace of replays: a trace's graph kernels are not tied to the aten ops that
captured them (matching them by launch order breaks on ops launching several kernels or
none), while events bracket each op where it is issued, need only torch (>= 2.8, for external
events), and the measured region can be checked on the CPU not to synchronise or read the
device (tests/test_calibrate.py). On the CPU the same code runs with host-clock events and a
stand-in graph (`simulator.device_timing`), for tests and dry runs only.

Entries of the same (kind, key) from several configurations are averaged.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from distrifusion.pipeline_factory import build_unet

from .compute_model import CalibrationProfile, ProfileEntry
from .device_timing import EventClock, HostClock, StepGraph, is_cuda, time_ms
from .op_counter import OpCounter, OpStat
from .unet_run import COMM, EmulatedUNet
from .workload import MODES

REPLAYS = ("graph", "eager")


class Calibration:
    """Op times of one emulated configuration run eagerly, sampled one step pair at a time."""

    def __init__(self, model: str, resolution: int, world_size: int, mode: str, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, split_cfg: bool = True, cfg: bool = True,
                 unet: torch.nn.Module | None = None):
        self.clock = HostClock(torch.cuda.synchronize if is_cuda(device) else None)
        self.counter = OpCounter(self.clock)
        self.mode = "none" if world_size == 1 else mode
        self.run = EmulatedUNet(model, resolution, world_size, self.mode, self.counter, device=device,
                                dtype=dtype, cfg=cfg, warmup_steps=1, split_cfg=split_cfg, unet=unet)
        self.run.step()
        self.run.step()
        self.seconds: dict[tuple[str, str], float] = {}
        self.walls: list[float] = []
        self.comm: list[float] = []

    def sample(self) -> None:
        """One steady step with its ops timed, one timed whole."""
        self.counter.spans.clear()
        with self.counter:
            self.run.step()
        seconds = self.counter.seconds()
        self.comm.append(seconds.pop((COMM, ""), 0.0))
        for key, value in seconds.items():
            self.seconds[key] = self.seconds.get(key, 0.0) + value
        start = self.clock.mark()
        self.run.step()
        self.walls.append(self.clock.mark() - start)

    def result(self) -> tuple[dict[tuple[str, str], OpStat], dict]:
        """Op totals over the samples, framework overhead spread per launch, and a summary."""
        n = len(self.walls)
        if n == 0:
            raise RuntimeError("Calibration.result() needs at least one sample()")
        totals = self.counter.totals
        launches = sum(s.count for s in totals.values()) / n
        op_seconds = sum(self.seconds.values()) / n
        wall, comm = statistics.median(self.walls), statistics.median(self.comm)
        overhead = max(0.0, wall - comm - op_seconds) / launches
        stats = {k: replace(s, seconds=self.seconds[k] + overhead * s.count) for k, s in totals.items()}
        summary = {"world_size": self.run.comm.world_size, "mode": self.mode, "replay": "eager", "samples": n,
                   "step_wall_s": wall, "op_seconds": op_seconds, "emulated_comm_s": comm,
                   "launches_per_step": launches, "overhead_per_launch_s": overhead}
        return stats, summary


def level_off(means: list[float], counts: list[int], target: float) -> float:
    """The amount `c` that, taken off every one of `counts[i]` intervals of mean `means[i]`
    (none below zero), leaves `target` in all: sum(count * max(0, mean - c)) = target.
    Negative `c` adds. Zero-length intervals stay zero."""
    total = sum(n * m for m, n in zip(means, counts))
    intervals = sum(counts)
    if target >= total:
        return (total - target) / intervals
    taken = 0.0
    remaining = intervals
    for m, n in sorted(zip(means, counts)):  # the shortest intervals reach zero first
        c = (total - taken - target) / remaining
        if c <= m:
            return c
        taken += n * m
        remaining -= n
    return max(means)


class GraphCalibration:
    """Op times of one emulated configuration as its replayed CUDA graph runs them (module doc)."""

    def __init__(self, model: str, resolution: int, world_size: int, mode: str, device: str = "cuda",
                 dtype: torch.dtype = torch.float16, split_cfg: bool = True, cfg: bool = True,
                 unet: torch.nn.Module | None = None):
        self.device = device
        self.counter = OpCounter(EventClock(device))
        self.mode = "none" if world_size == 1 else mode
        self.run = EmulatedUNet(model, resolution, world_size, self.mode, self.counter, device=device,
                                dtype=dtype, cfg=cfg, warmup_steps=1, split_cfg=split_cfg, unet=unet,
                                graphable=True)
        self.run.step()
        self.run.step()
        with self.counter:
            self.marked = StepGraph(self.steady_step, device)
        self.plain = StepGraph(self.steady_step, device, pool=self.marked.pool())
        self.samples: list[dict[tuple[str, str], float]] = []
        self.walls: list[float] = []

    def steady_step(self) -> torch.Tensor:
        """The measured region, captured as a graph: one steady step and the wait for its gathers."""
        out = self.run.step()
        self.run.finish()
        return out

    def sample(self) -> None:
        """One replay of each graph; the waits between them are outside both."""
        self.marked.replay()
        self.walls.append(time_ms(self.device, self.plain.replay) / 1e3)
        self.samples.append(self.counter.seconds())

    def result(self) -> tuple[dict[tuple[str, str], OpStat], dict]:
        """Per-step op totals (mean over samples, the events' cost levelled off) and a summary."""
        n = len(self.walls)
        if n == 0:
            raise RuntimeError("GraphCalibration.result() needs at least one sample()")
        keys = list(self.samples[0])
        per_step = {k: sum(s[k] for s in self.samples) / n for k in keys}
        counts = {k: s.count for k, s in self.counter.totals.items()}
        counts[(COMM, "")] = sum(1 for k, *_ in self.counter.spans if k == (COMM, ""))
        keys = [k for k in keys if counts[k]]
        wall = statistics.median(self.walls)
        c = level_off([per_step[k] / counts[k] for k in keys], [counts[k] for k in keys], wall)
        level = {k: counts[k] * max(0.0, per_step[k] / counts[k] - c) for k in keys}
        comm = level.pop((COMM, ""), 0.0)
        stats = {k: replace(s, seconds=level[k]) for k, s in self.counter.totals.items()}
        summary = {"world_size": self.run.comm.world_size, "mode": self.mode, "replay": "graph", "samples": n,
                   "step_wall_s": wall, "marked_span_s": sum(per_step.values()), "op_seconds": sum(level.values()),
                   "emulated_comm_s": comm, "launches_per_step": sum(s.count for s in self.counter.totals.values()),
                   "cost_per_interval_s": c}
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
    """The profile's device label (CPU with its thread count, a GPU by name)."""
    if torch.device(device).type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return torch.cuda.get_device_name(device) if is_cuda(device) else device


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
    parser.add_argument("--replay", choices=REPLAYS, default=None,
                        help="graph: ops timed inside a replayed CUDA graph; eager: synchronised per op "
                             "(default: graph on CUDA, eager elsewhere)")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """CLI: sample every configuration, write the merged profile, print a summary per configuration."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    replay = args.replay or ("graph" if is_cuda(args.device) else "eager")
    sampler = GraphCalibration if replay == "graph" else Calibration
    unet = build_unet(args.model, args.device, dtype)
    configs = [(ws, mode) for ws in args.world_sizes for mode in (["none"] if ws == 1 else args.modes)]
    tables = []
    for ws, mode in configs:
        cal = sampler(args.model, args.resolution, ws, mode, args.device, dtype, args.split_cfg, args.cfg, unet)
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
