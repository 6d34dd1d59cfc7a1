"""The Communicator conformance suite over every backend, plus failure and timeout behaviour."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backends import CollectiveTimeout, PeerFailure, Work
from backends.fake import InjectedFailure, RankFailed, spawn
from backends.recording import Recorder
from conformance import (
    DTYPES,
    check_all_gather,
    check_all_reduce,
    check_broadcast,
    check_closed,
    check_mismatch,
    check_split,
    run_all,
)
from launchers import LAUNCHERS, backend_of, library_of, run_ranks

WORKER = Path(__file__).with_name("conformance_worker.py")
shapes = st.lists(st.integers(1, 6), min_size=0, max_size=4).map(tuple)


@settings(max_examples=40, deadline=None)
@given(world_size=st.integers(1, 8), shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 99),
       async_op=st.booleans(), use_out=st.booleans(), op=st.sampled_from(["sum", "max", "min"]))
def test_fake_collectives(world_size, shape, dtype, seed, async_op, use_out, op):
    def body(comm):
        check_all_gather(comm, seed, shape, dtype, async_op, use_out)
        check_all_reduce(comm, seed, shape, dtype, op, async_op)
        check_broadcast(comm, seed, shape, dtype)

    spawn(body, world_size)


@pytest.mark.parametrize("world_size", range(1, 9))
def test_fake_full_suite(world_size):
    assert spawn(run_all, world_size) == [123] * world_size


def test_fake_split_mismatch_and_close_are_checked_per_rank():
    spawn(check_split, 5)
    spawn(check_mismatch, 3)
    spawn(check_closed, 2)


def test_fake_is_deterministic():
    def body(comm):
        x = torch.randn(64, generator=torch.Generator().manual_seed(comm.rank)) * 1e3
        return comm.all_reduce(x).clone()

    runs = [spawn(body, 7) for _ in range(3)]
    assert all(torch.equal(a, b) for run in runs for a, b in zip(run, runs[0]))


def test_fake_failure_is_raised_naming_the_rank_and_nothing_hangs():
    def body(comm):
        for _ in range(10):
            comm.all_gather(torch.ones(3))

    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank 2 failed: InjectedFailure") as info:
        spawn(body, 4, fail_rank=2, fail_at=3, timeout=30)
    assert isinstance(info.value.__cause__, InjectedFailure)
    assert time.monotonic() - start < 5


def test_fake_peers_of_a_failed_rank_get_peer_failure():
    seen = []

    def body(comm):
        if comm.rank == 0:
            raise ValueError("boom")
        try:
            comm.all_gather(torch.ones(1))
        except PeerFailure as e:
            seen.append(str(e))
            raise

    with pytest.raises(RankFailed, match="rank 0 failed: ValueError: boom"):
        spawn(body, 3, timeout=30)
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(seen) == 2 and all("rank 0 failed" in s for s in seen)


def test_fake_collective_times_out_clearly():
    def body(comm):
        if comm.rank == 1:
            time.sleep(1.0)
            return
        comm.all_gather(torch.ones(1))

    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank 0 failed") as info:
        spawn(body, 2, timeout=0.3)
    assert isinstance(info.value.__cause__, CollectiveTimeout)
    assert "waiting for rank(s) [1]" in str(info.value.__cause__)
    assert time.monotonic() - start < 3


def test_fake_rank_that_returns_early_unblocks_the_others():
    def body(comm):
        if comm.rank == 0:
            comm.all_gather(torch.ones(1))

    with pytest.raises(RankFailed, match="finished without calling all_gather"):
        spawn(body, 2, timeout=30)


def test_fake_delay_is_overlapped_by_async_collectives():
    delay = 0.2

    def body(comm, async_op):
        start = time.perf_counter()
        work = comm.all_gather(torch.ones(8), async_op=async_op)
        time.sleep(delay)  # stands for compute
        if isinstance(work, Work):
            work.wait()
        return time.perf_counter() - start

    overlapped = max(spawn(body, 2, True, delay=delay))
    serial = max(spawn(body, 2, False, delay=delay))
    assert overlapped < 1.5 * delay < serial


def test_bad_input_is_rejected_before_communicating():
    def body(comm):
        with pytest.raises(ValueError, match="out= must have shape"):
            comm.all_gather(torch.ones(3), out=torch.empty(3))
        with pytest.raises(ValueError, match="op must be one of"):
            comm.all_reduce(torch.ones(3), op="mean")
        with pytest.raises(TypeError, match="torch.Tensor"):
            comm.all_gather([1, 2])
        return True

    assert spawn(body, 2) == [True, True]


def test_recorder_records_kind_bytes_order_and_tags():
    def body(comm):
        rec = Recorder(comm)
        work = rec.all_gather(torch.ones(4, 2, dtype=torch.float16), async_op=True, tag="conv_in")
        rec.all_reduce(torch.ones(3), tag="norm")
        gathered = work.wait()
        sub = rec.split(comm.rank % 2)
        sub.all_gather(torch.ones(1))
        return rec, gathered

    results = spawn(body, 4)
    rec, gathered = results[1]
    assert gathered.shape == (4, 4, 2)
    first, second, third = rec.records
    assert (first.kind, first.tag, first.bytes, first.dtype, first.shape, first.async_op) == (
        "all_gather", "conv_in", 16, "float16", (4, 2), True)
    assert (second.kind, second.bytes, second.async_op, second.group_size) == ("all_reduce", 12, False, 4)
    assert first.issue_index < second.issue_index < second.wait_index < first.wait_index
    assert third.group_size == 2
    assert [e["op"] for e in rec.events] == ["issue", "issue", "wait", "wait", "issue", "wait"]


def _run_worker(launcher: str, n: int, scenario: str, limit: float = 120) -> subprocess.CompletedProcess:
    return run_ranks(launcher, n, str(WORKER), backend_of(launcher), scenario, timeout=limit)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launched_backend_passes_conformance(launcher, n):
    proc = _run_worker(launcher, n, "conformance")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    passed = re.findall(r"rank (\d+)/(\d+): (\d+) checks passed", proc.stdout)
    assert sorted(passed) == [(str(r), str(n), "123") for r in range(n)]
    if launcher != "torch":
        assert f"MPI library: {library_of(launcher)}" in proc.stdout, proc.stdout[:500]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launched_backend_times_out_clearly(launcher):
    proc = _run_worker(launcher, 2, "timeout", limit=60)
    assert proc.returncode != 0
    assert "CollectiveTimeout: rank 0" in proc.stdout


@pytest.mark.parametrize("launcher", ["torch", "mpich"])
def test_launched_backend_rejects_wrong_world_size(launcher):
    proc = _run_worker(launcher, 2, "world_size", limit=60)
    assert proc.returncode != 0
    assert "world_size=5 was asked for but" in proc.stderr
