"""The patch-parallel VAE decode (`distrifusion.patch_vae`) equals the single-device decode.

Tolerances, derived rather than guessed:
- float64: the patched decode only reorders sums (halo'd convolutions in chunks, moments
  combined from patches, attention over gathered keys), so it must equal the whole float64
  decode to float64 rounding: a relative L2 distance of 1e-12 (measured: ~1e-14) leaves
  orders of magnitude below any real defect (a missing halo row or unweighted statistics: >1e-3).
- float32, float16, bfloat16: the whole decode in that dtype is `rounding` away from the float64
  one (relative L2); the patched decode must be within 8x that distance of float64, hence within
  9x `rounding` of the whole decode. Why 8: the CPU picks another convolution algorithm for a
  patch of a few rows, which rounds up to 4x more (a 512-channel 3x3 convolution of a 4x4 map:
  2.4e-7 whole, 1.0e-6 on its top 2 rows with their halo; no difference from 8 rows up), and
  the SDXL-shaped case at test size has 2-row patches (measured: 3.6x `rounding`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from backends.fake import spawn
from distrifusion.exact_rows import RowsConv2d, RowSplit, split_rows
from distrifusion.patch_vae import patch_vae
from distrifusion.pipeline_factory import build_vae
from distrifusion.rank_replica import vae_replica
from launchers import LAUNCHERS, backend_of, run_ranks
from strict_dtypes import StrictDtypes

WORKER = Path(__file__).with_name("patch_vae_worker.py")
EXACT = 1e-12
ROUNDING_FACTOR = 8


@pytest.fixture(scope="module")
def vaes() -> dict[str, nn.Module]:
    """Float64 VAEs with random weights: the tiny model's and an SDXL-shaped one (4 levels, 512 channels)."""
    return {name: build_vae(name, "cpu", torch.float64) for name in ("tiny", "sdxl")}


