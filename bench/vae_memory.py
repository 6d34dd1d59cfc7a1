"""Per-rank peak memory of SDXL's VAE decode, whole on one device and patch-parallel, counted on meta.

    python bench/vae_memory.py [--sizes 3840x1,3840x8,10240x1,10240x8] [--chunks 0,256] [--dtypes float32,float16]

Runs the real decode on the `meta` device as the simulator records it
(`simulator.vae_decode.record_decode`: bytes of live tensors, as `torch.cuda.max_memory_allocated`
counts them; fused attention stands in for the meta kernel's scores matrix). N = 1 is the stock
diffusers decode; N > 1 is rank 0 of the patched decode (`distrifusion.patch_vae`) on an
emulated group: rank 0 holds the most rows, its collectives' buffers are real. The peak is above
the VAE's weights and the latent, and includes the pipeline's unscaled latent, the gathered image
and its post-processing. float32 is what the SDXL pipeline decodes in (`force_upcast`); float16
is for a VAE that decodes in half precision. Not counted: cuDNN's convolution workspaces (which
the row chunks also bound) and the communication library's buffers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simulator.vae_decode import record_decode  # noqa: E402

GIB = 2**30


def decode_peak_bytes(resolution: int, world_size: int, chunk_mib: int = 0, dtype: torch.dtype = torch.float32,
                      model: str = "sdxl") -> int:
    """Peak bytes above weights and latent of one rank's decode of a `resolution`-square image in
    `dtype`: the stock decode if `world_size` is 1, else rank 0 of the patched one with
    `chunk_mib` chunks (`simulator.vae_decode.record_decode`)."""
    name = str(dtype).removeprefix("torch.")
    return record_decode(model, resolution, world_size, name, name, chunk_mib)["memory"]["vae_decode_peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="3840x1,3840x8,10240x1,10240x8", help="RESOLUTIONxRANKS,...")
    parser.add_argument("--chunks", default="0,256", help="vae_chunk_mib values for N > 1")
    parser.add_argument("--dtypes", default="float32,float16")
    args = parser.parse_args()
    print(f"{'resolution':>10} {'dtype':>8} {'N':>3} {'chunk MiB':>9} {'peak GiB/rank':>13} {'single GiB':>10} "
          f"{'ratio':>6}")
    for dtype in args.dtypes.split(","):
        for size in args.sizes.split(","):
            res, n = (int(v) for v in size.split("x"))
            single = decode_peak_bytes(res, 1, dtype=getattr(torch, dtype))
            for chunk in [int(c) for c in args.chunks.split(",")] if n > 1 else [0]:
                peak = single if n == 1 else decode_peak_bytes(res, n, chunk, getattr(torch, dtype))
                print(f"{res:>10} {dtype:>8} {n:>3} {chunk if n > 1 else '-':>9} {peak / GIB:>13.2f} "
                      f"{single / GIB:>10.2f} {peak / single:>6.3f}", flush=True)


if __name__ == "__main__":
    main()
