"""The generation around the UNet (`simulator.generation`) and peak memory per rank
(`simulator.memory`): live-byte accounting, closed forms of the recorded work, the cache,
and the H100 measurements of `bench/reference/` (plus issue 14's stock VAE decode)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distrifusion.model_configs import get_spec
from simulator.generation import load_or_record_stages, stage_seconds
from simulator.live_memory import LiveMemory, allocation_bytes
from simulator.memory import CUBLAS_WORKSPACE_BYTES, load_or_record_unet_memory, peak_memory
from simulator.workload import trace_args

GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]
CEILING = {(r["res"], r["n"]): r["peak_gib"]
           for r in json.loads((ROOT / "bench" / "reference" / "h100_sdxl_patch_ceiling.json").read_text())["rows"]}
# Issue 14: stock diffusers' SDXL VAE decode of a 3840x3840 image on an H100 peaks at 38.6 GiB.
STOCK_VAE_DECODE_3840_GIB = 38.6
MATMULS = ("mm", "addmm", "bmm")


@pytest.fixture(scope="module")
def sdxl(cache):
    """SDXL fp16, recorded once for this file (about 15 s): the stages at 3840 and the memory of
    the unpatched UNet at batch 1 (the ceiling file's N=1 rows) at 1024 and 3840."""
    unet = {res: load_or_record_unet_memory(trace_args("sdxl", res, 1, "none", cfg=False), cache)
            for res in (1024, 3840)}
    return {"stages": load_or_record_stages("sdxl", 3840, cache_dir=cache), "unet": unet,
            "memory": peak_memory("sdxl", 3840, 1, "none", cfg=False, cache_dir=cache)}


def flops(event: dict, kinds: tuple[str, ...]) -> float:
    return sum(op["flops"] for op in event["ops"] if op["kind"] in kinds)


# --- live bytes ----------------------------------------------------------------------------------

def test_live_memory_counts_each_storage_once_while_any_tensor_uses_it():
    weight = torch.empty(1000, device="meta")  # made before the mode: not counted
    with LiveMemory() as memory:
        a = weight * 2  # 4000 bytes -> one 4096-byte block
        view, transposed = a.view(10, 100), a.view(10, 100).t()
        a.add_(1)
        weight.mul_(2)
        assert memory.live == 4096
        small = torch.empty(3, device="meta")  # 12 bytes -> the 512-byte minimum
        out = torch.empty(0, device="meta")
        torch.add(weight, weight, out=out)  # resized by the op: 4000 bytes
        assert memory.live == 4096 + 512 + 4096
        del a, view
        assert memory.live == 4096 + 512 + 4096  # `transposed` still uses the storage
        del transposed, out
        assert memory.live == 512
        del small
    assert (memory.live, memory.peak) == (0, 4096 + 512 + 4096)
    assert [allocation_bytes(n) for n in (0, 1, 512, 513)] == [0, 512, 512, 1024]


# --- the recorded stages against closed forms ------------------------------------------------------

def decoder_conv_flops(vae: dict, latent: int) -> float:
    """Convolution FLOPs of diffusers' `AutoencoderKL` decode of a `latent`-square latent:
    post_quant_conv, conv_in, the mid block's two resnets, every up block's resnets (a 1x1
    shortcut where channels change) and upsampler convolution, conv_out."""
    def conv(cin: int, cout: int, k: int, size: int) -> float:
        return 2.0 * cin * cout * k * k * size * size

    channels, lc, size = vae["block_out_channels"][::-1], vae["latent_channels"], latent
    total = conv(lc, lc, 1, size) + conv(lc, channels[0], 3, size) + 4 * conv(channels[0], channels[0], 3, size)
    cin = channels[0]
    for i, cout in enumerate(channels):
        for j in range(vae["layers_per_block"] + 1):
            a = cin if j == 0 else cout
            total += conv(a, cout, 3, size) + conv(cout, cout, 3, size) + (conv(a, cout, 1, size) if a != cout else 0)
        cin = cout
        if i < len(channels) - 1:
            size *= 2
            total += conv(cout, cout, 3, size)
    return total + conv(channels[-1], vae["out_channels"], 3, size)


def text_matmul_flops(model: str) -> float:
    """2 x tokens x the weights of every encoder layer's linears (q, k, v, out, two MLP), plus
    the pooled token through a projection: SDXL encodes the prompt once with CFG (the negative
    branch is zeros)."""
    spec = get_spec(model)
    total = 0.0
    for encoder in spec.text_encoders:
        h, i, n = (encoder.config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
        total += 2.0 * spec.max_length * n * (4 * h * h + 2 * h * i)
        if encoder.class_name == "CLIPTextModelWithProjection":
            total += 2.0 * h * encoder.config["projection_dim"]
    return total


def test_sdxl_stages_match_closed_forms(sdxl):
    stages, vae, latent = sdxl["stages"], get_spec("sdxl").vae, 3840 // 8
    assert flops(stages["vae_decode"], ("convolution",)) == pytest.approx(decoder_conv_flops(vae, latent), rel=1e-12)
    c = vae["block_out_channels"][-1]  # the mid block's one-head attention over every latent pixel
    assert flops(stages["vae_decode"], ("sdpa",)) == pytest.approx(4.0 * latent**4 * c, rel=1e-12)
    assert flops(stages["text_encoders"], MATMULS) == pytest.approx(text_matmul_flops("sdxl"), rel=1e-12)
    assert all(op["key"].startswith("f32|") for op in stages["vae_decode"]["ops"] if op["kind"] == "convolution")


def test_decode_work_scales_with_pixels_and_attention_with_their_square(cache):
    small, large = (load_or_record_stages("tiny", res, cache_dir=cache) for res in (64, 128))
    vae = get_spec("tiny").vae
    assert flops(small["vae_decode"], ("convolution",)) == pytest.approx(decoder_conv_flops(vae, 32), rel=1e-12)
    for kinds, ratio in ((("convolution", "native_group_norm", "silu"), 4), (("sdpa",), 16)):
        assert flops(large["vae_decode"], kinds) == pytest.approx(ratio * flops(small["vae_decode"], kinds), rel=1e-9)
    assert flops(large["text_encoders"], MATMULS) == flops(small["text_encoders"], MATMULS) == text_matmul_flops("tiny")
    assert large["scheduler_step"]["bytes"] == pytest.approx(4 * small["scheduler_step"]["bytes"], rel=1e-3)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_scheduler_step_is_device_work_on_the_latents(cache, sampler):
    latent = 4 * (64 // 2) ** 2  # tiny: 4 channels, VAE factor 2
    with_cfg, without = (load_or_record_stages("tiny", 64, cfg=cfg, cache_dir=cache, sampler=sampler)["scheduler_step"]
                         for cfg in (True, False))
    for event in (with_cfg, without):
        assert all(f"x{64 // 2}x{64 // 2}" in op["key"] for op in event["ops"]), event["ops"]  # host scalars dropped
        assert event["flops"] == sum(op["flops"] for op in event["ops"]) >= latent
    # CFG adds the latents' doubling and the guidance combine (sub, mul, add)
    assert with_cfg["flops"] - without["flops"] >= 4 * latent
    assert sum(op["count"] for op in with_cfg["ops"]) >= sum(op["count"] for op in without["ops"]) + 4


def test_stage_seconds_prices_each_stage_through_event_seconds(cache):
    stages = load_or_record_stages("tiny", 64, cache_dir=cache)

    class FlopModel:  # any compute model: here one second per FLOP
        def event_seconds(self, event: dict) -> float:
            return float(sum(op["flops"] for op in event["ops"]))

    seconds = stage_seconds(stages, FlopModel())
    assert seconds["text_encoders_s"] == stages["text_encoders"]["flops"] > 0
    assert seconds["vae_decode_s"] == stages["vae_decode"]["flops"] > 0
    assert seconds["scheduler_per_step_s"] == stages["scheduler_step"]["flops"] > 0
    assert 0 < seconds["host_per_step_s"] < 1e-2
    assert all(stages[name]["eager"] for name in ("text_encoders", "vae_decode", "scheduler_step"))


# --- peak memory --------------------------------------------------------------------------------------

def test_stale_buffers_are_held_through_the_decode_and_do_not_shrink_with_n(cache):
    none = peak_memory("tiny", 64, 1, "none", cache_dir=cache)
    two, four = (peak_memory("tiny", 64, n, "displaced", split_cfg=False, cache_dir=cache) for n in (2, 4))
    assert none["stale_buffer_bytes"] == 0 < two["stale_buffer_bytes"] <= four["stale_buffer_bytes"]
    for m in (none, two, four):
        held = m["weights_bytes"] + m["workspace_bytes"] + m["stale_buffer_bytes"]
        assert m["peak_bytes"] == max(m["phases"].values())
        assert m["phases"]["denoise"] == held + m["unet_peak_bytes"]
        assert m["phases"]["vae_decode"] > held + m["graph_pool_bytes"] + m["vae_decode_peak_bytes"]
        assert m["peak_allocated_bytes"] == max(m["phases"]["denoise"], m["phases"]["text_encoders"],
                                                m["phases"]["vae_decode"] - m["graph_pool_bytes"])
    assert four["unet_peak_bytes"] < two["unet_peak_bytes"] < none["unet_peak_bytes"]  # activations do shrink
    eager = peak_memory("tiny", 64, 2, "displaced", split_cfg=False, cuda_graph=False, cache_dir=cache)
    assert eager["graph_pool_bytes"] == 0 < two["graph_pool_bytes"] and eager["peak_bytes"] < two["peak_bytes"]


def test_cached_stages_and_memory_load_without_torch(cache):
    peak = peak_memory("tiny", 64, 2, "displaced", split_cfg=False, cache_dir=cache)
    code = ("import sys; from simulator.memory import peak_memory; "
            f"m = peak_memory('tiny', 64, 2, 'displaced', split_cfg=False, cache_dir={str(cache)!r}); "
            "assert 'torch' not in sys.modules; print(m['peak_bytes'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) == peak["peak_bytes"]


def test_sdxl_weights_and_decode_peak_match_closed_forms(sdxl):
    # the ceiling file's UNet: 2 567 463 684 parameters, in float16; each tensor its own block
    unet_params = 2_567_463_684
    assert 0 <= sdxl["unet"][1024]["unet_weights_bytes"] - 2 * unet_params < 512 * 2000
    # the decode's peak: up block 3's first resnet holds its 256-channel float32 input (the
    # caller's reference), GroupNorm's output and SiLU's, each 256 x 3840 x 3840 x 4 bytes
    three = 3 * 256 * 3840**2 * 4
    assert three <= sdxl["memory"]["vae_decode_peak_bytes"] < 1.01 * three


@pytest.mark.parametrize("res", [1024, 3840])
def test_sdxl_unet_peak_against_h100(sdxl, res):
    """The ceiling file's N=1 rows: the UNet alone (no text encoders or VAE), batch 1,
    graph-replayed, `torch.cuda.max_memory_allocated()`."""
    m = sdxl["unet"][res]
    predicted = m["unet_weights_bytes"] + 2 * CUBLAS_WORKSPACE_BYTES + m["inputs_bytes"] + m["steps_peak_bytes"]
    assert predicted / GIB == pytest.approx(CEILING[(res, 1)], rel=0.10)


def test_sdxl_vae_decode_peak_against_h100(sdxl):
    m = sdxl["memory"]
    predicted = (m["vae_decode_weights_bytes"] + m["vae_decode_peak_bytes"]) / GIB
    assert predicted == pytest.approx(STOCK_VAE_DECODE_3840_GIB, rel=0.15)
    assert m["peak_phase"] == "vae_decode" and m["vae_decode_peak_bytes"] > 5 * m["unet_peak_bytes"]
