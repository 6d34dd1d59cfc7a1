"""`distrifusion.compression.BlockCodec`: every element comes back within the documented bound.

The bound per element x of a block whose largest magnitude is m, with scale
s = max(m / code_max, 2^-126) (compression's docstring): int8 s / 2, fp8 max(|x| / 16, s * 2^-10).
On top of it, derived here:
- float32 arithmetic: the scale m / code_max, the division by it and the product code * scale
  each round once (relative 2^-24), moving an element by at most about 2 * 2^-24 of m and of
  |x|; `FLOAT32_SLACK` allows 2^-21 of each, 4x that;
- the decoded float32 value rounds once to the output dtype: at most half its spacing there,
  |y| * eps / 2, or half the subnormal spacing below the normal range.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distrifusion.compression import BLOCK, MIN_SCALE, SCALE_BYTES, BlockCodec
from strict_dtypes import StrictDtypes

FLOAT32_SLACK = 2.0 ** -21
CODE_MAX = {"int8": 127, "fp8": 448}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# log10 of the block magnitudes drawn per dtype: from below its subnormals to near its maximum
EXPONENTS = {torch.float32: (-46, 30), torch.bfloat16: (-46, 30), torch.float16: (-7, 4)}


def bound(kind: str, x: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The largest error allowed for each element of `x` (items, numel), in float64."""
    x = x.double()
    blocks = math.ceil(numel / BLOCK)
    padded = torch.nn.functional.pad(x.abs(), (0, blocks * BLOCK - numel)).view(len(x), blocks, BLOCK)
    m = padded.amax(-1, keepdim=True).expand_as(padded).reshape(len(x), -1)[:, :numel]
    scale = (m / CODE_MAX[kind]).clamp_min(MIN_SCALE)
    codec = scale / 2 if kind == "int8" else torch.maximum(x.abs() / 16, scale * 2.0 ** -10)
    within = codec + FLOAT32_SLACK * (m + x.abs())
    info = torch.finfo(dtype)
    return within + (x.abs() + within) * info.eps / 2 + info.smallest_normal * info.eps / 2


def sample(seed: int, items: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """(items, numel) values: each block of its own magnitude (some all zero), one outlier each."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = EXPONENTS[dtype]
    blocks = math.ceil(numel / BLOCK)
    magnitude = 10.0 ** (lo + (hi - lo) * torch.rand(items, blocks, 1, generator=g, dtype=torch.float64))
    magnitude[torch.rand(items, blocks, 1, generator=g) < 0.2] = 0
    values = torch.randn(items, blocks, BLOCK, generator=g, dtype=torch.float64) * magnitude
    outlier = torch.randint(0, BLOCK, (items, blocks, 1), generator=g)
    values.scatter_(-1, outlier, values.gather(-1, outlier) * 1e3)
    top = torch.finfo(dtype).max / 2
    return values.view(items, -1)[:, :numel].clamp(-top, top).to(dtype)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["int8", "fp8"]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31),
       items=st.integers(1, 3), numel=st.integers(1, 700))
def test_round_trip_within_the_documented_bound(kind, dtype, seed, items, numel):
    x = sample(seed, items, numel, dtype)
    codec = BlockCodec(kind, numel)
    payload = codec.encode(x.view(items, 1, numel))
    assert payload.dtype == torch.uint8 and payload.shape == (items, math.ceil(numel / BLOCK) * (BLOCK + SCALE_BYTES))
    y = codec.decode(payload, dtype)
    assert y.dtype == dtype and y.shape == (items, numel)
    err = (y.double() - x.double()).abs()
    allowed = bound(kind, x, numel, dtype)
    worst = (err / allowed).max().item()
    assert worst <= 1, f"{kind} {dtype}: an element is {worst:.3g}x its bound"


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_encode_writes_into_out_and_zeros_come_back_exactly(kind):
    codec = BlockCodec(kind, 300)
    out = torch.full((2, codec.payload_bytes), 7, dtype=torch.uint8)
    assert codec.encode(torch.zeros(2, 300, dtype=torch.bfloat16), out=out) is out
    assert torch.equal(codec.decode(out, torch.bfloat16), torch.zeros(2, 300, dtype=torch.bfloat16))


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_encode_and_decode_run_on_meta(kind):
    """The simulator records the real code on the meta device."""
    codec = BlockCodec(kind, 130)
    payload = codec.encode(torch.empty(3, 2, 65, device="meta", dtype=torch.float16))
    assert payload.device.type == "meta" and payload.shape == (3, 2 * (BLOCK + SCALE_BYTES))
    y = codec.decode(payload, torch.float16)
    assert y.device.type == "meta" and y.shape == (3, 130) and y.dtype == torch.float16


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_codec_obeys_cuda_dtype_rules(kind, dtype):
    codec = BlockCodec(kind, 200)
    x = torch.randn(2, 200, generator=torch.Generator().manual_seed(0)).to(dtype)
    with StrictDtypes() as strict:
        y = codec.decode(codec.encode(x), dtype)
    assert strict.calls > 10 and y.dtype == dtype


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_blocks_of_float32_subnormals_stay_within_the_bound(kind):
    """Their scale is the floor 2^-126 (m / code_max would be subnormal and round, so that m / scale
    could exceed the largest code and wrap or overflow): within s / 2 and s * 2^-10."""
    x = torch.cat([2.0 ** e * torch.linspace(-1, 2, BLOCK) for e in range(-142, -118)]).view(1, -1)
    codec = BlockCodec(kind, x.numel())
    err = (codec.decode(codec.encode(x), torch.float32).double() - x.double()).abs()
    assert (err <= bound(kind, x, x.numel(), torch.float32)).all()


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_a_block_whose_scale_underflows_decodes_to_zeros(kind):
    """m < code_max * 2^-150: m / code_max rounds to 0, so the block must come back as zeros
    (an error of at most m, within the bound), not as 0 / 0 (the floor scale sees to it)."""
    x = torch.tensor([[0.0, 2.0 ** -149, -(2.0 ** -148)]])
    codec = BlockCodec(kind, 3)
    assert torch.equal(codec.decode(codec.encode(x), torch.float32), torch.zeros_like(x))
