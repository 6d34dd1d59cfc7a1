"""The patch-parallel VAE decode in the simulator (`simulator.vae_decode`): recorded from the real
patched code, its collectives, its time on the interconnect model, rank 0's peak memory, and
its cache key; `parallel.vae=none` and mode none keep the whole decode on rank 0."""

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from distrifusion.pipeline_factory import build_vae
from simulator import workload
from simulator.compute_model import ComputeModel
from simulator.generation import load_or_record_stages, stage_seconds, versioned_path
from simulator.hardware import load_hardware
from simulator.memory import peak_memory
from simulator.topology import Topology, isolated_time
from simulator.vae_decode import decode_args, decode_seconds, load_or_record_decode

N = 8
HARDWARE = ("h100_sxm_nvlink", "a100_pcie")


@pytest.fixture(scope="module")
def sdxl(cache):
    """SDXL fp16 at 3840 (decoding in float32): the stages (the whole decode; shared with
    test_simulator_generation.py) and rank 0 of the patched decode on 8 ranks (about 5 s)."""
    return {"stages": load_or_record_stages("sdxl", 3840, cache_dir=cache),
            "patch": load_or_record_decode("sdxl", 3840, N, cache_dir=cache)}


def test_patched_sdxl_decode_at_3840_on_8_ranks_is_faster_and_needs_under_a_quarter_of_the_memory(sdxl):
    whole, patch = sdxl["stages"], sdxl["patch"]
    for name in HARDWARE:
        hardware = load_hardware(name)
        whole_s = stage_seconds(whole, ComputeModel(hardware.device, "float16"))["vae_decode_s"]
        patch_s = decode_seconds(patch, hardware)
        print(f"{name}: whole {whole_s:.3f} s, {N} ranks {patch_s['vae_decode_s']:.3f} s "
              f"({patch_s['vae_comm_s']:.3f} s of collectives)")
        assert 0 < patch_s["vae_comm_s"] < patch_s["vae_decode_s"] < whole_s
    assert patch["meta"]["decode_dtype"] == whole["memory"]["vae_decode_dtype"] == "float32"
    assert patch["memory"]["vae_decode_weights_bytes"] == whole["memory"]["vae_decode_weights_bytes"]
    assert 0 < patch["memory"]["vae_decode_peak_bytes"] < whole["memory"]["vae_decode_peak_bytes"] / 4


def test_the_decode_is_its_eager_compute_plus_every_blocking_collective(sdxl):
    patch, hardware = sdxl["patch"], load_hardware("a100_pcie")
    events = patch["events"]
    # one exchange per 3x3 convolution (edge rows) and GroupNorm (moments), the attention's K/V, the image
    vae = build_vae("sdxl", "meta", torch.float32)
    layers = [name for name, m in vae.decoder.named_modules()
              if isinstance(m, nn.GroupNorm) or (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))]
    issues = [e for e in events if e["type"] == "issue"]
    assert Counter(e["tag"] for e in issues) == Counter(
        [f"vae:{name}" for name in layers] + ["vae:mid_block.attentions.0", "output:vae"])
    assert all(e["kind"] == "all_gather" and not e["async"] and e["group_size"] == N for e in issues)
    latent = 3840 // 8
    rows, c = latent // N, vae.config.block_out_channels[-1]
    by_tag = {e["tag"]: e["bytes"] for e in issues}
    assert by_tag["vae:mid_block.attentions.0"] == rows * latent * 2 * c * 4  # (tokens, B, 2C), float32
    assert by_tag["output:vae"] == 3 * rows * 8 * 3840 * 4  # (B, 3, rows x 8, W)
    # blocking and in sequence: the decode's time is every compute segment (eager) plus every collective
    model, topology = ComputeModel(hardware.device, "float16"), Topology(hardware, N)
    compute = sum(model.event_seconds(e, eager=True) for e in events if e["type"] == "compute")
    comm = sum(isolated_time(topology.plan(e["kind"], e["bytes"], 0, N), topology.ring(0, N)) for e in issues)
    seconds = decode_seconds(patch, hardware)
    assert seconds["vae_compute_s"] == pytest.approx(compute, rel=1e-9)
    assert seconds["vae_comm_s"] == pytest.approx(comm, rel=1e-9)
    assert seconds["vae_decode_s"] == pytest.approx(compute + comm, rel=1e-9)


def test_vae_none_and_mode_none_decode_whole_on_rank_0(cache):
    stages = load_or_record_stages("tiny", 64, cache_dir=cache)["memory"]
    patch = load_or_record_decode("tiny", 64, 2, cache_dir=cache)["memory"]
    patched, whole = (peak_memory("tiny", 64, 2, "displaced", split_cfg=False, vae=vae, cache_dir=cache)
                      for vae in ("patch", "none"))
    single = peak_memory("tiny", 64, 1, "displaced", vae="patch", cache_dir=cache)
    assert patched["vae_decode"] == "patch" and whole["vae_decode"] == single["vae_decode"] == "whole"
    assert patched["vae_decode_peak_bytes"] == patch["vae_decode_peak_bytes"] < stages["vae_decode_peak_bytes"]
    assert whole["vae_decode_peak_bytes"] == single["vae_decode_peak_bytes"] == stages["vae_decode_peak_bytes"]
    assert (whole["phases"]["vae_decode"] - patched["phases"]["vae_decode"]
            == stages["vae_decode_peak_bytes"] - patch["vae_decode_peak_bytes"])
    with pytest.raises(ValueError, match="vae must be one of"):
        peak_memory("tiny", 64, 2, "displaced", vae="tiled", cache_dir=cache)


@pytest.mark.parametrize("source", ["patch_vae.py", "exact_rows.py"])
def test_the_cache_key_follows_the_patch_code(monkeypatch, source):
    args = decode_args("sdxl", 3840, N)
    before = versioned_path("vae", args)
    read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read(self) + (b"\n# edited" if self.name == source else b""))
    workload.code_version.cache_clear()
    try:
        assert versioned_path("vae", args) != before
    finally:
        workload.code_version.cache_clear()
    assert versioned_path("vae", {**args, "chunk_mib": 64}) != before
