"""How long one kernel launch of a trace op takes on a modelled GPU.

    seconds = launch_overhead + max(compute, memory)

- `launch_overhead`: what every kernel costs under CUDA-graph replay however small it is (the
  gap between kernels plus a minimal kernel's ramp up and drain). A displaced step adds about
  a thousand small kernels to an SDXL step (GroupNorm correction, halo concatenation, K/V
  copies); on a small patch they are most of its extra time.
- `compute`: FLOPs at an achieved rate. Matrix products and convolutions (implicit GEMMs)
  run as CTAs of one `GEMM_TILE` of output each, attention (flash kernels) as CTAs of
  `ATTENTION_BLOCK` queries of one head; CTAs run in waves of `sm_count`, so a partial last
  wave costs a whole one (wave quantization: a 16-row patch at 1024 px leaves most SMs
  idle). The full-wave rate is `peak * flops_efficiency` for GEMMs and
  `peak * attention_efficiency` for attention.
- `memory`: bytes read and written at `memory_bandwidth * bandwidth_efficiency`; every other op
  (elementwise, normalisation, copies, concatenation) is bound by it.

The constants and efficiencies and the evidence behind them are in docs/hardware.md.
"""

from __future__ import annotations

import math
from typing import Any

from .hardware import Device

GEMM_KINDS = ("mm", "addmm", "bmm", "baddbmm", "convolution")
ATTENTION = "sdpa"
GEMM_TILE = (64, 128)  # output rows x columns of one CTA
ATTENTION_BLOCK = 128  # queries of one head per CTA


def _shapes(key: str) -> list[tuple[int, ...]]:
    """The input shapes of an op key `dtype|shape,shape,...|ints` (`op_counter.op_key`)."""
    parts = key.split("|")
    if len(parts) < 2 or not parts[1]:
        return []
    return [tuple(int(v) for v in s.split("x")) if s != "scalar" else () for s in parts[1].split(",")]


def gemm_tiles(kind: str, key: str, flops: float) -> int | None:
    """Output tiles of one launch of a GEMM-like op (None if its key has no usable shapes).

    Convolutions are implicit GEMMs: rows = batch * output pixels (from the FLOPs, which are
    2 * rows * Cout * Cin/groups * kh * kw), columns = Cout.
    """
    shapes = _shapes(key)
    try:
        if kind == "convolution":
            weight = shapes[1]
            columns, depth = weight[0], math.prod(weight[1:])
            batch, rows = 1, flops / (2 * depth * columns)
        else:
            a, b = (shapes[0], shapes[1]) if kind in ("mm", "bmm") else (shapes[1], shapes[2])
            batch, rows, columns = (a[0], a[-2], b[-1]) if len(a) == 3 else (1, a[-2], b[-1])
    except (IndexError, ZeroDivisionError):
        return None
    return batch * math.ceil(rows / GEMM_TILE[0]) * math.ceil(columns / GEMM_TILE[1])


def attention_blocks(key: str) -> int | None:
    """CTAs of one attention launch: batch * heads * query blocks (query shape B, H, L, d)."""
    shapes = _shapes(key)
    if not shapes or len(shapes[0]) != 4:
        return None
    batch, heads, queries, _ = shapes[0]
    return batch * heads * math.ceil(queries / ATTENTION_BLOCK)


def wave_utilization(ctas: int | None, sm_count: int) -> float:
    """Busy fraction of the SMs over the waves `ctas` CTAs need (1 when unknown)."""
    if not ctas:
        return 1.0
    waves = math.ceil(ctas / sm_count)
    return ctas / (waves * sm_count)


def kernel_seconds(op: dict[str, Any], device: Device, dtype: str) -> float:
    """Seconds of all `op["count"]` launches of a trace op (module docstring)."""
    count = int(op.get("count", 1))
    if count <= 0:
        return 0.0
    kind, key = op["kind"], op.get("key", "")
    flops, nbytes = float(op["flops"]) / count, float(op["bytes"]) / count
    peak = device.peak_flops[dtype]
    if kind in GEMM_KINDS:
        rate = peak * device.flops_efficiency * wave_utilization(gemm_tiles(kind, key, flops), device.sm_count)
    elif kind == ATTENTION:
        rate = peak * device.attention_rate_efficiency * wave_utilization(attention_blocks(key), device.sm_count)
    else:
        rate = peak * device.flops_efficiency
    memory = nbytes / (device.memory_bandwidth * device.bandwidth_efficiency)
    return count * (device.launch_overhead + max(flops / rate, memory))