def latent(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def whole(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(z).sample


def patched(vae: nn.Module, z: torch.Tensor, n: int, chunk_bytes: int = 0, strict: bool = False) -> torch.Tensor:
    """The patch-parallel decode of `z` on `n` fake ranks (every rank must return the same image)."""
    def body(comm):
        mine = vae_replica(vae)
        patch_vae(mine, comm, chunk_bytes)
        if not strict:
            return mine.decode(z).sample
        with StrictDtypes() as mode:
            image = mine.decode(z).sample
        assert mode.calls > 0
        return image

    images = spawn(body, n)
    assert all(torch.equal(image, images[0]) for image in images), "ranks returned different images"
    return images[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


CASES = [  # (model, latent rows, latent columns, ranks, chunk bytes); 9 and 6 rows split unevenly over 4
    ("tiny", 8, 8, 2, 0), ("tiny", 8, 8, 4, 0), ("tiny", 9, 6, 4, 0), ("tiny", 9, 6, 4, 4096),
    ("sdxl", 4, 4, 2, 0), ("sdxl", 4, 4, 4, 0), ("sdxl", 6, 4, 4, 48 * 1024),
]
IDS = [f"{m}-{h}x{w}-N{n}" + ("-chunked" if c else "") for m, h, w, n, c in CASES]


@pytest.fixture(scope="module")
def wholes(vaes) -> dict:
    """(model, rows, columns) -> the whole float64 decode, the float32 VAE and its rounding, computed once."""
    found = {}

    def get(model: str, h: int, w: int) -> tuple[torch.Tensor, nn.Module, float]:
        if (model, h, w) not in found:
            vae, z = vaes[model], latent(h, w)
            exact, vae32 = whole(vae, z), vae_replica(vae).float()
            found[model, h, w] = exact, vae32, rel(whole(vae32, z.float()), exact)
        return found[model, h, w]

    return get


@pytest.mark.parametrize("model,h,w,n,chunk", CASES, ids=IDS)
def test_patched_decode_equals_whole_decode(vaes, wholes, model, h, w, n, chunk):
    z = latent(h, w)
    exact, vae32, rounding = wholes(model, h, w)
    assert rel(patched(vaes[model], z, n, chunk), exact) < EXACT
    assert 0 < rounding < 1e-5
    error = rel(patched(vae32, z.float(), n, chunk), exact)
    print(f"{model} {h}x{w} on {n}: float32 rounding {rounding:.2e}, patched float32 {error:.2e}")
    assert error < ROUNDING_FACTOR * rounding


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_patched_decode_in_half_precision_under_cuda_dtype_rules(vaes, dtype):
    vae, z = vaes["tiny"], latent(8, 6)
    exact = whole(vae, z)
    low = vae_replica(vae).to(dtype)
    rounding = rel(whole(low, z.to(dtype)), exact)
    image = patched(low, z.to(dtype), 3, strict=True)
    assert image.dtype == dtype
    assert rel(image, exact) < ROUNDING_FACTOR * rounding


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 4), extra_rows=st.integers(0, 6), w=st.integers(1, 6), chunk=st.sampled_from([0, 2048]),
       seed=st.integers(0, 9))
def test_patched_decode_is_exact_for_any_shape(vaes, n, extra_rows, w, chunk, seed):
    vae, z = vaes["tiny"], latent(n + extra_rows, w, seed)
    assert rel(patched(vae, z, n, chunk), whole(vae, z)) < EXACT


def test_split_rows_deals_rows_evenly_and_refuses_empty_patches():
    assert split_rows(9, 4) == [3, 2, 2, 2]
    assert split_rows(8, 4) == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="3 rows cannot be cut into 4 row patches"):
        split_rows(3, 4)


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 11])
def test_convolution_in_row_chunks_equals_whole_convolution(chunk_rows):
    conv = nn.Conv2d(3, 5, 3, padding=1, dtype=torch.float64)
    x = torch.randn(2, 3, 10, 7, dtype=torch.float64)
    calls = []
    row_bytes = 2 * 5 * 7 * 8  # batch * max(channels) * width * float64

    def body(comm):
        layer = RowsConv2d(conv, RowSplit(comm, (chunk_rows + 2) * row_bytes), "conv")
        layer._conv = lambda rows, plain=layer._conv: calls.append(rows.shape[-2]) or plain(rows)
        with layer.split.patched([10]):
            return layer(x)

    with torch.no_grad():
        out, expected = spawn(body, 1)[0], conv(x)
    assert len(calls) == -(-10 // chunk_rows) and max(calls) <= chunk_rows + 2
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_patched_decode_on_launched_backends(launcher):
    proc = run_ranks(launcher, 2, str(WORKER), backend_of(launcher), timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = re.findall(r"rank (\d)/2: relative error ([-+.e0-9]+)", proc.stdout)
    assert sorted(r for r, _ in errors) == ["0", "1"], proc.stdout
    assert all(float(e) < EXACT for _, e in errors)


def test_pipeline_decodes_on_every_rank_with_split_guidance():
    """parallelize(pipe): with vae="patch" every rank (both guidance halves) decodes its rows and
    returns the image rank 0's whole decode gives (vae="none"), within the float32 bound above
    (the tiny VAE's float32 rounding is ~1e-6)."""
    from backends.recording import Recorder
    from distrifusion import ParallelConfig, parallelize
    from distrifusion.pipeline_factory import build_pipeline
    from distrifusion.rank_replica import replica

    pipe = build_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)

    def body(comm, vae: str):
        rec = Recorder(comm)
        mine = parallelize(replica(pipe), rec, ParallelConfig(mode="sync_patch", vae=vae))
        image = mine("a lighthouse", height=64, width=64, num_inference_steps=2, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
        return image, any(r.tag == "output:vae" for r in rec.records)

    (patch0, gathered0), (patch1, gathered1) = spawn(body, 2, "patch")
    whole_image, gathered = spawn(body, 2, "none")[0]
    assert gathered0 and gathered1 and not gathered
    assert patch0.dtype == torch.float32 and torch.equal(patch0, patch1)
    assert rel(patch0, whole_image) < (ROUNDING_FACTOR + 1) * 1e-6
