"""One GPU session's measurements (issue 11) in one command, the results JSON rewritten after
every measurement, so that a run cut short keeps what it measured.

How to run it on the device tool: see bench/gpu_session.sh (one command, results under $OUT).
On the CPU, `python bench/gpu_session.py --dry-run --out DIR` runs every code path but the
CUDA-only calls with the tiny model in seconds (tests/test_gpu_session.py runs it).

Parts, each with its own time budget; an error is recorded and the next item runs:
  generations  fp16 and bf16 CFG generations through the app path: N=1 (`ParallelConfig(
               mode="none")`, graph-replayed) and one emulated rank of N=2/4/8 in every mode, and of
               N=8 displaced with compress int8, fp8 and int8 + delta (issue 15);
               "ok" (no crash), per-step times, whether the steady steps were graph-replayed.
  per_rank     one rank's steady displaced step vs its ideal patch compute (bench/gpu_bench.py)
               at 1024 and 2048 for N=2/4/8.
  latency      a 50-step generation at N=1 vs stock diffusers (eager), and the check that the
               N=1 app's denoising takes at most 1.03x the graph-replayed UNet step x steps.
  calibration  `simulator.calibrate.GraphCalibration` (ops timed inside the replayed graph) for
               N=1/2/4/8 displaced, written as a profile next to the results.
  vae          the VAE decode in float32 (as SDXL's pipeline decodes) at 3840: whole, and rank 0
               of N=8 patch-parallel (emulated ranks): seconds and peak memory above the weights
               (issue 14; bench/vae_memory.py counts the same on meta).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import logging
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffusers  # noqa: E402
import gpu_bench  # noqa: E402

from backends.emulated import EmulatedCommunicator  # noqa: E402
from distrifusion import ParallelConfig, parallelize  # noqa: E402
from distrifusion.parallel_config import MODES  # noqa: E402
from distrifusion.patch_vae import patch_vae  # noqa: E402
from distrifusion.pipeline_factory import build_pipeline, build_vae  # noqa: E402
from distrifusion.rank_replica import replica  # noqa: E402
from simulator.calibrate import GraphCalibration, device_name, merge  # noqa: E402
from simulator.compute_model import CalibrationProfile  # noqa: E402
from simulator.device_timing import is_cuda, timing_event, wait  # noqa: E402

PROMPT = "a lighthouse on a cliff at dawn"


@dataclass(frozen=True)
class Plan:
    """What one session measures, and the seconds each part may take."""

    device: str
    model: str
    dtype: torch.dtype  # per_rank, latency, calibration
    generation_dtypes: tuple[torch.dtype, ...]
    generation_res: int
    generation_steps: int
    ranks: tuple[int, ...]
    table: tuple[tuple[int, int], ...]  # (resolution, N)
    iters: int
    rounds: int
    latency_res: int
    latency_steps: int
    calibration_res: int
    calibration_world_sizes: tuple[int, ...]
    calibration_repeats: int
    vae_res: int
    vae_ranks: tuple[int, ...]
    budgets: dict[str, float]


GPU = Plan("cuda", "sdxl", torch.float16, (torch.float16, torch.bfloat16), 1024, 8, (2, 4, 8),
           tuple((r, n) for r in (1024, 2048) for n in (2, 4, 8)), 10, 3, 1024, 50, 1024, (1, 2, 4, 8), 3, 3840, (8,),
           {"generations": 100, "per_rank": 110, "latency": 60, "calibration": 90, "vae": 45})
DRY = Plan("cpu", "tiny", torch.float32, (torch.float16, torch.bfloat16), 32, 4, (2, 8),
           ((64, 2), (64, 8), (128, 4)), 2, 1, 64, 3, 64, (1, 2), 1, 70, (2,),
           {"generations": 900, "per_rank": 900, "latency": 900, "calibration": 900, "vae": 900})  # CPU float16 is slow


class Results:
    """The session's results, rewritten whole (atomically) at every `put`."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data: dict[str, Any] = {"meta": meta, "parts": {}}
        self.write()

    def put(self, part: str, key: str, value: Any) -> None:
        self.data["parts"].setdefault(part, {})[key] = value
        self.write()
        print(json.dumps({"part": part, "key": key, "value": value}, default=str), flush=True)

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


class Warnings(logging.Handler):
    """The project's warnings while an item runs (e.g. a CUDA graph capture that fell back)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class Part:
    """One part of the session: items run while its time budget lasts, each failing softly."""

    def __init__(self, results: Results, name: str, budget_s: float, device: str):
        self.results, self.name, self.device = results, name, device
        self.deadline = time.monotonic() + budget_s
        self.failures = 0

    def item(self, key: str, measure: Callable[[], dict]) -> dict | None:
        """`measure()`'s result under `key`, or the error it raised, or "skipped" past the budget."""
        if time.monotonic() > self.deadline:
            self.results.put(self.name, key, {"skipped": "time budget of the part spent"})
            return None
        start = time.monotonic()
        warnings = Warnings()
        logging.getLogger("distrifusion").addHandler(warnings)
        try:
            value = {"ok": True, **measure()}
        except Exception as e:  # noqa: BLE001 - fail soft: record it, go on
            self.failures += 1
            value = {"ok": False, "error": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc(limit=-6)}
        finally:
            logging.getLogger("distrifusion").removeHandler(warnings)
            gpu_bench.release(self.device)
        value["seconds"] = time.monotonic() - start
        if warnings.messages:
            value["warnings"] = warnings.messages
        self.results.put(self.name, key, value)
        return value


