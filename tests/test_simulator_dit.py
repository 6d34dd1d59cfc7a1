"""Diffusion transformers (PixArt, SD3, Flux) in the simulator: what the real patched code sends,
recorded on meta; the inputs the runner gives the transformer against those its pipeline gives;
predictions; cache keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from strict_dtypes import StrictDtypes

from distrifusion.generate import pipeline_options
from distrifusion.model_configs import get_spec
from distrifusion.pipeline_factory import build_pipeline, build_transformer
from distrifusion.token_rows import TokenRows
from simulator import load_hardware, workload
from simulator.op_counter import OpCounter
from simulator.predict import predict
from simulator.transformer_inputs import transformer_inputs
from simulator.unet_run import EmulatedUNet, latent_size
from simulator.workload import cache_path, load_or_record, trace_args

RES = 64  # the tiny models' native size: a 32 x 32 latent


def attention_layers(model: str) -> int:
    """Attention layers whose image K/V a rank exchanges: every block's (Flux: double- and single-stream)."""
    config = get_spec(model).transformer
    return config["num_layers"] + config.get("num_single_layers", 0)


def issues(events: list[dict]) -> list[dict]:
    return [e for e in events if e["type"] == "issue"]


@pytest.mark.parametrize("model, ranks", [("flux", 4), ("sd3", 4), ("pixart", 3)])
def test_each_step_gathers_every_attentions_image_kv_and_then_the_output(cache, model, ranks):
    """Per step: one gather per attention layer of 2 * tokens_per_rank * hidden * 2 bytes per
    image (K and V in float16; the largest patch where rows split unevenly), then the output."""
    spec = get_spec(model)
    cfg = spec.classifier_free_guidance
    split = cfg and ranks % 2 == 0  # split CFG: a guidance branch (one image) per half of the ranks
    patches, images = (ranks // 2, 1) if split else (ranks, 2 if cfg else 1)
    side = latent_size(model, RES) // spec.latent_pixels_per_token
    tokens_per_rank = TokenRows(side, side, patches, 0).largest
    hidden = spec.transformer["num_attention_heads"] * spec.transformer["attention_head_dim"]
    kv_bytes = 2 * images * tokens_per_rank * hidden * 2

    trace = load_or_record(model, RES, ranks, "displaced", cfg=cfg, cache_dir=cache)
    phases = trace["roles"][0]["phases"]
    warm, steady = issues(phases["warmup"]), issues(phases["steady"])
    layers = attention_layers(model)
    assert trace["meta"]["exchanges"] == layers and len(warm) == len(steady) == layers + 1
    for phase, asynchronous in ((warm, False), (steady, True)):
        *attention, output = phase
        assert all(e["tag"].startswith("attn:") for e in attention)
        assert {(e["bytes"], e["group_size"], e["async"]) for e in attention} == {(kv_bytes, patches, asynchronous)}
        assert (output["tag"], output["group_size"], output["async"]) == ("output:transformer", ranks, False)
    assert sorted(w["id"] for w in phases["final"]) == sorted(e["id"] for e in steady if e["async"])


def test_sync_patch_sends_the_same_bytes_synchronously_and_naive_patch_only_the_output(cache):
    displaced, sync, naive = (issues(load_or_record("flux", RES, 4, mode, cfg=False, cache_dir=cache)
                                     ["roles"][0]["phases"]["steady"]) for mode in ("displaced", "sync_patch", "naive_patch"))
    assert [(e["tag"], e["bytes"]) for e in sync] == [(e["tag"], e["bytes"]) for e in displaced]
    assert not any(e["async"] for e in sync)
    assert [e["tag"] for e in naive] == ["output:transformer"]


@pytest.mark.parametrize("model", ["flux", "sd3", "pixart"])
def test_the_runner_gives_the_transformer_what_its_pipeline_gives_it(model):
    """The tiny pipeline's own call (one step, as the app calls it) against `transformer_inputs`:
    the same tensors with the same shapes, and Flux's image position ids with the same values."""
    spec = get_spec(model)
    pipe = build_pipeline(model, device="cpu")
    seen: dict = {}
    forward = pipe.transformer.forward

    def spy(*args, **kwargs):
        seen.update(kwargs, **({"hidden_states": args[0]} if args else {}))
        return forward(*args, **kwargs)

    pipe.transformer.forward = spy
    as_the_app = pipeline_options(pipe, model, lambda _pipe, step, t, kwargs: kwargs)
    pipe("a lighthouse", num_inference_steps=1, height=RES, width=RES, output_type="latent", **as_the_app)
    batch = 2 if spec.classifier_free_guidance else 1
    ours = transformer_inputs(model, build_transformer(model), latent_size(model, RES), batch, torch.float16, "meta")

    def shapes(inputs: dict) -> dict:
        flat = {**inputs, **{f"added_cond_kwargs.{k}": v for k, v in (inputs.get("added_cond_kwargs") or {}).items()}}
        return {k: tuple(v.shape) for k, v in flat.items() if isinstance(v, torch.Tensor)}

    assert shapes(ours) == shapes(seen)
    if model == "flux":
        cpu = transformer_inputs(model, pipe.transformer, latent_size(model, RES), batch, torch.float32, "cpu")
        assert torch.equal(cpu["img_ids"], seen["img_ids"]) and torch.equal(cpu["txt_ids"], seen["txt_ids"])


@pytest.mark.parametrize("model", ["flux", "sd3", "pixart"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_emulated_rank_runs_in_half_precision_on_a_real_device(model, dtype):
    """The runner's inputs in `dtype` on the CPU, under CUDA's dtype rules (what calibration runs)."""
    run = EmulatedUNet(model, RES, 2, "displaced", OpCounter(), device="cpu", dtype=dtype,
                       cfg=get_spec(model).classifier_free_guidance)
    with StrictDtypes():
        out = run.step()
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_displaced_hides_the_exchange_that_sync_patch_waits_for_on_a_slow_link(cache):
    pcie = load_hardware("a100_pcie")
    slow = dataclasses.replace(pcie, interconnect=dataclasses.replace(pcie.interconnect, link_bandwidth=2e8,
                                                                    host_bridge_bandwidth=2e8))
    runs = {mode: predict("flux", 128, 4, mode, slow, 20, cfg=False, cache_dir=cache)
            for mode in ("displaced", "sync_patch", "naive_patch")}
    sync, displaced, naive = runs["sync_patch"].result, runs["displaced"].result, runs["naive_patch"].result
    assert sync.comm_exposed_s == pytest.approx(sync.comm_s)  # nothing overlaps a synchronous gather
    assert displaced.comm_bytes_per_device == sync.comm_bytes_per_device
    assert displaced.comm_exposed_s < sync.comm_exposed_s  # steady steps overlap their gathers
    assert naive.latency_s < displaced.latency_s < sync.latency_s


def test_cache_keys_differ_per_model_and_follow_the_transformer_code(monkeypatch):
    keys = {model: cache_path(trace_args(model, 1024, 4, "displaced")) for model in ("sdxl", "flux_dev", "sd3_medium",
                                                                                   "pixart_sigma")}
    assert len(set(keys.values())) == len(keys)
    read = Path.read_bytes
    for source in ("patch_flux.py", "dit_attention.py", "transformer_inputs.py"):
        monkeypatch.setattr(Path, "read_bytes", lambda self, s=source: read(self) + (b"#" if self.name == s else b""))
        workload.code_version.cache_clear()
        try:
            assert cache_path(trace_args("flux_dev", 1024, 4, "displaced")) != keys["flux_dev"], source
        finally:
            monkeypatch.setattr(Path, "read_bytes", read)
            workload.code_version.cache_clear()
