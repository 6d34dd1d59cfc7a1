"""The graph-replay calibration (`simulator.calibrate.GraphCalibration`), checked on the CPU: its
measured region (what a CUDA graph captures) neither synchronises nor reads the device, and its
profile reproduces the replayed step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distrifusion.pipeline_factory import build_unet
from simulator import CalibrationProfile, load_hardware, simulate
from simulator.calibrate import GraphCalibration, level_off, merge
from simulator.device_timing import HostClock
from simulator.workload import load_or_record

RESOLUTION = 64


class HostSync(AssertionError):
    """The measured region waited for the device or read a tensor back from it."""


class NoHostReads(TorchDispatchMode):
    """Fails on every aten op that needs the device's results on the host: reading a value
    (`.item()`, `bool(t)`, `.tolist()`: `_local_scalar_dense`) or copying to the CPU."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise HostSync(f"{func} reads a tensor's value on the host")
        sources = {t.device.type for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        target = kwargs.get("device")
        if func is torch.ops.aten.copy_.default:
            target = args[0].device
            sources = {args[1].device.type}
        if target is not None and torch.device(target).type == "cpu" and sources - {"cpu"}:
            raise HostSync(f"{func} copies a {sources} tensor to the host")
        return func(*args, **kwargs)


@pytest.fixture
def no_sync(monkeypatch):
    """Every way torch has of waiting for a CUDA device fails."""
    def fail(*args, **kwargs):
        raise HostSync("synchronised with the device")

    monkeypatch.setattr(torch.cuda, "synchronize", fail)
    for cls, names in ((torch.cuda.Stream, ("synchronize", "query")),
                       (torch.cuda.Event, ("synchronize", "query", "elapsed_time"))):
        for name in names:
            monkeypatch.setattr(cls, name, fail)


@pytest.fixture(scope="module")
def unets():
    return {device: build_unet("tiny", device, torch.float32) for device in ("cpu", "meta")}


def calibration(unets, device: str, world_size: int = 2) -> GraphCalibration:
    return GraphCalibration("tiny", RESOLUTION, world_size, "displaced", device, torch.float32, unet=unets[device])


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: a copy to the host is visible as such
def test_the_measured_region_neither_synchronises_nor_reads_the_device(unets, device, no_sync):
    cal = calibration(unets, device)
    with cal.counter, NoHostReads():
        cal.steady_step()
    assert cal.counter.spans  # it was timed


def test_the_check_catches_a_synchronising_counter(unets, no_sync):
    """The eager counter (`HostClock(torch.cuda.synchronize)`, what `--device cuda` used before)
    in the same region: the check fails, as a graph capture would."""
    cal = calibration(unets, "cpu")
    cal.counter.clock = HostClock(torch.cuda.synchronize)
    with pytest.raises(HostSync), cal.counter, NoHostReads():
        cal.steady_step()


def test_the_check_catches_a_host_read(unets, no_sync):
    cal = calibration(unets, "meta")
    step = cal.run.step
    cal.run.step = lambda: step().cpu()
    with pytest.raises(HostSync), cal.counter, NoHostReads():
        cal.steady_step()


@pytest.mark.parametrize("share", [1.5, 0.8, 0.05], ids=["slower", "events_cost", "most_ops_levelled_to_zero"])
def test_graph_profile_reproduces_the_replayed_step(unets, tmp_path, share):
    """Whatever the plain replay took against the marked one (`share` of its span), one step
    replayed with the profile takes the plain replay's time."""
    cal = calibration(unets, "cpu", world_size=1)
    cal.sample()
    span = sum(cal.samples[0].values())
    cal.walls = [share * span]
    stats, summary = cal.result()
    profile = CalibrationProfile("cpu", "float32", merge([stats]))
    trace = load_or_record("tiny", RESOLUTION, 1, "none", dtype="float32", cache_dir=tmp_path)
    steady = [o for e in trace["roles"][0]["phases"]["steady"] if e["type"] == "compute" for o in e["ops"]]
    assert all((o["kind"], o["key"]) in profile.entries for o in steady)  # meta and the graphed step run the same ops
    seconds = simulate(trace, load_hardware("cpu_gloo_loopback"), steps=1, profile=profile).latency_s
    assert seconds == pytest.approx(share * span, rel=1e-9)
    assert summary["step_wall_s"] == share * span and summary["replay"] == "graph"


@given(st.lists(st.tuples(st.floats(0, 1), st.integers(1, 5)), min_size=1, max_size=20), st.floats(0, 2))
def test_level_off_leaves_the_target(intervals, fraction):
    means, counts = [m for m, _ in intervals], [n for _, n in intervals]
    total = sum(m * n for m, n in intervals)
    target = fraction * total
    c = level_off(means, counts, target)
    left = sum(n * max(0.0, m - c) for m, n in intervals)
    assert left == pytest.approx(target, rel=1e-9, abs=1e-12)
