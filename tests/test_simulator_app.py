"""What a user of `python -m simulator` sees: the JSON line, `advise`, the sweep plot.

Relations only (sums, ratios, orderings): the compute and communication models move the
numbers themselves. The `tiny` model at 64 px keeps every recording cheap.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from simulator import load_hardware
from simulator.advise import advise, device_counts, verdict
from simulator.compute_model import ComputeModel
from simulator.config import parallel_options
from simulator.engine import SimResult
from simulator.predict import predict, rank_compute_seconds, steady_step_seconds
from simulator.sweep import sweep_figure

PARTS = ("text_encoders_s", "unet_s", "scheduler_s", "vae_decode_s")


def run_app(*overrides: str, cache, out) -> dict:
    """Run `python -m simulator ...`; return its last line, parsed."""
    cmd = [sys.executable, "-m", "simulator", *overrides, f"trace_cache={cache}", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the JSON line ---------------------------------------------------------------------------------

def test_json_line_has_the_parts_of_the_latency_and_consistent_ratios(cache, tmp_path):
    s = run_app("model=tiny", "resolution=64", "world_size=2", "parallel=displaced", "steps=8",
                "parallel.warmup_steps=2", "parallel.split_cfg=false", "hardware=a100_pcie", cache=cache, out=tmp_path)
    assert s["latency_s"] == pytest.approx(sum(s[k] for k in PARTS), rel=1e-12)
    assert s["speedup"] == pytest.approx(s["single_device_latency_s"] / s["latency_s"], rel=1e-12)
    assert s["comm_s"] > 0 and 0 <= s["comm_hidden_fraction"] <= 1
    assert s["comm_hidden_fraction"] == pytest.approx(1 - s["comm_exposed_s"] / s["comm_s"])
    # one rank's steady step: its compute alone, then with the exchange it waits for
    assert 0 < s["rank_compute_ms_per_step"] <= s["step_ms"] * (1 + 1e-9)
    assert s["step_ms"] * 1e-3 * (8 - 2) < s["unet_s"]
    # the compute-only ceiling: less work than the real step, the same single-device step
    assert s["ceiling_step_ms"] < s["rank_compute_ms_per_step"]
    assert s["ceiling_speedup"] == pytest.approx(s["single_device_step_ms"] / s["ceiling_step_ms"], rel=1e-12)
    assert s["peak_memory_gib_per_rank"] > 0 and s["warmup_steps"] == 2 and s["split_cfg"] is False
    assert s["fits_in_memory"] is (s["peak_memory_gib_per_rank"] <= s["device_memory_gib"])
    # the whole generation of one device, through the same path
    one = predict("tiny", 64, 1, "none", load_hardware("a100_pcie"), 8, cache_dir=cache).summary()
    assert one["latency_s"] == pytest.approx(s["single_device_latency_s"], rel=1e-12)
    assert one["speedup"] == pytest.approx(1) and one["comm_hidden_fraction"] == 1.0 and one["ceiling_speedup"] == 1
    assert one["single_device_step_ms"] == pytest.approx(s["single_device_step_ms"], rel=1e-12)
    assert one["rank_compute_ms_per_step"] == pytest.approx(one["step_ms"], rel=1e-9)
    # a later generation (graphs captured) replays more steps than the first: the app passes `graphs` on
    warm = predict("tiny", 64, 2, "displaced", load_hardware("a100_pcie"), 8, warmup_steps=2, split_cfg=False,
                   cache_dir=cache, graphs="warm").summary()
    assert s["graphs"] == "cold" and warm["graphs"] == "warm" and warm["unet_s"] < s["unet_s"]
    # every rank runs the same text encoders and scheduler as the single device; it decodes its rows
    # (parallel.vae=patch, the default) or, with parallel.vae=none, the whole image as one device does
    assert all(one[k] == pytest.approx(s[k]) for k in ("text_encoders_s", "scheduler_s"))
    assert s["vae_decode"] == "patch" and s["vae_decode_comm_s"] > 0
    assert s["single_device_vae_decode_s"] == pytest.approx(one["vae_decode_s"], rel=1e-12)
    whole = predict("tiny", 64, 2, "displaced", load_hardware("a100_pcie"), 8, warmup_steps=2, split_cfg=False,
                    cache_dir=cache, vae="none").summary()
    assert whole["vae_decode"] == "whole" and whole["vae_decode_comm_s"] == 0
    assert whole["vae_decode_s"] == pytest.approx(one["vae_decode_s"], rel=1e-12)
    assert whole["latency_s"] - whole["vae_decode_s"] == pytest.approx(s["latency_s"] - s["vae_decode_s"], rel=1e-12)


def test_parallel_options_read_the_decode_with_the_apps_defaults():
    from omegaconf import OmegaConf

    from distrifusion.parallel_config import VAES, ParallelConfig
    from simulator.vae_decode import DEFAULT_CHUNK_MIB
    from simulator.vae_decode import VAES as SIMULATOR_VAES

    conf = Path(__file__).resolve().parents[1] / "conf" / "parallel"
    app = ParallelConfig()
    assert (DEFAULT_CHUNK_MIB, SIMULATOR_VAES) == (app.vae_chunk_mib, VAES)
    default = parallel_options({"mode": "displaced"})
    assert (default["vae"], default["vae_chunk_mib"]) == (app.vae, app.vae_chunk_mib)
    for name, vae in (("displaced", "patch"), ("none", "none")):
        assert parallel_options(OmegaConf.load(conf / f"{name}.yaml"))["vae"] == vae
    assert parallel_options({"mode": "displaced", "vae": "none", "vae_chunk_mib": 0})["vae_chunk_mib"] == 0
    for bad in ({"vae": "tiled"}, {"vae_chunk_mib": -1}, {"vae_chunk_mib": True}):
        with pytest.raises(ValueError, match="parallel.vae"):
            parallel_options({"mode": "displaced", **bad})


def test_rank_compute_seconds_prices_the_steady_phase_only():
    hardware = load_hardware("a100_pcie")
    compute = [{"type": "compute", "flops": 1e9 * (i + 1), "bytes": 1e6} for i in range(3)]
    trace = {"meta": {"dtype": "float16", "world_size": 2, "warmup_steps": 1},
             "roles": [{"ranks": [0, 1], "phases": {
                 "warmup": compute * 5,
                 "steady": [compute[0], {"type": "issue", "id": 0, "kind": "all_gather", "bytes": 1e9},
                            compute[1], {"type": "wait", "id": 0}, compute[2]],
                 "final": compute}}]}
    model = ComputeModel(hardware.device, "float16")
    expected = sum(model.event_seconds(ev) for ev in compute)
    assert rank_compute_seconds(trace, hardware) == pytest.approx(expected, rel=1e-12)
    assert rank_compute_seconds(trace, "a100_pcie") == pytest.approx(expected, rel=1e-12)


def test_steady_step_is_the_last_step_of_the_loop():
    def result(ends: list[float], warmup: int) -> SimResult:
        zero = {k: 0.0 for k in ("compute_s", "comm_s", "comm_exposed_s", "comm_bytes_per_device")}
        return SimResult(latency_s=ends[-1], world_size=2, steps=len(ends) - 1, hardware="x",
                         meta={"warmup_steps": warmup}, step_end_s=ends,
                         **zero, **{k: 0.0 for k in SimResult.__dataclass_fields__ if k.endswith("slowdown_s")})

    # 2 warm-up steps of 5 s, 2 eager steady steps of 4 s, graph-replayed steps of 2 s, the final phase
    assert steady_step_seconds(result([5.0, 10.0, 14.0, 18.0, 20.0, 22.0, 22.5], 2)) == pytest.approx(2.0)
    assert steady_step_seconds(result([5.0, 8.0, 8.5], 1)) == pytest.approx(3.0)  # only one steady step
    assert steady_step_seconds(result([5.0, 10.0, 10.5], 4)) is None  # no steady step


# --- advise ----------------------------------------------------------------------------------------

def test_device_counts_follow_the_latent_rows():
    # tiny: a latent of half the image's rows, halved twice: at 48 px, 24 rows = 6 patches of 4
    assert device_counts("tiny", 48, 8, split_cfg=False) == [2, 3, 6]
    assert device_counts("tiny", 48, 8, split_cfg=True) == [2, 4, 6]  # even counts, half the patches
    assert device_counts("tiny", 48, 8, split_cfg=True, cfg=False) == [2, 3, 6]  # nothing to split
    assert device_counts("tiny", 48, 5, split_cfg=False) == [2, 3]
    assert device_counts("tiny", 64, 8, split_cfg=True) == [2, 4, 8]


def test_advise_ranks_every_configuration_by_latency(cache, tmp_path):
    a = run_app("advise", "model=tiny", "resolution=64", "hardware=a100_pcie", "max_devices=2", "steps=6", "top=3",
                cache=cache, out=tmp_path)
    configs = a["configurations"]
    latencies = [c["latency_s"] for c in configs]
    assert latencies == sorted(latencies)
    tried = {(c["devices"], c["split_cfg"], c["mode"], c["warmup_steps"]) for c in configs}
    assert tried == {(1, False, "none", None)} | {
        (2, split, "displaced", w) for split in (True, False) for w in (1, 2, 4)} | {
        (2, split, "sync_patch", None) for split in (True, False)}
    assert {c["mode"] for c in a["lower_bound"]} == {"naive_patch"} and len(a["lower_bound"]) == 2
    for c in configs + a["lower_bound"]:
        assert {"speedup", "ceiling_speedup", "comm_exposed_s", "peak_memory_gib_per_rank", "fits_in_memory"} <= set(c)
    base = next(c for c in configs if c["devices"] == 1)
    assert base["speedup"] == pytest.approx(1) and base["comm_exposed_s"] == 0
    assert a["stops_paying_at"] in {1, 2} and len(a["notes"]) == 2
    # the warm-up count is replayed (synchronous steps cost what displaced ones do not) ...
    assert len({c["latency_s"] for c in configs if c["mode"] == "displaced" and not c["split_cfg"]}) == 3
    # ... and a configuration predicted alone gives the same figures (its trace recorded for another warm-up)
    for c in configs:
        if c["mode"] == "displaced" and not c["split_cfg"] and c["warmup_steps"] == 1:
            alone = predict("tiny", 64, 2, "displaced", load_hardware("a100_pcie"), 6, warmup_steps=1,
                            split_cfg=False, cache_dir=cache).summary()
            assert alone["latency_s"] == pytest.approx(c["latency_s"], rel=1e-12)
            assert alone["comm_exposed_s"] == pytest.approx(c["comm_exposed_s"], rel=1e-12)


def test_verdict_stops_where_a_doubling_gains_under_ten_percent_or_memory_stays():
    def o(n: int, latency: float, memory: float, lower_bound: bool = False, fits=None) -> dict:
        return {"devices": n, "latency_s": latency, "peak_memory_gib_per_rank": memory, "peak_memory_phase": "denoise",
                "stale_buffer_gib_per_rank": 1.0, "weights_gib_per_rank": 5.0, "vae_decode_gib": 0.0,
                "vae_decode": "whole", "lower_bound": lower_bound,
                "fits_in_memory": fits}

    v = verdict([o(1, 10, 20), o(2, 6, 12), o(4, 5.6, 11.5), o(8, 3, 11), o(8, 1, 1, lower_bound=True)])
    assert v["stops_paying_at"] == 2 and "stops paying at 2" in v["notes"][0]
    assert v["memory_stops_shrinking_at"] == 2 and "from 2 devices on" in v["notes"][1]
    v = verdict([o(1, 10, 20, fits=False), o(2, 6, 12), o(4, 3, 8)])
    assert v["stops_paying_at"] == 4 and v["memory_stops_shrinking_at"] is None and "at least" in v["notes"][0]


def test_advise_rejects_more_devices_than_the_preset_has(cache):
    with pytest.raises(ValueError, match="has 8 devices"):
        advise("tiny", 64, load_hardware("a100_pcie"), 16, 6, cache_dir=cache, progress=False)


# --- the sweep plot --------------------------------------------------------------------------------

def test_sweep_plot_draws_the_linear_reference_at_each_device_count_and_the_exposed_share():
    rows = [{"hardware": hw, "resolution": 1024, "devices": n, "latency_s": 10 / n ** f,
             "comm_s": 0.5 * (n > 1), "comm_exposed_s": 0.1 * (n > 1)}
            for hw, f in (("fast", 0.9), ("slow", 0.5)) for n in (1, 2, 4, 8)]
    fig = sweep_figure(rows)
    speedup, latency, exposed = fig.axes
    (linear,) = [line for line in speedup.get_lines() if line.get_label() == "linear"]
    assert dict(zip(linear.get_xdata(), linear.get_ydata())) == {1: 1, 2: 2, 4: 4, 8: 8}
    assert speedup.get_xscale() == "log"
    fast = next(line for line in latency.get_lines() if line.get_label() == "fast")
    assert list(fast.get_ydata()) == pytest.approx([10 / n ** 0.9 for n in (1, 2, 4, 8)])
    share = next(line for line in exposed.get_lines() if line.get_label() == "fast").get_ydata()
    assert math.isnan(share[0]) and list(share[1:]) == pytest.approx([0.2] * 3)
