"""Issue 14's memory claims for SDXL's VAE decode, counted on the meta device by bench/vae_memory.py:
the patched decode's per-rank peak at 3840x3840 on 8 ranks is under a quarter of the single
device's, and 10240x10240 on 8 ranks fits under 40 GiB a rank with chunked convolutions."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import vae_memory  # noqa: E402

sys.path.pop(0)

GIB = 2**30


def test_patched_decode_at_3840_on_8_ranks_needs_under_a_quarter_of_one_device():
    single = vae_memory.decode_peak_bytes(3840, 1)
    patched = vae_memory.decode_peak_bytes(3840, 8, chunk_mib=256)
    print(f"3840, float32: one device {single / GIB:.2f} GiB, 8 ranks {patched / GIB:.2f} GiB a rank")
    assert patched < single / 4


def test_chunks_fit_10240_on_8_ranks_under_40_gib():
    whole_patches = vae_memory.decode_peak_bytes(10240, 8, chunk_mib=0)
    chunked = vae_memory.decode_peak_bytes(10240, 8, chunk_mib=256)
    print(f"10240 on 8 ranks, float32: {whole_patches / GIB:.2f} GiB a rank, {chunked / GIB:.2f} GiB in chunks")
    assert chunked < 40 * GIB < whole_patches
