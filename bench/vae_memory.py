"""Per-rank peak memory of SDXL's VAE decode, whole on one device and patch-parallel, counted on meta.

    python bench/vae_memory.py [--sizes 3840x1,3840x8,10240x1,10240x8] [--chunks 0,256] [--dtypes float32,float16]

Runs the real decode on the `meta` device under `simulator.live_memory.LiveMemory` (bytes of
live tensors, as `torch.cuda.max_memory_allocated` counts them; fused attention stands in for
the meta kernel's scores matrix, `simulator.op_counter`). N = 1 is the stock diffusers decode;
N > 1 is rank 0 of the patched decode (`distrifusion.patch_vae`) on an emulated group: rank 0
holds the most rows, its collectives' buffers are real. The peak is above the VAE's weights and
the latent, and includes the gathered image. float32 is what the SDXL pipeline decodes in
(`force_upcast`); float16 is for a VAE that decodes in half precision. Not counted: cuDNN's
convolution workspaces (which the row chunks also bound) and the communication library's buffers.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backends.emulated import EmulatedCommunicator  # noqa: E402
from distrifusion.patch_vae import patch_vae  # noqa: E402
from distrifusion.pipeline_factory import build_vae  # noqa: E402
from simulator.live_memory import LiveMemory  # noqa: E402
from simulator.meta_memo import MetaMemo  # noqa: E402
from simulator.op_counter import OpCounter  # noqa: E402

GIB = 2**30
MIB = 2**20


def decode_peak_bytes(resolution: int, world_size: int, chunk_mib: int = 0, dtype: torch.dtype = torch.float32,
                      model: str = "sdxl") -> int:
    """Peak bytes above weights and latent of one rank's decode of a `resolution`-square image:
    the stock decode if `world_size` is 1, else rank 0 of the patched one with `chunk_mib` chunks."""
    logging.getLogger("distrifusion").setLevel(logging.ERROR)
    vae = build_vae(model, "meta", dtype)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    z = torch.empty(1, vae.config.latent_channels, resolution // factor, resolution // factor, dtype=dtype,
                    device="meta")
    if world_size > 1:
        patch_vae(vae, EmulatedCommunicator(world_size, 0, "meta"), chunk_mib * MIB)
    with torch.no_grad(), MetaMemo(), OpCounter(), LiveMemory() as memory:
        image = vae.decode(z).sample
        (image / 2 + 0.5).clamp(0, 1).to(torch.float32)  # the pipeline's post-processing
        del image
    return memory.peak


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
