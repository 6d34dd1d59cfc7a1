"""Predicted peak device memory per rank of one generation, from the real code run on meta.

What a rank holds, measured as live tensor bytes (`simulator.live_memory`) while the code runs:

- weights: the denoiser (UNet or diffusion transformer), the text encoders and the VAE in the
  run's dtype (every rank of the app loads the whole pipeline and keeps it);
- the denoising steps: the denoiser's inputs and activations, recorded like the trace
  (`simulator.unet_run.EmulatedUNet`, rank `role_rank`, steps: synchronous, first displaced,
  steady), which include DistriFusion's stale buffers (`Exchange.buffers()` of every exchange,
  kept for the whole generation, and not shrinking with N; with `parallel.compress` the K/V
  and halo exchanges keep 8-bit payloads, and with `parallel.delta` full-precision copies too);
- CUDA graphs: a replayed step's activations live in the graph's private pool, which only
  that graph may use while it exists (the pipeline keeps it), so the pool, as large as the
  steady step's own peak, stays reserved during the VAE decode;
- the VAE decode: the VAE in its decode dtype (SDXL's float16 VAE is cast to float32) and the
  decode's activations: rank 0's share of the patch-parallel decode (`parallel.vae=patch` in a
  patch mode, `simulator.vae_decode`: its rows' activations, halo, statistics and K/V buffers
  and the gathered image), else the whole decode on rank 0 (`simulator.generation`).

- cuBLAS workspaces: PyTorch keeps one per (handle, stream) from the caching allocator
  (aten/src/ATen/cuda/CublasHandlePool.cpp), 32 MiB on Hopper (cuBLAS's recommended size,
  pytorch#120925; 4 MiB on older GPUs, so this is an upper bound there), on the eager stream
  and on the graph-capture stream.

`peak_bytes` is the most a rank needs at once (rank 0 has the most: it decodes alone, or holds
the most rows of the patched decode): what must fit in the device. `peak_allocated_bytes`
leaves out the graph pool's reserved space and stands for `torch.cuda.max_memory_allocated()`.
Not modelled: cuDNN's convolution workspaces (per call, chosen by its heuristics), the CUDA
context, NCCL's buffers, allocator fragmentation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .generation import load_or_record_stages, versioned_path
from .vae_decode import DEFAULT_CHUNK_MIB, VAES, load_or_record_decode
from .workload import cached_at, trace_args

CUBLAS_WORKSPACE_BYTES = 32 * 2**20  # per stream, Hopper (module doc)


def load_or_record_unet_memory(args: dict[str, Any], cache_dir: str | Path | None = None) -> dict:
    """The UNet's memory of normalised trace `args` (`workload.trace_args`), cached."""
    return cached_at(versioned_path("memory", args, cache_dir), lambda: record_unet_memory(args))


def record_unet_memory(args: dict[str, Any]) -> dict[str, int]:
    """Bytes of one rank's denoising steps: weights, inputs, stale buffers, the most held
    during any step above weights and inputs (`steps_peak_bytes`), and the steady step's own
    peak above what it started with (`steady_transient_bytes`: a graph pool's size)."""
    import torch

    from .live_memory import LiveMemory, allocation_bytes, storage_bytes
    from .meta_memo import MetaMemo
    from .op_counter import OpCounter
    from .unet_run import EmulatedUNet

    counter = OpCounter()  # stands fused attention in for the meta kernel's scores matrix
    run = EmulatedUNet(args["model"], args["resolution"], args["world_size"], args["mode"], counter,
                       device="meta", dtype=getattr(torch, args["dtype"]), cfg=args["cfg"], warmup_steps=1,
                       groupnorm=args["groupnorm"], split_cfg=args["split_cfg"],
                       compress=args["compress"], delta=args["delta"])
    inputs = [t for t in (*run.inputs.values(), *run.inputs.get("added_cond_kwargs", {}).values())
              if isinstance(t, torch.Tensor)]
    steps_peak = steady = 0
    with torch.no_grad(), MetaMemo(), counter, LiveMemory() as memory:
        for _ in range(3):
            start = memory.live
            memory.reset_peak()
            run.step()
            steps_peak = max(steps_peak, memory.peak)
            steady = memory.peak - start
        run.finish()
    ctx = run.context
    buffers = [b for ex in ctx.exchanges for b in ex.buffers()] if ctx is not None else []
    return {"unet_weights_bytes": storage_bytes((*run.unet.parameters(), *run.unet.buffers())),
            "inputs_bytes": storage_bytes(inputs),
            "stale_buffer_bytes": sum(allocation_bytes(b.numel() * b.element_size()) for b in buffers),
            "steps_peak_bytes": steps_peak, "steady_transient_bytes": steady}


