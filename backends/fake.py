"""In-process fake backend: N ranks as N threads of one process, for tests and simulation.

`spawn(fn, world_size, *args)` runs `fn(comm, *args)` on every rank and returns the results in
rank order. Results are deterministic (reductions run in rank order on one thread). A delay
per collective can be injected to test overlap, and a failure at a chosen collective of a
chosen rank to test that nothing hangs: if any rank raises, the others' collectives raise
`PeerFailure` and `spawn` raises `RankFailed` naming the first rank that failed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .base import (
    CollectiveMismatch,
    CollectiveTimeout,
    CommError,
    Communicator,
    PeerFailure,
    Work,
    signature,
)


class RankFailed(CommError):
    """Raised by `spawn` when a rank's function raised; `__cause__` is the rank's error."""

    def __init__(self, rank: int, error: BaseException):
        super().__init__(f"rank {rank} failed: {type(error).__name__}: {error}")
        self.rank = rank


class InjectedFailure(RuntimeError):
    """The failure `spawn(..., fail_rank=r, fail_at=k)` raises on purpose."""


@dataclass
class _Op:
    sig: tuple
    inputs: list
    arrived: int = 0
    result: Any = None
    error: BaseException | None = None
    ready_at: float = 0.0
    done: bool = False


@dataclass
class _Group:
    """Rendezvous shared by the ranks of one fake communicator."""

    world_size: int
    timeout: float
    delay: float
    cond: threading.Condition = field(default_factory=threading.Condition)
    ops: dict = field(default_factory=dict)
    seq: list = field(default_factory=list)
    failure: tuple[int, BaseException] | None = None
    exited: set = field(default_factory=set)
    subgroups: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.seq = [0] * self.world_size

    def fail(self, rank: int, error: BaseException) -> None:
        with self.cond:
            if self.failure is None:
                self.failure = (rank, error)
            self.cond.notify_all()

    def exit(self, rank: int) -> None:
        with self.cond:
            self.exited.add(rank)
            self.cond.notify_all()


def _reduce(inputs: Sequence[torch.Tensor], op: str) -> torch.Tensor:
    acc = inputs[0].clone()
    for t in inputs[1:]:
        if op == "sum":
            acc += t
        elif op == "max":
            torch.maximum(acc, t, out=acc)
        else:
            torch.minimum(acc, t, out=acc)
    return acc


class FakeCommunicator(Communicator):
    """One rank of an in-process group; build groups with `spawn` or `make_group`."""

    def __init__(self, group: _Group, rank: int, device: torch.device | str = "cpu",
                 fail_at: int | None = None):
        super().__init__()
        self._group = group
        self.rank = rank
        self.world_size = group.world_size
        self.device = torch.device(device)
        self._fail_at = fail_at
        self._calls = 0
        self._splits = 0

    def _collective(self, kind: str, tensor: torch.Tensor, extra: object,
                    finish: Callable[[list], Any]) -> tuple[_Op, int]:
        if self._fail_at is not None and self._calls == self._fail_at:
            raise InjectedFailure(f"injected failure at collective #{self._calls} of rank {self.rank}")
        self._calls += 1
        g = self._group
        sig = signature(kind, tensor, extra)
        with g.cond:
            seq = g.seq[self.rank]
            g.seq[self.rank] += 1
            op = g.ops.setdefault(seq, _Op(sig, [None] * g.world_size))
            if op.sig != sig and op.error is None:
                first = next(r for r, x in enumerate(op.inputs) if x is not None)
                op.error = CollectiveMismatch(
                    f"collective #{seq}: rank {first} called {_describe(op.sig)} but rank "
                    f"{self.rank} called {_describe(sig)}"
                )
            op.inputs[self.rank] = tensor.detach().clone()
            op.arrived += 1
            if op.arrived == g.world_size and op.error is None:
                op.result = finish(op.inputs)
                op.inputs = [None] * g.world_size
                op.ready_at = time.monotonic() + g.delay
                op.done = True
            if op.arrived == g.world_size:
                del g.ops[seq]
            g.cond.notify_all()
        return op, seq

    def _wait(self, op: _Op, seq: int) -> Any:
        g = self._group
        deadline = time.monotonic() + g.timeout
        with g.cond:
            while not (op.done or op.error):
                if g.failure is not None and g.failure[0] != self.rank:
                    r, e = g.failure
                    raise PeerFailure(f"rank {self.rank}: rank {r} failed ({type(e).__name__}: {e})")
                gone = [r for r in g.exited if op.inputs[r] is None]
                if gone:
                    raise PeerFailure(
                        f"rank {self.rank}: rank {gone[0]} finished without calling {_describe(op.sig)} #{seq}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [r for r, x in enumerate(op.inputs) if x is None]
                    raise CollectiveTimeout(
                        f"rank {self.rank}: {_describe(op.sig)} #{seq} timed out after {g.timeout:g}s "
                        f"waiting for rank(s) {missing}"
                    )
                g.cond.wait(min(left, 0.05))
        if op.error:
            raise op.error
        pause = op.ready_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        return op.result

    def _all_gather(self, tensor: torch.Tensor, out: torch.Tensor) -> Work:
        op, seq = self._collective("all_gather", tensor, None, torch.stack)

        def wait() -> torch.Tensor:
            out.copy_(self._wait(op, seq))
            return out

        return Work(wait)

    def _all_reduce(self, tensor: torch.Tensor, op_name: str) -> Work:
        op, seq = self._collective("all_reduce", tensor, op_name, lambda xs: _reduce(xs, op_name))

        def wait() -> torch.Tensor:
            return tensor.copy_(self._wait(op, seq))

        return Work(wait)

    def _broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        op, seq = self._collective("broadcast", tensor, src, lambda xs: xs[src])
        return tensor.copy_(self._wait(op, seq))

    def _barrier(self) -> None:
        op, seq = self._collective("barrier", torch.empty(0), None, lambda xs: None)
        self._wait(op, seq)

    def _split(self, groups: Sequence[tuple[int, ...]], members: Sequence[int]) -> Communicator:
        g = self._group
        key = (self._splits, tuple(members))
        self._splits += 1
        with g.cond:
            sub = g.subgroups.setdefault(key, _Group(len(members), g.timeout, g.delay))
        return FakeCommunicator(sub, members.index(self.rank), self.device)

    def _close(self) -> None:
        self._group.exit(self.rank)


def _describe(sig: tuple) -> str:
    kind, shape, dtype, extra = sig
    more = f", {extra}" if extra is not None else ""
    return f"{kind}(shape={list(shape)}, dtype={dtype}{more})"


def make_group(world_size: int, timeout: float = 60.0, delay: float = 0.0,
               device: torch.device | str = "cpu") -> list[FakeCommunicator]:
    """The `world_size` communicators of one fresh in-process group (drive them from threads)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    group = _Group(world_size, timeout, delay)
    return [FakeCommunicator(group, r, device) for r in range(world_size)]


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0,
          delay: float = 0.0, fail_rank: int | None = None, fail_at: int = 0,
          device: torch.device | str = "cpu") -> list[Any]:
    """Run `fn(comm, *args)` on `world_size` in-process ranks; return results in rank order.

    `timeout` bounds every collective (seconds); `delay` is added to each collective's
    completion time; `fail_rank`/`fail_at` make that rank raise `InjectedFailure` at its
    `fail_at`-th collective.
    """
    comms = make_group(world_size, timeout, delay, device)
    group = comms[0]._group
    if fail_rank is not None:
        if not 0 <= fail_rank < world_size:
            raise ValueError(f"fail_rank must be in [0, {world_size}), got {fail_rank}")
        comms[fail_rank]._fail_at = fail_at
    results: list[Any] = [None] * world_size

    def run(rank: int) -> None:
        try:
            results[rank] = fn(comms[rank], *args)
        except BaseException as e:  # noqa: BLE001 - every failure must reach spawn's caller
            group.fail(rank, e)
        finally:
            group.exit(rank)

    threads = [threading.Thread(target=run, args=(r,), name=f"fake-rank-{r}", daemon=True)
               for r in range(world_size)]
    for t in threads:
        t.start()
    with group.cond:
        group.cond.wait_for(lambda: group.failure is not None or len(group.exited) == world_size)
    if group.failure is not None:
        for t in threads:  # others stop at their next collective; give them a moment, no more
            t.join(timeout=min(timeout, 5.0))
        rank, error = group.failure
        raise RankFailed(rank, error) from error
    for t in threads:
        t.join()
    return results
