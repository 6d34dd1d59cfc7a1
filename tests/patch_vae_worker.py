"""Run under torchrun or mpiexec by tests/test_patch_vae.py: `python tests/patch_vae_worker.py BACKEND`.

Every rank decodes a float64 latent of the tiny VAE whose rows do not split evenly over the
ranks, patch-parallel and whole, and prints the largest difference relative to the image.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backends  # noqa: E402
from distrifusion.patch_vae import patch_vae  # noqa: E402
from distrifusion.pipeline_factory import build_vae  # noqa: E402
from distrifusion.rank_replica import vae_replica  # noqa: E402

LATENT = (1, 4, 9, 6)


def main(name: str) -> None:
    def body(comm):
        vae = build_vae("tiny", "cpu", torch.float64)
        z = torch.randn(LATENT, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        with torch.no_grad():
            whole = vae.decode(z).sample
        patched = vae_replica(vae)
        patch_vae(patched, comm)
        image = patched.decode(z).sample
        err = ((image - whole).abs().max() / whole.abs().max()).item()
        print(f"rank {comm.rank}/{comm.world_size}: relative error {err:.3e}", flush=True)

    backends.launch(name, body, timeout=60.0)


if __name__ == "__main__":
    main(sys.argv[1])
