"""distrifusion.parallelize on a real StableDiffusionXLPipeline (tiny architecture), fake ranks."""

from __future__ import annotations

import time

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from backends.fake import RankFailed, spawn
from backends.recording import Recorder
from distrifusion import ParallelConfig, parallelize
from distrifusion.patch_unet import UNetForward
from distrifusion.pipeline_factory import build_pipeline, build_unet
from distrifusion.rank_replica import replica, unet_replica

STEPS = 8


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionXLPipeline:
    p = build_pipeline("tiny")
    p.set_progress_bar_config(disable=True)
    return p


def run(comm, pipe, config: ParallelConfig, steps: int = STEPS, height: int = 64, probe=None):
    """Final latents of one generation on this rank; `probe(pipe, step)` runs after every step."""
    mine = parallelize(replica(pipe), comm, config)

    def on_step_end(_p, step, _t, kwargs):
        if probe is not None:
            probe(mine, step)
        return kwargs

    out = mine("a lighthouse", height=height, width=64, num_inference_steps=steps, output_type="latent",
               generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step_end)
    return out.images


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


@pytest.fixture(scope="module")
def reference(pipe) -> torch.Tensor:
    return spawn(run, 1, pipe, ParallelConfig(mode="none"))[0]


@pytest.mark.parametrize("world_size,split_cfg", [(2, False), (2, True), (4, False), (4, True)])
def test_sync_patch_equals_none(pipe, reference, world_size, split_cfg):
    outs = spawn(run, world_size, pipe, ParallelConfig(mode="sync_patch", split_cfg=split_cfg))
    assert all(torch.equal(o, outs[0]) for o in outs), "ranks disagree"
    assert rel(outs[0], reference) < 1e-5


def test_displaced_with_warmup_covering_every_step_equals_sync_patch(pipe):
    sync = spawn(run, 4, pipe, ParallelConfig(mode="sync_patch", split_cfg=False))[0]
    displaced = spawn(run, 4, pipe, ParallelConfig(mode="displaced", warmup_steps=STEPS, split_cfg=False))[0]
    assert torch.equal(displaced, sync)


def test_displaced_is_closer_to_none_than_naive_patch_over_20_steps(pipe):
    ref = spawn(run, 1, pipe, ParallelConfig(mode="none"), 20)[0]
    naive = spawn(run, 4, pipe, ParallelConfig(mode="naive_patch", split_cfg=False), 20)[0]
    displaced = spawn(run, 4, pipe, ParallelConfig(mode="displaced", warmup_steps=4, split_cfg=False), 20)[0]
    naive_err, displaced_err = rel(naive, ref), rel(displaced, ref)
    print(f"20 steps, 4 patches: naive rel err {naive_err:.2e}, displaced (4 warm-up) {displaced_err:.2e}")
    assert displaced_err < naive_err / 5
    assert displaced_err > 1e-6, "displaced must actually use stale activations after warm-up"


def test_steady_steps_overlap_communication_and_allocate_no_buffers(pipe):
    seen = {}

    def body(comm):
        rec = Recorder(comm)

        def probe(p, step):
            seen.setdefault(comm.rank, []).append((p.context.allocations, len(rec.records), len(rec.events)))

        run(rec, pipe, ParallelConfig(mode="displaced", warmup_steps=2, split_cfg=False), probe=probe)
        return rec

    rec = spawn(body, 2)[0]
    allocations = [a for a, _, _ in seen[0]]
    assert allocations[0] > 0 and len(set(allocations)) == 1, allocations
    ends = [0] + [n for _, n, _ in seen[0]]
    steps = [rec.records[lo:hi] for lo, hi in zip(ends, ends[1:])]
    layers = [r for r in steps[0] if r.tag.split(":")[0] in ("conv", "attn", "norm")]
    assert layers and not any(r.async_op for r in steps[0] + steps[1])
    event_ends = [e for _, _, e in seen[0]]
    wait_step = {e["id"]: next(s for s, end in enumerate(event_ends) if e["index"] < end)
                 for e in rec.events if e["op"] == "wait" and e["index"] < event_ends[-1]}
    for s in range(2, STEPS - 1):
        exchanged = [r for r in steps[s] if r.tag.split(":")[0] in ("conv", "attn", "norm")]
        assert len(exchanged) == len(layers) and all(r.async_op for r in exchanged)
        assert all(wait_step[r.id] == s + 1 for r in exchanged), "stale gathers are waited a step later"


