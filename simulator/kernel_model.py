"""How long one kernel launch of a trace op takes on a modelled GPU.

    seconds = launch_overhead + max(compute, memory)      (CUDA-graph replay)
    seconds = max(eager_op_overhead, the above)            (eager: the host may be slower)

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

- `eager_op_overhead`: outside graph replay (warm-up steps, the text encoders, the VAE decode)
  the host issues every op through Python and the dispatcher; a small op then waits on it.

Every op runs in its own dtype (its key's prefix): the VAE decodes in float32 even in a float16
pipeline. The constants and efficiencies and the evidence behind them are in docs/hardware.md.
"""

from __future__ import annotations

import math
from typing import Any

from .hardware import TF32, Device

GEMM_KINDS = ("mm", "addmm", "bmm", "baddbmm", "convolution")
ATTENTION = "sdpa"
GEMM_TILE = (64, 128)  # output rows x columns of one CTA
ATTENTION_BLOCK = 128  # queries of one head per CTA
_KEY_DTYPES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}  # `op_counter.op_key` prefixes


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


def op_dtype(key: str, default: str) -> str:
    """The dtype an op runs in, from its key's prefix (`f16|...`), else `default`."""
    return _KEY_DTYPES.get(key.split("|", 1)[0], default)


def peak(device: Device, kind: str, dtype: str) -> float:
    """Dense peak FLOP/s of `kind` in `dtype`. Where the device has a TF32 peak, float32
    convolutions run in TF32 (cuDNN's default, `torch.backends.cudnn.allow_tf32`) and float32
    attention (the memory-efficient kernel) on tensor cores as 3xTF32, a third of that rate;
    float32 matrix products stay on the FP32 units (`torch.backends.cuda.matmul.allow_tf32`
    is off by default)."""
    if dtype == "float32" and TF32 in device.peak_flops:
        if kind == "convolution":
            return device.peak_flops[TF32]
        if kind == ATTENTION:
            return device.peak_flops[TF32] / 3
    return device.peak_flops[dtype]


def kernel_seconds(op: dict[str, Any], device: Device, dtype: str, eager: bool = False) -> float:
    """Seconds of all `op["count"]` launches of a trace op (module docstring); `dtype` where
    the op's key does not name one. `eager`: not graph-replayed, so a launch takes at least the
    host's `eager_op_overhead`."""
    count = int(op.get("count", 1))
    if count <= 0:
        return 0.0
    kind, key = op["kind"], op.get("key", "")
    flops, nbytes = float(op["flops"]) / count, float(op["bytes"]) / count
    top = peak(device, kind, op_dtype(key, dtype))
    if kind in GEMM_KINDS:
        rate = top * device.flops_efficiency * wave_utilization(gemm_tiles(kind, key, flops), device.sm_count)
    elif kind == ATTENTION:
        rate = top * device.attention_rate_efficiency * wave_utilization(attention_blocks(key), device.sm_count)
    else:
        rate = top * device.flops_efficiency
    memory = nbytes / (device.memory_bandwidth * device.bandwidth_efficiency)
    launch = device.launch_overhead + max(flops / rate, memory)
    return count * (max(launch, device.eager_op_overhead) if eager else launch)
