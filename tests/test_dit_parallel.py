"""distrifusion.parallelize on bare diffusion transformers (PixArt, SD3, Flux; tiny random
configs, float32), ranks as threads of this process (the fake backend)."""

from __future__ import annotations

import bisect
import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
from hypothesis import example, given, settings
from hypothesis import strategies as st

from backends.fake import RankFailed, spawn
from backends.recording import Recorder
from distrifusion import ParallelConfig, parallelize
from distrifusion.patch_dit import DiTForward
from distrifusion.pipeline_factory import build_pipeline
from distrifusion.rank_replica import replica, unet_replica
from distrifusion.token_rows import TokenRows
from strict_dtypes import StrictDtypes

FAMILIES = ("pixart", "sd3", "flux")
TEXT_TOKENS = 5
CHANNELS = {"pixart": 4, "sd3": 4, "flux": 8}  # latent channels (Flux: per packed token)


def build(family: str, pixart_layers: int = 2) -> torch.nn.Module:
    """A tiny random-weight transformer of `family`: 2 heads of 8 channels, 1-2 blocks of each kind."""
    torch.manual_seed(0)
    heads = dict(num_attention_heads=2, attention_head_dim=8)
    if family == "pixart":
        model = PixArtTransformer2DModel(**heads, in_channels=4, out_channels=8, num_layers=pixart_layers, cross_attention_dim=16,
                                         sample_size=8, caption_channels=12, use_additional_conditions=False)
    elif family == "sd3":
        model = SD3Transformer2DModel(**heads, sample_size=8, in_channels=4, out_channels=4, num_layers=2,
                                      joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=8,
                                      pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    else:
        model = FluxTransformer2DModel(**heads, in_channels=8, num_layers=1, num_single_layers=2, joint_attention_dim=12,
                                       pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {family: build(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def exact_models(models) -> dict[str, torch.nn.Module]:
    """The same models in float64: the exact results float32 rounding is measured against."""
    return {family: copy.deepcopy(model).double() for family, model in models.items()}


def image_ids(rows: int, width: int) -> torch.Tensor:
    """Flux's (rows*width, 3) position ids (0, row, column), raster order, as FluxPipeline makes them."""
    ids = torch.zeros(rows, width, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(-1, 3)


def inputs(family: str, batch: int, rows: int, width: int, seed: int = 0) -> dict:
    """One call's arguments for a `rows` x `width` token grid (PixArt/SD3: a latent of twice that)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, TEXT_TOKENS, 12, generator=g)
    if family == "flux":
        return dict(hidden_states=torch.randn(batch, rows * width, 8, generator=g), encoder_hidden_states=text,
                    pooled_projections=torch.randn(batch, 8, generator=g), timestep=torch.full((batch,), 0.5),
                    img_ids=image_ids(rows, width), txt_ids=torch.zeros(TEXT_TOKENS, 3),
                    guidance=torch.full((batch,), 3.5))
    args = dict(hidden_states=torch.randn(batch, 4, 2 * rows, 2 * width, generator=g), encoder_hidden_states=text,
                timestep=torch.full((batch,), 500.0))
    if family == "sd3":
        args["pooled_projections"] = torch.randn(batch, 8, generator=g)
    else:
        args["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return args


def timestep(family: str, step: int, batch: int) -> torch.Tensor:
    """A slowly falling timestep (Flux: in [0, 1], the others: in [0, 1000])."""
    t = 0.5 - 0.01 * step
    return torch.full((batch,), t if family == "flux" else 1000 * t)


def cast(args: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in args.items()}


def call(model: torch.nn.Module, args: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**args, return_dict=False)[0]


def parallel_call(model: torch.nn.Module, world_size: int, config: ParallelConfig, args: dict) -> list[torch.Tensor]:
    """Every rank's output of one call of `model` made parallel under `config`."""
    return spawn(lambda comm: parallelize(unet_replica(model), comm, config)(**args).sample, world_size)


def denoise(comm, model: torch.nn.Module, config: ParallelConfig, family: str, steps: int = 10,
            probe=None, generations: int = 1, device: str = "cpu") -> torch.Tensor:
    """x <- x - 0.1 * model(x) for `steps` steps with a slowly falling timestep on a 6 x 4 token
    grid; the final x (of the last of `generations`, each started by `ctx.reset()`).
    `probe(model, step)` runs after every step."""
    mine = parallelize(unet_replica(model), comm, config)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs(family, 1, 6, 4).items()}
    start = args.pop("hidden_states")
    del args["timestep"]
    for _ in range(generations):
        if config.mode != "none":
            mine.forward.ctx.reset()
        x = start
        for step in range(steps):
            out = mine(hidden_states=x, timestep=timestep(family, step, 1).to(device), **args, return_dict=False)[0]
            x = x - 0.1 * out[:, :x.shape[1]]
            if probe is not None:
                probe(mine, step)
    return x


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double())).item()


@given(rows=st.integers(1, 12), width=st.integers(1, 5), parts=st.integers(1, 5), rank=st.integers(0, 4))
def test_token_rows_deal_contiguous_rows_and_join_what_they_pad(rows, width, parts, rank):
    if parts > rows:
        with pytest.raises(ValueError, match="cannot be cut"):
            TokenRows(rows, width, parts, 0).counts
        return
    split = TokenRows(rows, width, parts, rank % parts)
    whole = torch.arange(rows * width * 3).view(rows * width, 3)
    assert sum(split.counts) == rows * width and max(split.counts) - min(split.counts) in (0, width)
    assert all(n % width == 0 for n in split.counts), "patches are whole rows"
    mine = split.take(whole, 0)
    assert torch.equal(mine, whole[split.offsets[split.rank]:][:split.counts[split.rank]])
    padded = torch.stack([TokenRows(rows, width, parts, r).pad(TokenRows(rows, width, parts, r).take(whole, 0), 0)
                          for r in range(parts)])
    assert padded.shape == (parts, split.largest, 3)
    joined = split.join(padded)
    assert torch.equal(joined, whole)
    if rows % parts == 0:
        assert joined.data_ptr() == padded.data_ptr() and split.pad(mine, 0) is mine, "even splits copy nothing"


@pytest.mark.parametrize("family", FAMILIES)
def test_mode_none_is_the_stock_forward_through_the_graphable_forward(models, family):
    args = inputs(family, 2, 5, 3)
    want = call(models[family], args)

    def body(comm):
        mine = parallelize(unet_replica(models[family]), comm, ParallelConfig(mode="none"))
        return type(mine.forward), mine(**args).sample, mine(**args, return_dict=False)[0]

    for forward, out, plain in spawn(body, 2):
        assert forward is DiTForward and torch.equal(out, want) and torch.equal(plain, want)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=3, deadline=None)
@given(split_cfg=st.booleans(), rows=st.integers(4, 9), width=st.integers(1, 3), seed=st.integers(0, 2**16))
@example(split_cfg=True, rows=8, width=2, seed=0)  # even patches, both with and without the CFG halves
@example(split_cfg=False, rows=7, width=1, seed=1)  # uneven patches (and token counts) for N = 2 and 4
def test_sync_patch_equals_none_within_float32_rounding(models, exact_models, family, world_size, split_cfg, rows,
                                                        width, seed):
    """sync_patch computes what the whole model computes, in another order (per-patch matrix
    products, keys in another order). Both float32 results are then as far from the exact one
    (float64) as each other: sums of as many roundings of the same terms. A factor 3 covers
    the spread of two such errors over a few hundred outputs; a misplaced token or a stale K/V
    is off by orders of magnitude more."""
    model = models[family]
    args = inputs(family, 2, rows, width, seed)  # batch 2: with split_cfg, one half of the ranks per branch
    exact = call(exact_models[family], cast(args, torch.float64))
    whole = call(model, args)
    outs = parallel_call(model, world_size, ParallelConfig(mode="sync_patch", split_cfg=split_cfg), args)
    assert all(torch.equal(out, outs[0]) for out in outs), "ranks disagree"
    assert rel(outs[0], exact) <= 3 * rel(whole, exact) + 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_displaced_is_closer_to_none_than_naive_patch(models, family):
    model = models[family]
    ref = spawn(denoise, 1, model, ParallelConfig(mode="none"), family)[0]
    errors = {}
    for mode in ("naive_patch", "displaced"):
        config = ParallelConfig(mode=mode, warmup_steps=2, split_cfg=False)
        errors[mode] = rel(spawn(denoise, 4, model, config, family)[0], ref)
    print(f"{family}, 10 steps, 4 patches: naive rel err {errors['naive_patch']:.2e}, displaced {errors['displaced']:.2e}")
    assert errors["displaced"] < errors["naive_patch"] / 3
    assert errors["displaced"] > 1e-6, "displaced must actually use stale activations after warm-up"


@pytest.mark.parametrize("family", FAMILIES)
def test_each_patch_gets_the_position_embeddings_of_its_global_tokens(models, family):
    """PixArt/SD3: each rank's patch-embedding tokens (with their position embeddings) are the
    rows of the whole latent's; Flux: each rank's rotary cos/sin are the text's and then its
    tokens' rows of the whole sequence's. 7 rows of 3 over 4 ranks: patches of unequal size."""
    model, rows, width, n = models[family], 7, 3, 4
    args = inputs(family, 1, rows, width)
    units, unit = (rows * width, 1) if family == "flux" else (rows, width)  # Flux splits tokens, the others rows
    counts = [(units // n + (r < units % n)) * unit for r in range(n)]
    with torch.no_grad():
        if family == "flux":
            whole = model.pos_embed(torch.cat([args["txt_ids"], args["img_ids"]]))
        else:
            whole = (model.pos_embed(args["hidden_states"]),)

    def body(comm):
        mine = parallelize(unet_replica(model), comm, ParallelConfig(mode="sync_patch", split_cfg=False))
        seen, embed = [], mine.pos_embed.forward
        mine.pos_embed.forward = lambda x: seen.append(embed(x)) or seen[-1]
        mine(**args)
        return seen[0] if family == "flux" else (seen[0],)

    for rank, got in enumerate(spawn(body, n)):
        start = sum(counts[:rank])
        for part, full in zip(got, whole):
            if family == "flux":
                full = torch.cat([full[:TEXT_TOKENS], full[TEXT_TOKENS + start:TEXT_TOKENS + start + counts[rank]]])
                assert torch.equal(part, full), f"rank {rank}: rotary embedding"
            else:
                assert torch.equal(part, full[:, start:start + counts[rank]]), f"rank {rank}: patch embedding"


@pytest.mark.parametrize("compress", ["none", "int8"])
def test_displaced_steady_steps_overlap_communication_and_allocate_no_buffers(models, compress):
    """Flux (double- and single-stream blocks), 2 ranks, warm-up 2: steady steps start every
    attention layer's gather asynchronously and wait for it a step later, in buffers allocated
    before (int8: 8-bit payloads)."""
    steps, step_ends, allocations = 6, [], []

    def body(comm):
        rec = Recorder(comm)

        def probe(mine, step):
            if comm.rank == 0:
                step_ends.append(len(rec.events))
                allocations.append(mine.forward.ctx.allocations)

        config = ParallelConfig(mode="displaced", warmup_steps=2, split_cfg=False, compress=compress)
        denoise(rec, models["flux"], config, "flux", steps, probe=probe)
        return rec

    rec = spawn(body, 2)[0]
    assert allocations[0] > 0 and len(set(allocations)) == 1, allocations
    step_of = lambda event_index: bisect.bisect_right(step_ends, event_index)  # noqa: E731
    layers = [r for r in rec.records if r.tag.startswith("attn:")]
    for step in range(steps - 1):  # the last step's gathers are waited for after it
        issued = [r for r in layers if step_of(r.issue_index) == step]
        assert len(issued) == 3, "one gather per attention layer (1 double-stream, 2 single-stream blocks)"
        steady = step >= 2
        assert all(r.async_op == steady and step_of(r.wait_index) == step + steady for r in issued), \
            "warm-up gathers are waited at once, steady ones a step later"
        assert all(r.dtype == ("uint8" if steady and compress == "int8" else "float32") for r in issued)


def test_a_displaced_step_attends_to_its_own_fresh_tokens():
    """One attention layer, 2 ranks, a second step that changes rank 0's rows only: the other
    patch's stale K/V are then its fresh ones, so rank 0's rows come out of the displaced step
    as out of a synchronous one, by the same operations on the same values (bitwise); with its
    own K/V from the last step they would not."""
    model = build("pixart", pixart_layers=1)
    first = inputs("pixart", 1, 4, 2)
    second = dict(first, hidden_states=first["hidden_states"].clone())
    second["hidden_states"][..., :4, :] += 1  # rank 0's two token rows (four latent rows)

    def body(comm, mode):
        mine = parallelize(unet_replica(model), comm, ParallelConfig(mode=mode, warmup_steps=1, split_cfg=False))
        mine(**first)
        return mine(**second).sample

    displaced, sync = spawn(body, 2, "displaced")[0], spawn(body, 2, "sync_patch")[0]
    assert torch.equal(displaced[..., :4, :], sync[..., :4, :])
    assert not torch.equal(displaced[..., 4:, :], sync[..., 4:, :]), "rank 1 must read rank 0's stale K/V"


def test_int8_compressed_displaced_stays_closer_to_none_than_naive_patch(models):
    ref = spawn(denoise, 1, models["sd3"], ParallelConfig(mode="none"), "sd3")[0]
    naive, compressed = (spawn(denoise, 4, models["sd3"], ParallelConfig(mode=mode, warmup_steps=2, split_cfg=False,
                                                                        compress=compress), "sd3")[0]
                         for mode, compress in (("naive_patch", "none"), ("displaced", "int8")))
    assert rel(compressed, ref) < rel(naive, ref) / 3


def test_reset_starts_a_new_generation_of_a_bare_transformer(models):
    """`model.forward.ctx.reset()`: the second generation warms up again and repeats the first."""
    config = ParallelConfig(mode="displaced", warmup_steps=2, split_cfg=False)
    once = spawn(denoise, 2, models["pixart"], config, "pixart", 4)
    twice = spawn(denoise, 2, models["pixart"], config, "pixart", 4, None, 2)
    assert all(torch.equal(a, b) for a, b in zip(once, twice))


def test_fewer_token_rows_than_ranks_and_controlnet_inputs_are_clear_errors(models):
    config = ParallelConfig(mode="sync_patch", split_cfg=False)
    with pytest.raises(RankFailed, match="3 rows cannot be cut into 4 row patches"):
        parallel_call(models["sd3"], 4, config, inputs("sd3", 1, 3, 2))
    residuals = dict(inputs("sd3", 1, 4, 2), block_controlnet_hidden_states=[torch.zeros(1, 8, 16)])
    with pytest.raises(RankFailed, match=r"does not support \['block_controlnet_hidden_states'\]"):
        parallel_call(models["sd3"], 2, config, residuals)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_displaced_step_obeys_cuda_dtype_rules(models, family, dtype):
    """A synchronous and a displaced step (2 ranks, CFG halves, then 2 ranks on one image) under
    `StrictDtypes`: no dtype mix a CUDA kernel would reject, and a finite output of the model's dtype."""
    model = copy.deepcopy(models[family]).to(dtype)
    args = cast(inputs(family, 2, 4, 2), dtype)

    def body(comm, split_cfg):
        mine = parallelize(unet_replica(model), comm, ParallelConfig(mode="displaced", warmup_steps=1, split_cfg=split_cfg))
        with StrictDtypes() as strict:
            outs = [mine(**args).sample for _ in range(2)]
        return outs[-1], strict.calls

    for split_cfg in (True, False):
        for out, calls in spawn(body, 2, split_cfg):
            assert calls > 100 and out.dtype == dtype and out.isfinite().all()


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_ranks_return_the_image_of_mode_none(family):
    """parallelize(pipe) for the tiny pipelines, 2 ranks, sync_patch, rank 0 decoding alone
    (PixArt/SD3: one guidance branch per rank): every rank returns the single-device image, to
    float32 rounding (1e-5, ~100 eps, for two steps' reordered sums). Flux's true CFG is refused."""
    pipe = build_pipeline(family)
    pipe.set_progress_bar_config(disable=True)

    def body(comm, mode, kwargs=None):
        mine = parallelize(replica(pipe), comm, ParallelConfig(mode=mode, vae="none"))
        return mine("a lighthouse", height=64, width=48, num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(0), **(kwargs or {})).images

    whole = spawn(body, 1, "none")[0]
    images = spawn(body, 2, "sync_patch")
    assert whole.shape == (1, 3, 64, 48) and all(torch.equal(image, images[0]) for image in images)
    assert rel(images[0], whole) < 1e-5
    if family == "flux":
        with pytest.raises(RankFailed, match="true_cfg_scale"):
            spawn(body, 2, "displaced", {"negative_prompt": "fog", "true_cfg_scale": 2.0})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (bench/gpu_session.sh measures them)")
@pytest.mark.parametrize("mode", ["none", "displaced"])
def test_graphed_steps_equal_eager_steps_on_cuda(models, mode):
    """On CUDA, mode none graphs every step and displaced its steady steps (one graph each)."""
    model = copy.deepcopy(models["flux"]).cuda()

    def body(comm, graphed):
        captured = []
        config = ParallelConfig(mode=mode, warmup_steps=2, split_cfg=False, cuda_graph=graphed)
        x = denoise(comm, model, config, "flux", 6, lambda mine, _: captured.append(len(mine.forward.graphs.graphs)),
                    device="cuda")
        return x, captured[-1]

    (eager, _), = spawn(body, 1, False, device="cuda")
    (graphed, captured), = spawn(body, 1, True, device="cuda")
    assert captured == 1 and rel(graphed, eager) < 1e-5
