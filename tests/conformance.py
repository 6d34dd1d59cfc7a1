"""The Communicator conformance checks: every backend must pass them, on every rank.

Each check builds every rank's input deterministically from (seed, rank), so each rank can
compute the exact expected result on its own. Values are small integers, exact in every dtype.
"""

from __future__ import annotations

import random

import torch

from backends import CollectiveMismatch, CommClosed, Communicator

# What the pipeline sends: activations in the model's dtype, integers (colours, signatures).
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32)


def rank_input(seed: int, rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    return torch.randint(-8, 9, shape, generator=g).to(dtype)


def check_all_gather(comm: Communicator, seed: int, shape: tuple[int, ...], dtype: torch.dtype,
                     async_op: bool, use_out: bool) -> None:
    x = rank_input(seed, comm.rank, shape, dtype).to(comm.device)
    expected = torch.stack([rank_input(seed, r, shape, dtype) for r in range(comm.world_size)])
    out = torch.full((comm.world_size, *shape), 99, dtype=dtype, device=comm.device) if use_out else None
    result = comm.all_gather(x, async_op=async_op, out=out)
    if async_op:
        result = result.wait()
    assert result.shape == (comm.world_size, *shape) and result.dtype == dtype, (result.shape, result.dtype)
    assert torch.equal(result.cpu(), expected), f"rank {comm.rank}: all_gather gave wrong values"
    if use_out:
        assert result.data_ptr() == out.data_ptr(), "all_gather must fill and return out="
    assert torch.equal(x.cpu(), rank_input(seed, comm.rank, shape, dtype)), "all_gather changed its input"


def check_all_reduce(comm: Communicator, seed: int, shape: tuple[int, ...], dtype: torch.dtype,
                     op: str, async_op: bool) -> None:
    x = rank_input(seed, comm.rank, shape, dtype).to(comm.device)
    inputs = torch.stack([rank_input(seed, r, shape, dtype).float() for r in range(comm.world_size)])
    expected = {"sum": inputs.sum(0), "max": inputs.amax(0), "min": inputs.amin(0)}[op].to(dtype)
    result = comm.all_reduce(x, op=op, async_op=async_op)
    if async_op:
        result = result.wait()
    assert result.data_ptr() == x.data_ptr(), "all_reduce must work in place"
    assert torch.equal(result.cpu(), expected), f"rank {comm.rank}: all_reduce({op}) gave wrong values"


def check_broadcast(comm: Communicator, seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    src = seed % comm.world_size
    x = rank_input(seed, comm.rank, shape, dtype).to(comm.device)
    comm.broadcast(x, src=src)
    assert torch.equal(x.cpu(), rank_input(seed, src, shape, dtype)), f"rank {comm.rank}: broadcast wrong"


def check_split(comm: Communicator) -> None:
    color = comm.rank % 2
    sub = comm.split(color)
    members = [r for r in range(comm.world_size) if r % 2 == color]
    assert (sub.rank, sub.world_size) == (members.index(comm.rank), len(members))
    got = sub.all_gather(torch.tensor([comm.rank], device=comm.device)).flatten().tolist()
    assert got == members, f"rank {comm.rank}: split group gathered {got}, expected {members}"
    comm.barrier()


def check_mismatch(comm: Communicator) -> None:
    """Ranks disagreeing on shape must all get CollectiveMismatch (world_size >= 2)."""
    try:
        comm.all_gather(torch.zeros(comm.rank + 1, device=comm.device))
    except CollectiveMismatch as e:
        assert "shape" in str(e)
    else:
        raise AssertionError(f"rank {comm.rank}: mismatched shapes were not detected")


def check_closed(comm: Communicator) -> None:
    comm.close()
    try:
        comm.all_gather(torch.zeros(1, device=comm.device))
    except CommClosed as e:
        assert "closed" in str(e)
    else:
        raise AssertionError("a collective after close() must raise CommClosed")


def random_cases(seed: int, count: int) -> list[tuple]:
    """Seeded (seed, shape, dtype, async_op, use_out) cases for the subprocess backends; the
    dtypes take turns, so every one of `DTYPES` is checked."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(0, 4)))
        cases.append((i, shape, DTYPES[i % len(DTYPES)], rng.random() < 0.5, rng.random() < 0.5))
    return cases


def run_all(comm: Communicator, reduce_dtypes=DTYPES, cases: int = 24) -> int:
    """Every check on `comm`; returns how many ran. `reduce_dtypes`: what the backend can reduce."""
    n = 0
    for seed, shape, dtype, async_op, use_out in random_cases(comm.world_size, cases):
        check_all_gather(comm, seed, shape, dtype, async_op, use_out)
        check_broadcast(comm, seed, shape, dtype)
        for op in ("sum", "max", "min"):
            rdtype = dtype if dtype in reduce_dtypes else torch.float32
            check_all_reduce(comm, seed, shape, rdtype, op, async_op)
        n += 5
    check_split(comm)
    if comm.world_size > 1:
        check_mismatch(comm)
    check_closed(comm)
    return n + 3
