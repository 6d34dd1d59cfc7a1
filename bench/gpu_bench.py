"""GPU benchmark of one rank's work (issue 5), measured in one run on one GPU.

One GPU cannot run N NCCL ranks, so rank r of N runs on the `emulated` backend: the same
code path, buffers and shapes, the other ranks' activations synthesised locally.

    python bench/gpu_bench.py [--quick] [--out DIR]

Prints, all graph-replayed (CUDA graphs) unless said otherwise, SDXL fp16 random weights:
 1. stock diffusers UNet step (1024, batch 1) vs this project's mode=none step (goal <= 1.03);
 2. one rank's steady displaced step for N = 2, 4, 8 at 1024/2048/3840 vs the ideal patch
    compute for that rank (same rows, self-attention over all tokens, nothing else);
 3. peak memory per rank, stale-buffer bytes, bytes each rank receives per step;
 4. a 50-step 1024x1024 CFG generation at N=1: this project vs stock diffusers (eager).
and writes a markdown table (with device, date, versions, command) and JSON under --out.
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

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffusers  # noqa: E402

from backends.emulated import EmulatedCommunicator  # noqa: E402
from backends.recording import Recorder  # noqa: E402
from distrifusion import ParallelConfig, parallelize  # noqa: E402
from distrifusion.cuda_graph import CudaGraphed  # noqa: E402
from distrifusion.patch_attention import PatchSelfAttention  # noqa: E402
from distrifusion.pipeline_factory import build_pipeline, build_unet  # noqa: E402
from distrifusion.rank_replica import replica, unet_replica  # noqa: E402

DTYPE, DEVICE = torch.float16, "cuda"


def unet_inputs(res: int, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator(DEVICE).manual_seed(seed)
    lat = res // 8
    rand = lambda *s: torch.randn(*s, generator=g, device=DEVICE, dtype=DTYPE)  # noqa: E731
    return {"sample": rand(batch, 4, lat, lat), "timestep": torch.full((batch,), 500.0, device=DEVICE),
            "encoder_hidden_states": rand(batch, 77, 2048),
            "added_cond_kwargs": {"text_embeds": rand(batch, 1280), "time_ids": rand(batch, 6)}}


def median_ms(step, iters: int) -> float:
    """Median time of `step()` in ms, by CUDA events, after warm-up."""
    for _ in range(3):
        step()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class FullTokenAttention(PatchSelfAttention):
    """The ideal's self-attention: this patch's queries over all N patches' keys, no exchange.

    The other patches' K/V sit in a buffer allocated once (filled with copies of the first
    call's real K/V, so the data, and with it the GPU's clocks, look like real activations);
    each call writes its own slot.
    """

    def __init__(self, patches: int):
        self.patches, self.kv = patches, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, heads = hidden_states.shape[0], attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if self.kv is None:
            self.kv = torch.stack([k, v]).repeat(1, 1, self.patches, 1)
        self.kv[0, :, : k.shape[1]] = k
        self.kv[1, :, : k.shape[1]] = v
        k, v = self.kv[0], self.kv[1]
        d = q.shape[-1] // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, heads * d)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def release() -> None:
    """Free what earlier measurements left and restart the peak-memory count.

    A patched model refers to itself (its layers' forwards hold the layers), so dropping the
    last name does not free it: only the cycle collector does, and until then its stale
    buffers and graph pool would count in the next configuration's peak.
    """
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def per_rank(unet, n: int, res: int, iters: int, rounds: int = 3) -> dict:
    """Steady displaced step of the middle rank of n vs the ideal patch compute.

    The two are timed in alternation (`rounds` times, best median kept), so that clock
    changes of a busy GPU do not favour whichever runs first.
    """
    inputs = unet_inputs(res)
    out = {"n": n, "res": res}
    models = {}
    release()
    for name, config in (("displaced", ParallelConfig(warmup_steps=1)), ("ideal", ParallelConfig(mode="naive_patch", warmup_steps=1))):
        comm = Recorder(EmulatedCommunicator(n, rank=n // 2, device=DEVICE))
        model = parallelize(unet_replica(unet), comm, config)
        if name == "ideal":
            patches = model.forward.ctx.world_size
            for m in model.modules():
                if isinstance(getattr(m, "processor", None), PatchSelfAttention):
                    m.set_processor(FullTokenAttention(patches))
        with torch.no_grad():
            model(**inputs)  # warm-up (synchronous) step
            model(**inputs)  # first steady step, eager
            before = len(comm.records)
            model(**inputs)  # captured
        models[name] = model
        graphs = model.forward.graphs.values()
        out[f"{name}_graphed"] = bool(graphs) and all(g.graph is not None for g in graphs)
        if name == "displaced":
            out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["stale_buffer_mib"] = model.forward.ctx.allocated_bytes / 2**20
            step_records = comm.records[before:]
            out["recv_mib_per_step"] = sum(r.bytes * (r.group_size - 1) for r in step_records) / 2**20
            out["gathered_mib_per_step"] = sum(r.bytes * r.group_size for r in step_records) / 2**20
    with torch.no_grad():
        for _ in range(rounds):
            for name, model in models.items():
                ms = median_ms(lambda: model(**inputs), iters)
                out[f"{name}_ms"] = min(out.get(f"{name}_ms", ms), ms)
    del models, model
    release()
    out["ratio"] = out["displaced_ms"] / out["ideal_ms"]
    return out


def stock_vs_none(unet, iters: int) -> dict:
    inputs = unet_inputs(1024, batch=1)
    stock = CudaGraphed(lambda **kw: unet(**kw).sample, "stock UNet")
    ours_model = parallelize(unet, EmulatedCommunicator(1, device=DEVICE), ParallelConfig(mode="none"))
    ours = CudaGraphed(lambda **kw: ours_model(**kw).sample, "mode=none UNet")
    with torch.no_grad():
        res = {"stock_ms": median_ms(lambda: stock(**inputs), iters), "none_ms": median_ms(lambda: ours(**inputs), iters)}
        res["eager_stock_ms"] = median_ms(lambda: unet(**inputs), max(5, iters // 4))
    res["ratio"] = res["none_ms"] / res["stock_ms"]
    return res


def full_generation(steps: int) -> dict:
    pipe = build_pipeline("sdxl", dtype=DTYPE, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    ours = parallelize(replica(pipe), EmulatedCommunicator(1, device=DEVICE), ParallelConfig())
    res = {}
    for name, p in (("stock_s", pipe), ("ours_s", ours)):
        for _ in range(2):  # the first run warms up (and captures the graph)
            torch.cuda.synchronize()
            start = time.perf_counter()
            p("a lighthouse", height=1024, width=1024, num_inference_steps=steps, guidance_scale=5.0,
              generator=torch.Generator(DEVICE).manual_seed(0), output_type="pt")
            torch.cuda.synchronize()
            res[name] = time.perf_counter() - start
    res["speedup"] = res["stock_s"] / res["ours_s"]
    return res


def markdown(results: dict, command: str) -> str:
    head = (f"### {results['device']}, {results['date']}\n\ntorch {results['torch']}, diffusers {results['diffusers']}, "
            f"SDXL fp16 random weights, CUDA graphs; command: `{command}`\n\n")
    s = results["stock_vs_none"]
    lines = [head, f"1. UNet step 1024x1024 (batch 1): stock {s['stock_ms']:.2f} ms, mode=none {s['none_ms']:.2f} ms, "
             f"ratio **{s['ratio']:.3f}** (eager stock: {s['eager_stock_ms']:.1f} ms)\n",
             "\n2./3. One rank's steady displaced step (emulated rank N/2 of N, split CFG) vs ideal patch compute\n",
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    iters = 5 if args.quick else 10
    results = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
               "torch": torch.__version__, "diffusers": diffusers.__version__}
    unet = build_unet("sdxl", device=DEVICE, dtype=DTYPE)
    results["stock_vs_none"] = stock_vs_none(unet, iters)
    print(json.dumps(results["stock_vs_none"]), flush=True)
    sizes = [(1024, 8), (2048, 4)] if args.quick else [(r, n) for r in (1024, 2048, 3840) for n in (2, 4, 8)]
    if args.sizes:
        sizes = [tuple(int(v) for v in item.split("x")) for item in args.sizes.split(",")]
    results["per_rank"] = []
    for res, n in sizes:
        results["per_rank"].append(per_rank(unet, n, res, iters))
        print(json.dumps(results["per_rank"][-1]), flush=True)
        (out / "gpu_bench.json").write_text(json.dumps(results, indent=1))
    del unet
    release()
    if not args.skip_generation:
        results["generation"] = full_generation(50)
    (out / "gpu_bench.json").write_text(json.dumps(results, indent=1))
    table = markdown(results, "python bench/gpu_bench.py" + (" --quick" if args.quick else ""))
    (out / "benchmarks.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
