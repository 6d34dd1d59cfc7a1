"""The simulator with `parallel.compress` / `parallel.delta`: recorded 8-bit payloads, their codec
kernels, the 8-bit stale buffers, and when the smaller gathers pay off."""

from __future__ import annotations

import dataclasses

import pytest

from distrifusion.compression import BlockCodec
from simulator import load_hardware, simulate
from simulator.config import parallel_options
from simulator.live_memory import allocation_bytes
from simulator.memory import load_or_record_unet_memory
from simulator.predict import rank_compute_seconds
from simulator.workload import load_or_record, trace_args

SETUP = {"model": "tiny", "resolution": 64, "world_size": 2, "mode": "displaced", "split_cfg": False,
         "dtype": "float16"}
FLOAT16_BYTES = 2
COMPRESSED = ("attn", "conv")  # the layers whose gathers `parallel.compress` shrinks (norm stays float32)
STEPS = 10


def trace(cache, compress: str = "none", delta: bool = False) -> dict:
    return load_or_record(**SETUP, cache_dir=cache, compress=compress, delta=delta)


def issues(trace: dict, phase: str) -> list[dict]:
    return [e for e in trace["roles"][0]["phases"][phase] if e["type"] == "issue"]


def launches(trace: dict, kind: str) -> int:
    return sum(op["count"] for e in trace["roles"][0]["phases"]["steady"] if e["type"] == "compute"
               for op in e["ops"] if op["kind"] == kind)


def layer(issue: dict) -> str:
    return issue["tag"].split(":")[0]


def test_displaced_gathers_carry_8bit_payloads_and_the_codec_runs_per_exchange(cache):
    none, int8 = trace(cache), trace(cache, "int8")
    assert int8["meta"]["compress"] == "int8" and none["meta"]["compress"] == "none"
    assert issues(int8, "warmup") == issues(none, "warmup")  # synchronous steps send the values
    compressed = 0
    for plain, coded in zip(issues(none, "steady"), issues(int8, "steady"), strict=True):
        assert (plain["tag"], plain["group_size"]) == (coded["tag"], coded["group_size"])
        if layer(plain) in COMPRESSED:
            codec = BlockCodec("int8", plain["bytes"] // FLOAT16_BYTES)
            assert coded["bytes"] == codec.payload_bytes  # (128 + 4) bytes per 128 values, not 256
            compressed += 1
        else:
            assert coded["bytes"] == plain["bytes"]
    assert compressed > 0
    # every compressed exchange encodes once per displaced step (one block min/max pass each); none has no codec
    assert launches(int8, "aminmax") == compressed and launches(none, "aminmax") == 0
    assert launches(int8, "round_") == compressed and launches(none, "round_") == 0


def test_stale_buffers_are_the_8bit_payloads_and_delta_adds_full_precision_copies(cache):
    def stale(compress: str, delta: bool = False) -> int:
        args = trace_args(**SETUP, compress=compress, delta=delta)
        return load_or_record_unet_memory(args, cache)["stale_buffer_bytes"]

    # one (group, gathered bytes) buffer per exchange: what its steady gather fills
    def gathered(t: dict, layers: tuple[str, ...] = (*COMPRESSED, "norm")) -> int:
        return sum(allocation_bytes(e["group_size"] * e["bytes"]) for e in issues(t, "steady") if layer(e) in layers)

    none, int8 = trace(cache), trace(cache, "int8")
    assert stale("none") == gathered(none)
    assert stale("int8") == gathered(int8) < 0.6 * stale("none")
    assert stale("int8", delta=True) == gathered(int8) + gathered(none, COMPRESSED)


def test_compression_pays_on_a_slow_link_and_costs_its_codec_on_a_fast_one(cache):
    none, int8 = trace(cache), trace(cache, "int8")
    fast = load_hardware("h100_sxm_nvlink")
    pcie = load_hardware("a100_pcie")
    # 1 MB/s: a step's gathers (about 0.5 MB) take longer than its compute
    slow = dataclasses.replace(pcie, interconnect=dataclasses.replace(pcie.interconnect, link_bandwidth=1e6))
    # the codec's kernels are priced: one rank's steady compute grows on either device
    for hardware in (fast, slow):
        assert rank_compute_seconds(int8, hardware) > rank_compute_seconds(none, hardware)
    on_fast = {name: simulate(t, fast, STEPS) for name, t in (("none", none), ("int8", int8))}
    on_slow = {name: simulate(t, slow, STEPS) for name, t in (("none", none), ("int8", int8))}
    assert on_fast["int8"].latency_s > on_fast["none"].latency_s  # the link was not the bottleneck
    assert on_slow["int8"].comm_s < on_slow["none"].comm_s
    assert on_slow["int8"].latency_s < on_slow["none"].latency_s


def test_parallel_options_read_compress_and_delta():
    assert parallel_options({"mode": "displaced"})["compress"] == "none"
    options = parallel_options({"mode": "displaced", "compress": "fp8", "delta": True})
    assert (options["compress"], options["delta"]) == ("fp8", True)
    for bad, match in (({"compress": "int4"}, "parallel.compress"), ({"delta": "yes"}, "parallel.delta"),
                       ({"delta": True}, "needs parallel.compress")):
        with pytest.raises(ValueError, match=match):
            parallel_options({"mode": "displaced", **bad})


def test_trace_args_drop_compression_where_nothing_is_displaced():
    for mode, world_size in (("sync_patch", 2), ("displaced", 1)):
        args = trace_args("tiny", 64, world_size, mode, compress="int8", delta=True)
        assert (args["compress"], args["delta"]) == ("none", False)
    assert trace_args("tiny", 64, 2, "displaced", compress="fp8")["compress"] == "fp8"
