"""The Communicator contract: the only way `distrifusion` and `simulator` talk to other ranks.

Every backend implements the four collectives below over tensors. Results come back in rank
order; asynchronous calls return a `Work` handle whose `wait()` gives the result. Collectives
accept an optional `tag` naming the caller (a layer); real backends ignore it, the recorder
keeps it.
"""

from __future__ import annotations

import abc
from typing import Callable, Literal, Sequence

import torch

ReduceOp = Literal["sum", "max", "min"]
REDUCE_OPS: tuple[str, ...] = ("sum", "max", "min")


class CommError(RuntimeError):
    """Base class of every error a backend raises on purpose."""


class CollectiveMismatch(CommError):
    """Ranks called the same collective with different kinds, shapes or dtypes."""


class CollectiveTimeout(CommError):
    """A collective did not complete within the backend's timeout."""


class PeerFailure(CommError):
    """Another rank failed, so this rank's collective can never complete."""


class CommClosed(CommError):
    """A collective was called after `close()`."""


class Work:
    """Handle of an asynchronous collective; `wait()` blocks until done and returns the result."""

    def __init__(self, wait_fn: Callable[[], torch.Tensor]):
        self._wait_fn = wait_fn
        self._result: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            self._result = self._wait_fn()
        return self._result


class Communicator(abc.ABC):
    """A group of `world_size` ranks; this object is rank `rank`, computing on `device`."""

    rank: int
    world_size: int
    device: torch.device

    def __init__(self) -> None:
        self._closed = False

    # --- collectives -------------------------------------------------------------------------
    def all_gather(
        self,
        tensor: torch.Tensor,
        async_op: bool = False,
        out: torch.Tensor | None = None,
        tag: str | None = None,
    ) -> torch.Tensor | Work:
        """Gather `tensor` from every rank into shape `(world_size, *tensor.shape)`, rank order.

        `out`, if given, must have that shape and dtype; it is filled and returned, so a
        steady-state caller allocates nothing.
        """
        self._check_open()
        _check_tensor(tensor)
        if out is None:
            out = torch.empty((self.world_size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        elif out.shape != (self.world_size, *tensor.shape) or out.dtype != tensor.dtype:
            raise ValueError(
                f"all_gather out= must have shape {(self.world_size, *tensor.shape)} and dtype "
                f"{tensor.dtype}; got {tuple(out.shape)} {out.dtype}"
            )
        elif not out.is_contiguous():
            raise ValueError("all_gather out= must be contiguous")
        work = self._all_gather(tensor.contiguous(), out)
        return work if async_op else work.wait()

    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: ReduceOp = "sum",
        async_op: bool = False,
        tag: str | None = None,
    ) -> torch.Tensor | Work:
        """Reduce `tensor` over all ranks in place and return it (or a handle to it)."""
        self._check_open()
        _check_tensor(tensor)
        if op not in REDUCE_OPS:
            raise ValueError(f"all_reduce op must be one of {REDUCE_OPS}, got {op!r}")
        if not tensor.is_contiguous():
            raise ValueError("all_reduce needs a contiguous tensor (it reduces in place)")
        work = self._all_reduce(tensor, op)
        return work if async_op else work.wait()

    def broadcast(self, tensor: torch.Tensor, src: int = 0, tag: str | None = None) -> torch.Tensor:
        """Overwrite `tensor` on every rank with rank `src`'s copy, in place; returns it."""
        self._check_open()
        _check_tensor(tensor)
        if not 0 <= src < self.world_size:
            raise ValueError(f"broadcast src must be in [0, {self.world_size}), got {src}")
        if not tensor.is_contiguous():
            raise ValueError("broadcast needs a contiguous tensor (it writes in place)")
        return self._broadcast(tensor, src)

    def barrier(self) -> None:
        """Block until every rank reaches the barrier."""
        self._check_open()
        self._barrier()

    def split(self, color: int) -> "Communicator":
        """Collective: a new communicator of the ranks that passed the same `color`.

        Ranks keep their relative order. Used to run the two classifier-free-guidance
        branches on two halves of the ranks.
        """
        self._check_open()
        colors = self.all_gather(torch.tensor([color], dtype=torch.int64, device=self.device)).flatten().tolist()
        groups = sorted({tuple(r for r, c in enumerate(colors) if c == k) for k in set(colors)})
        members = next(g for g in groups if self.rank in g)
        return self._split(groups, members)

    def close(self) -> None:
        """Release the backend's resources; later collectives raise `CommClosed`."""
        if not self._closed:
            self._closed = True
            self._close()

    def abort(self) -> None:
        """Best effort: make the other ranks stop instead of waiting for this one."""
        self.close()

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.abort()
        else:
            self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    # --- what a backend implements ---------------------------------------------------------
    @abc.abstractmethod
    def _all_gather(self, tensor: torch.Tensor, out: torch.Tensor) -> Work:
        """Start gathering contiguous `tensor` into contiguous `out`."""

    @abc.abstractmethod
    def _all_reduce(self, tensor: torch.Tensor, op: str) -> Work:
        """Start reducing contiguous `tensor` in place."""

    @abc.abstractmethod
    def _broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Broadcast in place from `src`."""

    @abc.abstractmethod
    def _barrier(self) -> None:
        """Synchronise all ranks."""

    @abc.abstractmethod
    def _split(self, groups: Sequence[tuple[int, ...]], members: Sequence[int]) -> "Communicator":
        """Build the sub-communicator of `members`; `groups` lists every group being formed."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Release resources."""

    def _check_open(self) -> None:
        if self._closed:
            raise CommClosed(f"{self!r} was closed; no collective can be called on it any more")


def _check_tensor(tensor: object) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"collectives take a torch.Tensor, got {type(tensor).__name__}")


def signature(kind: str, tensor: torch.Tensor, extra: object = None) -> tuple:
    """What every rank must agree on for one collective call: kind, shape, dtype, extra."""
    return (kind, tuple(tensor.shape), str(tensor.dtype), extra)


_KINDS = ("all_gather", "all_reduce", "broadcast", "barrier")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64)
MAX_DIMS = 8
SIGNATURE_LEN = 4 + MAX_DIMS


def encode_signature(sig: tuple) -> list[int]:
    """A fixed-length int list of `signature(...)`, for backends that check it with a collective."""
    kind, shape, dtype, extra = sig
    if len(shape) > MAX_DIMS:
        raise ValueError(f"collectives support at most {MAX_DIMS} dimensions, got shape {list(shape)}")
    codes = [str(d) for d in _DTYPES]
    code = {None: -1}.get(extra, REDUCE_OPS.index(extra) if extra in REDUCE_OPS else extra)
    return [_KINDS.index(kind), code, codes.index(dtype) if dtype in codes else -1, len(shape),
            *shape, *[-1] * (MAX_DIMS - len(shape))]


def check_signatures(rows: Sequence[Sequence[int]], rank: int) -> None:
    """Raise `CollectiveMismatch` (the same on every rank) unless all ranks' signatures agree."""
    for r, row in enumerate(rows):
        if list(row) != list(rows[0]):
            raise CollectiveMismatch(
                f"rank {rank}: ranks disagree on a collective: rank 0 called {_decode(rows[0])}, "
                f"rank {r} called {_decode(row)}"
            )


def _decode(row: Sequence[int]) -> str:
    kind, code, dtype, ndim = (int(x) for x in row[:4])
    dt = str(_DTYPES[dtype]) if dtype >= 0 else "other dtype"
    return f"{_KINDS[kind]}(shape={[int(x) for x in row[4:4 + ndim]]}, dtype={dt}, arg={code})"
