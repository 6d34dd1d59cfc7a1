"""8-bit codes for the stale activations a rank sends: fp8 (e4m3) or int8 with block scales.

A tensor is flattened and cut into blocks of `BLOCK` consecutive elements; each block is
scaled by its largest magnitude so that it fills the 8-bit range, and sent as one row of
`BLOCK` code bytes followed by its float32 scale (4 bytes). The payload is plain bytes
(`torch.uint8`), so every backend carries it. Consecutive elements are channels of one token
for K/V (`PatchSelfAttention` lays them out as (tokens, batch, 2C), and C is a multiple of
`BLOCK` in every model here, so no block mixes keys with values) and columns of one channel
for halo rows: a block's scale follows the local magnitude, so an outlier channel costs
precision in its own block only. Overhead: 4 / `BLOCK` bytes per element (3%).

Error per element, with m its block's largest magnitude and s = max(m / code_max, 2^-126) the
block's scale (code_max 127 or 448; the floor keeps s a normal float32, so zero blocks decode
exactly and |x| / s never exceeds code_max), before rounding to the output dtype: int8 at most
s / 2; fp8 e4m3 at most |x| / 16 (3 mantissa bits) or, below e4m3's normal range, s * 2^-10.
"""

from __future__ import annotations

import math

import torch

BLOCK = 128
SCALE_BYTES = 4
MIN_SCALE = 2.0**-126  # float32's smallest normal
_CODE = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}


class BlockCodec:
    """Encodes items of `numel` elements to `payload_bytes` bytes and back (`kind`: fp8 or int8)."""

    def __init__(self, kind: str, numel: int):
        if kind not in _CODE:
            raise ValueError(f"compression must be one of {tuple(_CODE)}, got {kind!r}")
        self.kind, self.numel = kind, numel
        self.code_dtype, self.code_max = _CODE[kind]
        self.blocks = math.ceil(numel / BLOCK)
        self.payload_bytes = self.blocks * (BLOCK + SCALE_BYTES)

    def encode(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(items, payload_bytes) uint8 codes of `x` viewed as (items, numel); into `out` if given."""
        items = x.numel() // self.numel
        flat = x.reshape(items, self.numel)
        if self.blocks * BLOCK > self.numel:
            flat = torch.nn.functional.pad(flat, (0, self.blocks * BLOCK - self.numel))
        blocks = flat.view(items, self.blocks, BLOCK)
        low, high = torch.aminmax(blocks, dim=-1, keepdim=True)
        # a normal float32 scale: |x| / scale <= code_max after rounding, no clamp needed
        scale = (torch.maximum(high, -low).float() / self.code_max).clamp_min_(MIN_SCALE)
        if out is None:
            out = torch.empty((items, self.payload_bytes), dtype=torch.uint8, device=x.device)
        rows = out.view(items, self.blocks, BLOCK + SCALE_BYTES)
        codes = rows[..., :BLOCK].view(self.code_dtype)
        if self.kind == "fp8":
            torch.div(blocks, scale, out=codes)  # the float32 quotient, rounded once to e4m3
        else:
            codes.copy_(torch.div(blocks, scale).round_())  # torch casts float to int by truncation
        rows[..., BLOCK:].view(torch.float32).copy_(scale)
        return out

    def decode(self, payload: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(items, numel) values in `dtype` of (items, payload_bytes) codes: one pass over the
        codes for int8 (the product is taken in float32 and rounded once to `dtype`), two for fp8
        (torch has no fp8 arithmetic; the cast first is exact in float16, bfloat16 and float32)."""
        items = payload.numel() // self.payload_bytes
        rows = payload.view(items, self.blocks, BLOCK + SCALE_BYTES)
        codes = rows[..., :BLOCK].view(self.code_dtype)
        if self.kind == "fp8":
            codes = codes.to(dtype)
        values = torch.empty((items, self.blocks, BLOCK), dtype=dtype, device=payload.device)
        torch.mul(codes, rows[..., BLOCK:].view(torch.float32), out=values)
        values = values.view(items, self.blocks * BLOCK)
        return values if self.blocks * BLOCK == self.numel else values[:, :self.numel].contiguous()