def graphed_steps(pipe: Any, device: str) -> bool | None:
    """Whether a parallelized pipeline's steady UNet steps were graph-replayed (None: not on CUDA)."""
    return gpu_bench.is_graphed(pipe.unet_forward) if is_cuda(device) else None


def generate(pipe: Any, plan: Plan, steps: int, res: int, output_type: str) -> dict:
    """One CFG generation: the time of each step on the device's timeline, and whether the output is finite."""
    marks = [timing_event(plan.device)]

    def mark(pipeline: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        marks.append(timing_event(plan.device))
        marks[-1].record()
        return {}

    wait(plan.device)
    start = time.perf_counter()
    marks[0].record()
    out = pipe(PROMPT, height=res, width=res, num_inference_steps=steps, guidance_scale=5.0,
               generator=torch.Generator(plan.device).manual_seed(0), output_type=output_type,
               callback_on_step_end=mark)
    wait(plan.device)
    seconds = time.perf_counter() - start
    step_ms = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
    return {"generation_s": seconds, "step_ms": step_ms, "finite": bool(torch.isfinite(out.images).all()),
            "output_dtype": str(out.images.dtype)}


def generations(part: Part, plan: Plan, pipe: Any) -> None:
    """(a) N=1 and emulated N in every mode, in each dtype: no crash, step times (dtypes
    interleaved, so that a spent budget leaves both with results)."""
    typed = {dtype: pipe if dtype == plan.dtype else copy.deepcopy(pipe).to(dtype=dtype)
             for dtype in plan.generation_dtypes}
    runs = [(1, ParallelConfig(mode="none"))]
    runs += [(n, ParallelConfig(mode=m)) for n in plan.ranks for m in MODES if m != "none"]
    runs += [(plan.ranks[-1], ParallelConfig(compress=c, delta=d)) for c, d in (("int8", False), ("fp8", False),
                                                                               ("int8", True))]
    for n, config in runs:
        name = f"N={n} {config.mode}" + (f" {config.compress}" + " delta" * config.delta) * (config.compress != "none")
        config = dataclasses.replace(config, warmup_steps=1)
        for dtype, dtype_pipe in typed.items():
            def run(n: int = n, config: ParallelConfig = config, dtype_pipe: Any = dtype_pipe) -> dict:
                comm = EmulatedCommunicator(n, rank=gpu_bench.bench_rank(n), device=plan.device)
                ours = parallelize(replica(dtype_pipe), comm, config)
                # rank 0 decodes (N=1 shows the VAE); another rank's image would be a broadcast's
                result = generate(ours, plan, plan.generation_steps, plan.generation_res, "pt" if n == 1 else "latent")
                steady = result["step_ms"][3:]  # after the synchronous, first eager and capturing steps
                return {**result, "steady_step_ms": statistics.median(steady) if steady else None,
                        "graphed": graphed_steps(ours, plan.device), "rank": comm.rank}
            part.item(f"{str(dtype).removeprefix('torch.')} {name}", run)


def per_rank_table(part: Part, plan: Plan, pipe: Any) -> None:
    """(b) one rank's steady displaced step vs its ideal patch compute."""
    for res, n in plan.table:
        part.item(f"{res} N={n}", lambda res=res, n=n: gpu_bench.per_rank(
            pipe.unet, n, res, plan.iters, plan.device, plan.dtype, plan.model, plan.rounds))


def latency(part: Part, plan: Plan, pipe: Any) -> None:
    """(c) N=1 app vs stock diffusers (eager), and app vs graph-replayed step x steps."""
    steps, res = plan.latency_steps, plan.latency_res
    step = part.item("unet step (batch 2)", lambda: gpu_bench.stock_vs_none(
        pipe.unet, plan.iters, plan.device, plan.dtype, plan.model, res, batch=2))
    ours = parallelize(replica(pipe), EmulatedCommunicator(1, device=plan.device), ParallelConfig(mode="none"))
    part.item("stock warm-up", lambda: generate(pipe, plan, 2, res, "latent"))
    stock = part.item("stock eager", lambda: generate(pipe, plan, steps, res, "pt"))
    part.item("ours warm-up", lambda: generate(ours, plan, steps, res, "latent"))
    denoise = part.item("ours denoising", lambda: {**generate(ours, plan, steps, res, "latent"),
                                                  "graphed": graphed_steps(ours, plan.device)})
    full = part.item("ours", lambda: generate(ours, plan, steps, res, "pt"))
    checks: dict[str, Any] = {"steps": steps, "resolution": res}
    if step and step["ok"] and denoise and denoise["ok"]:
        budget = steps * step["none_ms"] / 1e3
        checks["app_denoising_vs_graphed_steps"] = denoise["generation_s"] / budget
        checks["app_within_1.03x"] = checks["app_denoising_vs_graphed_steps"] <= 1.03
    if stock and stock["ok"] and full and full["ok"]:
        checks["speedup_vs_stock_eager"] = stock["generation_s"] / full["generation_s"]
        checks["speedup_at_least_1.7x"] = checks["speedup_vs_stock_eager"] >= 1.7
    part.results.put(part.name, "checks", checks)


def calibration(part: Part, plan: Plan, pipe: Any, out: Path) -> None:
    """(d) the graph-replay calibration, the profile rewritten after each configuration."""
    tables = []
    dtype = str(plan.dtype).removeprefix("torch.")
    path = out / f"profile_{plan.model}_{plan.calibration_res}_{dtype}.json"

    def configuration(world_size: int) -> dict:
        cal = GraphCalibration(plan.model, plan.calibration_res, world_size, "displaced", plan.device,
                               plan.dtype, unet=pipe.unet)
        for _ in range(plan.calibration_repeats):
            cal.sample()
        stats, summary = cal.result()
        tables.append(stats)
        CalibrationProfile(device_name(plan.device), dtype, merge(tables)).save(path)
        return {**summary, "profile": path.name}

    for world_size in plan.calibration_world_sizes:
        part.item(f"N={world_size}", lambda ws=world_size: configuration(ws))


def vae_decodes(part: Part, plan: Plan) -> None:
    """(e) the whole decode, then rank 0 of each N patch-parallel, timed on their second run."""
    for n in (1, *plan.vae_ranks):
        part.item(f"{plan.vae_res} N={n}", lambda n=n: decode_once(plan, n))


def decode_once(plan: Plan, world_size: int) -> dict:
    """Decode a `plan.vae_res`-square latent in float32 on rank 0 of `world_size` (1: stock
    diffusers); seconds of the second of two runs, peak bytes above weights and latent (CUDA)."""
    vae = build_vae(plan.model, plan.device, torch.float32)
    if world_size > 1:
        patch_vae(vae, EmulatedCommunicator(world_size, 0, plan.device), ParallelConfig().vae_chunk_mib * 2**20)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.randn(1, vae.config.latent_channels, plan.vae_res // factor, plan.vae_res // factor,
                          device=plan.device)
    result: dict[str, Any] = {}
    with torch.no_grad():
        for _ in range(2):  # the first run pays for cuDNN's algorithm search
            gpu_bench.release(plan.device)
            base = torch.cuda.memory_allocated(plan.device) if is_cuda(plan.device) else 0
            wait(plan.device)
            start = time.perf_counter()
            image = vae.decode(latents, return_dict=False)[0]
            wait(plan.device)
            result["decode_s"] = time.perf_counter() - start
            if is_cuda(plan.device):
                result["peak_gib"] = (torch.cuda.max_memory_allocated(plan.device) - base) / 2**30
            result["image_shape"] = list(image.shape)
            del image
    return result


def main(argv: list[str] | None = None) -> int:
    """CLI; the exit status is 1 if any measurement failed (all were still attempted)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, tiny sizes")
    parser.add_argument("--parts", nargs="+", default=["generations", "per_rank", "latency", "calibration", "vae"])
    args = parser.parse_args(argv)
    plan = DRY if args.dry_run else GPU
    if args.dry_run:
        torch.set_num_threads(1)  # a busy 2-core machine makes multithreaded CPU kernels crawl
    args.out.mkdir(parents=True, exist_ok=True)
    results = Results(args.out / "gpu_session.json", {
        "device": plan.device, "device_name": device_name(plan.device), "dry_run": args.dry_run,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "model": plan.model, "command": " ".join(sys.argv)})
    start = time.monotonic()
    pipe = build_pipeline(plan.model, dtype=plan.dtype, device=plan.device)
    pipe.set_progress_bar_config(disable=True)
    results.put("setup", "build_pipeline_s", time.monotonic() - start)
    parts = {"generations": lambda p: generations(p, plan, pipe),
             "per_rank": lambda p: per_rank_table(p, plan, pipe),
             "latency": lambda p: latency(p, plan, pipe),
             "calibration": lambda p: calibration(p, plan, pipe, args.out),
             "vae": lambda p: vae_decodes(p, plan)}
    failures = 0
    for name in args.parts:
        part = Part(results, name, plan.budgets[name], plan.device)
        try:
            parts[name](part)
        except Exception as e:  # noqa: BLE001 - a part's own failure: record it, go on
            part.failures += 1
            results.put(name, "error", f"{type(e).__name__}: {e}")
        failures += part.failures
    results.put("setup", "total_s", time.monotonic() - start)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
