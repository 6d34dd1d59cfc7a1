"""GPU benchmark of one rank's work (issue 5), measured in one run on one GPU.

One GPU cannot run N NCCL ranks, so one rank of N runs on the `emulated` backend: the same
code path, buffers and shapes, the other ranks' activations synthesised locally.

    python bench/gpu_bench.py [--quick] [--out DIR]

Prints, all graph-replayed (CUDA graphs) unless said otherwise, SDXL fp16 random weights:
 1. stock diffusers UNet step (1024, batch 1) vs this project's mode=none step (goal <= 1.03);
 2. one rank's steady displaced step for N = 2, 4, 8 at 1024/2048/3840 vs the ideal patch
    compute for that rank (`ideal_model`, `simulator.ceiling`);
 3. peak memory per rank, stale-buffer bytes, bytes each rank receives per step;
 4. a 50-step 1024x1024 CFG generation at N=1: this project vs stock diffusers (eager).
and writes a markdown table (with device, date, versions, command) and JSON under --out.

The ideal: the rank's work with nothing exchanged. With split CFG (the default) each guidance
branch runs on half of the ranks, so a rank's image is cut into N/2 patches: the ideal
convolves exactly the rank's rows (zero padding, no halo) and its self-attention attends over
exactly the image's tokens (N/2 patches' keys). The model is built with `device`/`dtype`
parameters, so tests check the ideal on the CPU (tests/test_gpu_bench.py).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffusers  # noqa: E402

from backends.emulated import EmulatedCommunicator  # noqa: E402
from backends.recording import Recorder  # noqa: E402
from distrifusion import ParallelConfig, parallelize  # noqa: E402
from distrifusion.cuda_graph import CudaGraphed  # noqa: E402
from distrifusion.pipeline_factory import build_pipeline, build_unet  # noqa: E402
from distrifusion.rank_replica import replica, unet_replica  # noqa: E402
from simulator.device_timing import is_cuda, time_ms, wait  # noqa: E402
from simulator.full_token_attention import to_ceiling  # noqa: E402
from simulator.unet_run import role_rank, unet_inputs  # noqa: E402


def step_inputs(model: str, res: int, device: str, dtype: torch.dtype, batch: int = 2) -> dict:
    """One UNet call's inputs at `res`, the timestep a device tensor (graph-capturable)."""
    return unet_inputs(model, res, batch, dtype, device, graphable=True)


def median_ms(step: Callable[[], Any], iters: int, device: str) -> float:
    """Median time of `step()` in ms on `device`'s timeline, after warm-up."""
    for _ in range(3):
        step()
    return statistics.median(time_ms(device, step) for _ in range(iters))


def graphed(fn: Callable[..., torch.Tensor], name: str, device: str) -> Callable[..., torch.Tensor]:
    """`fn` replayed as a CUDA graph on CUDA, as it is elsewhere."""
    return CudaGraphed(fn, name) if is_cuda(device) else fn


def is_graphed(forward: Any) -> bool:
    """Whether a parallelized UNet's forward replays its steps as CUDA graphs (all captured)."""
    graphs = forward.graphs.graphs.values()
    return bool(graphs) and all(g.graph is not None for g in graphs)