def test_bare_unet_call_signature_and_sync_equality():
    unet = build_unet("tiny", device="cpu")
    g = torch.Generator().manual_seed(1)
    args = dict(sample=torch.randn(2, 4, 32, 32, generator=g), timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(2, 77, 64, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)})
    assert unet.config.cross_attention_dim == 64
    ref = unet(**args).sample

    def body(comm):
        patched = parallelize(unet_replica(unet), comm, ParallelConfig(mode="sync_patch"))
        return patched(**args).sample, patched(**args, return_dict=False)[0]

    for a, b in spawn(body, 4):
        assert rel(a, ref) < 1e-5 and torch.equal(a, b)


def test_heights_that_do_not_split_get_a_clear_error(pipe):
    with pytest.raises(RankFailed, match=r"multiple of 8\*2\^2=32.*image heights such as"):
        spawn(run, 8, pipe, ParallelConfig(mode="sync_patch", split_cfg=False), 1, 64 + 16)


def test_unsupported_model_types_and_options_are_rejected(pipe):
    def body(comm):
        with pytest.raises(TypeError, match="parallelize supports StableDiffusionXLPipeline"):
            parallelize(pipe.vae, comm)
        return True

    assert spawn(body, 1) == [True]
    with pytest.raises(ValueError, match="mode must be one of"):
        ParallelConfig(mode="fast")
    with pytest.raises(ValueError, match="groupnorm must be one of"):
        ParallelConfig(groupnorm="mean")


def test_a_rank_failing_mid_run_stops_everyone_quickly(pipe):
    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank 1 failed: InjectedFailure"):
        spawn(run, 4, pipe, ParallelConfig(split_cfg=False), fail_rank=1, fail_at=200, timeout=30)
    assert time.monotonic() - start < 20


def test_mode_none_runs_the_whole_unet_through_the_graphable_forward(pipe, reference):
    """Mode none installs the same-signature forward that replays steps as CUDA graphs on CUDA;
    on the CPU it is the stock UNet, bitwise."""
    forwards = set()

    def body(comm):
        return run(comm, pipe, ParallelConfig(mode="none"), probe=lambda p, _: forwards.add(type(p.unet.forward)))

    want = replica(pipe)("a lighthouse", height=64, width=64, num_inference_steps=STEPS, output_type="latent",
                         generator=torch.Generator().manual_seed(0)).images
    assert all(torch.equal(out, want) for out in spawn(body, 2))
    assert torch.equal(reference, want) and forwards == {UNetForward}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (bench/gpu_session.sh measures them)")
@pytest.mark.parametrize("mode", ["none", "displaced"])
def test_graphed_steps_equal_eager_steps_on_cuda(mode):
    cuda_pipe = build_pipeline("tiny", device="cuda")
    cuda_pipe.set_progress_bar_config(disable=True)

    def body(comm, graphed):
        mine = parallelize(replica(cuda_pipe), comm, ParallelConfig(mode=mode, cuda_graph=graphed, split_cfg=False))
        out = mine("a lighthouse", height=64, width=64, num_inference_steps=STEPS, output_type="latent",
                   generator=torch.Generator("cuda").manual_seed(0)).images
        return out, len(mine.unet_forward.graphs.graphs)

    (eager, _), = spawn(body, 1, False, device="cuda")
    (graphed, captured), = spawn(body, 1, True, device="cuda")
    assert captured == 1
    assert rel(graphed, eager) < 1e-5