def patched_decode(mode: str, vae: str) -> bool:
    """Whether the app decodes patch-parallel: `vae` "patch" with a patched UNet (`mode`, as
    `workload.trace_args` normalises it: "none" on one device)."""
    if vae not in VAES:
        raise ValueError(f"vae must be one of {VAES}, got {vae!r}")
    return mode != "none" and vae == "patch"


def peak_memory(model: str, resolution: int, world_size: int, mode: str, split_cfg: bool = True, cfg: bool = True,
                dtype: str = "float16", warmup_steps: int = 4, groupnorm: str = "corrected",
                cache_dir: str | Path | None = None, cuda_graph: bool = True, vae: str = "patch",
                vae_chunk_mib: int = DEFAULT_CHUNK_MIB, compress: str = "none",
                delta: bool = False) -> dict[str, Any]:
    """Peak memory per rank of one generation (bytes; module doc), cached (no torch on a hit);
    `vae` and `vae_chunk_mib` as `parallel.vae` and `parallel.vae_chunk_mib`, `compress` and
    `delta` as `parallel.compress` and `parallel.delta` (8-bit stale buffers).

    Keys: `weights_bytes` (every model; `unet_weights_bytes` the UNet's), `stale_buffer_bytes`,
    `unet_peak_bytes` (the denoising steps' peak above weights and stale buffers),
    `graph_pool_bytes`, `workspace_bytes` (cuBLAS), `vae_decode_weights_bytes`,
    `vae_decode_peak_bytes` (above weights; rank 0's share when patched), `vae_decode`
    ("patch" or "whole"), `phases` (rank 0's total in each), `peak_phase`,
    `peak_bytes`, `peak_allocated_bytes` (module doc) and `rank` (the one with the most: 0).
    """
    args = trace_args(model, resolution, world_size, mode, warmup_steps, groupnorm, split_cfg, dtype, cfg,
                      compress, delta)
    unet = load_or_record_unet_memory(args, cache_dir)
    stages = load_or_record_stages(model, resolution, dtype, cfg, cache_dir)["memory"]
    patched = patched_decode(args["mode"], vae)
    decode = (load_or_record_decode(model, resolution, world_size, dtype, vae_chunk_mib, cache_dir)["memory"]
              if patched else stages)
    weights = unet["unet_weights_bytes"] + stages["text_encoders_weights_bytes"] + stages["vae_weights_bytes"]
    decode_weights = weights - stages["vae_weights_bytes"] + decode["vae_decode_weights_bytes"]
    workspace = CUBLAS_WORKSPACE_BYTES * (2 if cuda_graph else 1)
    stale = unet["stale_buffer_bytes"]
    pool = unet["steady_transient_bytes"] if cuda_graph else 0
    phases = {
        "text_encoders": weights + CUBLAS_WORKSPACE_BYTES + stages["text_encoders_peak_bytes"],
        "denoise": weights + workspace + unet["inputs_bytes"] + unet["steps_peak_bytes"],
        "vae_decode": (decode_weights + workspace + unet["inputs_bytes"] + stale + pool
                       + decode["vae_decode_peak_bytes"]),
    }
    peak_phase = max(phases, key=phases.__getitem__)
    return {"weights_bytes": weights, "unet_weights_bytes": unet["unet_weights_bytes"], "stale_buffer_bytes": stale,
            "unet_peak_bytes": unet["inputs_bytes"] + unet["steps_peak_bytes"] - stale, "graph_pool_bytes": pool,
            "workspace_bytes": workspace, "vae_decode_weights_bytes": decode["vae_decode_weights_bytes"],
            "vae_decode_peak_bytes": decode["vae_decode_peak_bytes"], "vae_decode": "patch" if patched else "whole",
            "phases": phases, "peak_phase": peak_phase,
            "peak_bytes": phases[peak_phase],
            "peak_allocated_bytes": max(phases["text_encoders"], phases["denoise"], phases["vae_decode"] - pool),
            "rank": 0}
