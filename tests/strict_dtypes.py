"""`StrictDtypes`: a dispatch mode that fails, on the CPU, the dtype mixes CUDA kernels reject.

CPU kernels accept a float32 GroupNorm weight with a float16 input; the CUDA kernel raises
"expected scalar type Half but found Float". Under this mode the CPU raises too, so the test
suite sees such defects without a GPU. The rules, per aten op (after autograd, so `linear`
arrives as `addmm`/`mm`, attention as its fused or math ops):

- normalisations, matrix products, convolutions and attention: every floating tensor argument,
  `out=` included, has one dtype (CUDA dispatches these on the input's dtype and reads weights,
  bias, masks and outputs as that type);
- reductions with `out=`: the output has the input's dtype, or is float32 over a float16 or
  bfloat16 input (CUDA fuses that cast into the reduction);
- any other op with `out=` (elementwise): CUDA casts inputs and output inside the kernel, as the
  CPU does, so only what the CPU itself enforces applies.

The mode is thread-local, like every dispatch mode: enter it on each rank's thread.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SAME_DTYPE_OPS = frozenset({
    "native_group_norm", "native_layer_norm", "native_batch_norm", "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training", "rms_norm", "_fused_rms_norm",
    "mm", "bmm", "addmm", "addbmm", "baddbmm", "addmv", "mv", "dot", "matmul", "linear", "_addmm_activation",
    "convolution", "_convolution", "conv1d", "conv2d", "conv3d", "conv_transpose2d", "mkldnn_convolution",
    "cudnn_convolution", "_slow_conv2d_forward", "slow_conv_transpose2d", "thnn_conv2d",
    "scaled_dot_product_attention", "_scaled_dot_product_attention_math",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
})
LOWP_TO_FLOAT32_REDUCTIONS = frozenset({"sum", "mean", "nansum", "var", "std", "norm", "linalg_vector_norm"})
LOW_PRECISION = (torch.float16, torch.bfloat16)


class DtypeMix(TypeError):
    """An aten call whose floating dtypes a CUDA kernel would reject."""


def _floating(values) -> list[torch.Tensor]:
    return [t for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def check_call(func, args: tuple, kwargs: dict) -> None:
    """Raise `DtypeMix` if this aten call mixes floating dtypes where CUDA would refuse it."""
    name = func.overloadpacket.__name__
    out_names = [a.name for a in func._schema.arguments if a.is_out]
    outs = _floating([kwargs.get(n) for n in out_names])
    ins = _floating([args, {k: v for k, v in kwargs.items() if k not in out_names}])
    if name in SAME_DTYPE_OPS:
        dtypes = {t.dtype for t in ins + outs}
        if len(dtypes) > 1:
            raise DtypeMix(f"aten.{name} mixes floating dtypes {sorted(map(str, dtypes))} "
                           f"(inputs {[str(t.dtype) for t in ins]}, out {[str(t.dtype) for t in outs]}): "
                           "CUDA kernels reject this")
    elif name in LOWP_TO_FLOAT32_REDUCTIONS and outs and ins:
        source = ins[0].dtype
        for out in outs:
            if out.dtype != source and not (source in LOW_PRECISION and out.dtype == torch.float32):
                raise DtypeMix(f"aten.{name} reduces {source} into a {out.dtype} out=: CUDA only fuses "
                               "float16/bfloat16 -> float32")


class StrictDtypes(TorchDispatchMode):
    """Within `with StrictDtypes():`, aten calls follow CUDA's dtype rules (module docstring);
    `calls` counts the calls checked, so a test can tell the mode saw the work."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        check_call(func, args, kwargs)
        self.calls += 1
        return func(*args, **kwargs)