def bench_rank(n: int, split_cfg: bool = True) -> int:
    """The rank benchmarked: in its image's group of patches (N/2 with split CFG), one with a
    neighbour on each side where there is one (`simulator.unet_run.role_rank`)."""
    return role_rank(n // 2 if split_cfg and n >= 2 else n)


def ideal_model(unet: torch.nn.Module, n: int, device: str, split_cfg: bool = True) -> torch.nn.Module:
    """A replica of `unet` doing rank `bench_rank(n)`'s ideal patch compute (module doc)."""
    comm = EmulatedCommunicator(n, rank=bench_rank(n, split_cfg), device=device)
    return to_ceiling(parallelize(unet_replica(unet), comm, ParallelConfig(mode="naive_patch", warmup_steps=1,
                                                                           split_cfg=split_cfg)))


def displaced_model(unet: torch.nn.Module, n: int, device: str, split_cfg: bool = True
                    ) -> tuple[torch.nn.Module, Recorder]:
    """A replica of `unet` running rank `bench_rank(n)` of n displaced; its recorded communicator."""
    comm = Recorder(EmulatedCommunicator(n, rank=bench_rank(n, split_cfg), device=device))
    return parallelize(unet_replica(unet), comm, ParallelConfig(warmup_steps=1, split_cfg=split_cfg)), comm


def release(device: str) -> None:
    """Free what earlier measurements left and restart the peak-memory count.

    A patched model refers to itself (its layers' forwards hold the layers), so dropping the
    last name does not free it: only the cycle collector does, and until then its stale
    buffers and graph pool would count in the next configuration's peak.
    """
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if is_cuda(device) else None


def per_rank(unet: torch.nn.Module, n: int, res: int, iters: int, device: str = "cuda",
             dtype: torch.dtype = torch.float16, model_name: str = "sdxl", rounds: int = 3,
             split_cfg: bool = True) -> dict:
    """Steady displaced step of rank `bench_rank(n)` vs its ideal patch compute.

    The two are timed in alternation (`rounds` times, best median kept), so that clock
    changes of a busy GPU do not favour whichever runs first.
    """
    inputs = step_inputs(model_name, res, device, dtype)
    out = {"n": n, "res": res, "rank": bench_rank(n, split_cfg), "split_cfg": split_cfg}
    release(device)
    displaced, comm = displaced_model(unet, n, device, split_cfg)
    models = {"displaced": displaced, "ideal": ideal_model(unet, n, device, split_cfg)}
    for name, model in models.items():
        with torch.no_grad():
            model(**inputs)  # warm-up (synchronous) step
            model(**inputs)  # first steady step, eager
            before = len(comm.records)
            model(**inputs)  # captured
        out[f"{name}_graphed"] = is_graphed(model.forward)
        if name == "displaced":
            out["peak_gib"] = peak_gib(device)
            out["stale_buffer_mib"] = model.forward.ctx.allocated_bytes / 2**20
            step_records = comm.records[before:]
            out["recv_mib_per_step"] = sum(r.bytes * (r.group_size - 1) for r in step_records) / 2**20
            out["gathered_mib_per_step"] = sum(r.bytes * r.group_size for r in step_records) / 2**20
    with torch.no_grad():
        for _ in range(rounds):
            for name, model in models.items():
                ms = median_ms(lambda model=model: model(**inputs), iters, device)
                out[f"{name}_ms"] = min(out.get(f"{name}_ms", ms), ms)
    del models, model, displaced
    release(device)
    out["ratio"] = out["displaced_ms"] / out["ideal_ms"]
    return out


def stock_vs_none(unet: torch.nn.Module, iters: int, device: str = "cuda", dtype: torch.dtype = torch.float16,
                  model_name: str = "sdxl", res: int = 1024, batch: int = 1) -> dict:
    """One UNet step, graph-replayed: stock diffusers vs this project's mode=none, which replays
    its own graphs (and stock eager)."""
    inputs = step_inputs(model_name, res, device, dtype, batch)
    stock = graphed(lambda **kw: unet(**kw).sample, "stock UNet", device)
    ours_model = parallelize(unet_replica(unet), EmulatedCommunicator(1, device=device), ParallelConfig(mode="none"))
    ours = lambda **kw: ours_model(**kw).sample  # noqa: E731
    with torch.no_grad():
        res_ = {"stock_ms": median_ms(lambda: stock(**inputs), iters, device),
                "none_ms": median_ms(lambda: ours(**inputs), iters, device)}
        res_["eager_stock_ms"] = median_ms(lambda: unet(**inputs), max(5, iters // 4), device)
    res_["ratio"] = res_["none_ms"] / res_["stock_ms"]
    return res_


def generation_s(pipe: Any, steps: int, res: int, device: str, output_type: str = "pt") -> float:
    """Seconds of one CFG generation of `pipe` (waits for the device before and after)."""
    wait(device)
    start = time.perf_counter()
    pipe("a lighthouse", height=res, width=res, num_inference_steps=steps, guidance_scale=5.0,
         generator=torch.Generator(device).manual_seed(0), output_type=output_type)
    wait(device)
    return time.perf_counter() - start


def full_generation(steps: int, device: str = "cuda", dtype: torch.dtype = torch.float16,
                    model_name: str = "sdxl", res: int = 1024) -> dict:
    """A `steps`-step CFG generation at N=1: stock diffusers (eager) vs this project."""
    pipe = build_pipeline(model_name, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    ours = parallelize(replica(pipe), EmulatedCommunicator(1, device=device), ParallelConfig())
    res_ = {}
    for name, p in (("stock_s", pipe), ("ours_s", ours)):
        for _ in range(2):  # the first run warms up (and captures the graph)
            res_[name] = generation_s(p, steps, res, device)
    res_["speedup"] = res_["stock_s"] / res_["ours_s"]
    return res_


def markdown(results: dict, command: str) -> str:
    head = (f"### {results['device']}, {results['date']}\n\ntorch {results['torch']}, diffusers {results['diffusers']}, "
            f"SDXL fp16 random weights, CUDA graphs; command: `{command}`\n\n")
    s = results["stock_vs_none"]
    lines = [head, f"1. UNet step 1024x1024 (batch 1): stock {s['stock_ms']:.2f} ms, mode=none {s['none_ms']:.2f} ms, "
             f"ratio **{s['ratio']:.3f}** (eager stock: {s['eager_stock_ms']:.1f} ms)\n",
             "\n2./3. One rank's steady displaced step (emulated, split CFG) vs its ideal patch compute\n",
             "\n| res | N | displaced ms | ideal ms | ratio | graphed | peak GiB | stale buffers MiB | recv MiB/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["per_rank"]:
        lines.append(f"| {r['res']} | {r['n']} | {r['displaced_ms']:.2f} | {r['ideal_ms']:.2f} | **{r['ratio']:.3f}** | "
                     f"{r['displaced_graphed']} | {r['peak_gib']:.2f} | {r['stale_buffer_mib']:.1f} | {r['recv_mib_per_step']:.1f} |")
    if "generation" in results:
        g = results["generation"]
        lines.append(f"\n4. 50-step 1024x1024 CFG generation at N=1: stock diffusers {g['stock_s']:.2f} s, "
                     f"this project {g['ours_s']:.2f} s (**{g['speedup']:.2f}x**)\n")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and iterations")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--sizes", default=None, help="e.g. 1024x8,2048x4 (resolution x ranks)")
    args = parser.parse_args()
    device, dtype = "cuda", torch.float16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    iters = 5 if args.quick else 10
    results = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
               "torch": torch.__version__, "diffusers": diffusers.__version__}
    unet = build_unet("sdxl", device=device, dtype=dtype)
    results["stock_vs_none"] = stock_vs_none(unet, iters, device, dtype)
    print(json.dumps(results["stock_vs_none"]), flush=True)
    sizes = [(1024, 8), (2048, 4)] if args.quick else [(r, n) for r in (1024, 2048, 3840) for n in (2, 4, 8)]
    if args.sizes:
        sizes = [tuple(int(v) for v in item.split("x")) for item in args.sizes.split(",")]
    results["per_rank"] = []
    for res, n in sizes:
        results["per_rank"].append(per_rank(unet, n, res, iters, device, dtype))
        print(json.dumps(results["per_rank"][-1]), flush=True)
        (out / "gpu_bench.json").write_text(json.dumps(results, indent=1))
    del unet
    release(device)
    if not args.skip_generation:
        results["generation"] = full_generation(50, device, dtype)
    (out / "gpu_bench.json").write_text(json.dumps(results, indent=1))
    table = markdown(results, "python bench/gpu_bench.py" + (" --quick" if args.quick else ""))
    (out / "benchmarks.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
