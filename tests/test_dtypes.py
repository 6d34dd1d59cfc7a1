"""The whole patched pipeline in float16 and bfloat16 on the CPU, under CUDA's dtype rules
(`strict_dtypes.StrictDtypes`), for every mode, N = 1, 2, 4, with and without CFG split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backends.fake import spawn
from distrifusion import ParallelConfig, parallelize
from distrifusion.parallel_config import MODES
from distrifusion.pipeline_factory import build_pipeline
from distrifusion.rank_replica import replica
from strict_dtypes import DtypeMix, StrictDtypes

STEPS = 2  # one synchronous step, then a steady displaced step (warm-up 1)


@pytest.mark.parametrize("call", [
    lambda h, f: torch.native_group_norm(h, f[:4], f[:4], 1, 4, 16, 2, 1e-5),
    lambda h, f: F.conv2d(h, f.view(4, 4, 1, 1)[:, :, :, :]),
    lambda h, f: F.linear(h.flatten(1), f.view(4, 4)[:, :1].expand(4, 16).contiguous()),
    lambda h, f: torch.baddbmm(f.view(1, 4, 4), h.view(4, 4, 4)[:1], h.view(4, 4, 4)[:1]),
    lambda h, f: torch.sum(f.view(4, 4), dim=-1, out=torch.empty(4, dtype=h.dtype)),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixes_cuda_rejects_are_caught(call, dtype):
    h, f = torch.ones(1, 4, 4, 4, dtype=dtype), torch.ones(16)
    with pytest.raises(DtypeMix, match="CUDA"), StrictDtypes():
        call(h, f)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixes_cuda_accepts_pass(dtype):
    h, f = torch.ones(1, 4, 4, 4, dtype=dtype), torch.ones(1, 4, 1, 1)
    with StrictDtypes() as strict:
        torch.sum(h, dim=-1, dtype=torch.float32)
        torch.var(h.view(2, -1), dim=-1, correction=0, out=torch.empty(2))
        torch.addcmul(f, h, f, out=torch.empty_like(h))  # elementwise: CUDA casts in the kernel
        F.group_norm(h, 2, torch.ones(4, dtype=dtype), torch.zeros(4, dtype=dtype))
    assert strict.calls >= 4


@pytest.fixture(scope="module", params=[torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def low_precision_pipe(request):
    pipe = build_pipeline("tiny", dtype=request.param)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate_strictly(comm, pipe, config: ParallelConfig):
    with StrictDtypes() as strict:
        out = parallelize(replica(pipe), comm, config)(
            "a lighthouse", height=64, width=64, num_inference_steps=STEPS, output_type="pt",
            generator=torch.Generator().manual_seed(0))
    return out.images, strict.calls


# split_cfg changes nothing for mode none (no patches) or one rank (no halves): run it once there.
CASES = [(mode, n, split) for mode in MODES for n in (1, 2, 4) for split in (False, True)
         if not (split and (mode == "none" or n == 1))]


@pytest.mark.parametrize("mode,world_size,split_cfg", CASES,
                         ids=[f"{m}-{n}-{'cfg_split' if s else 'cfg_together'}" for m, n, s in CASES])
def test_pipeline_obeys_cuda_dtype_rules(low_precision_pipe, mode, world_size, split_cfg):
    config = ParallelConfig(mode=mode, warmup_steps=1, split_cfg=split_cfg)
    results = spawn(_generate_strictly, world_size, low_precision_pipe, config)
    images = [image for image, _ in results]
    assert all(calls > 1000 for _, calls in results), "the mode must see the pipeline's aten calls"
    assert images[0].shape == (1, 3, 64, 64) and images[0].isfinite().all()
    assert all(image.dtype == images[0].dtype and torch.equal(image, images[0]) for image in images)
