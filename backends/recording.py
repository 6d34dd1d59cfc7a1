"""`Recorder(comm)`: a pass-through communicator that records every collective it carries.

The record is what the simulator replays: for each collective its kind, tag (the layer that
called it), dtype, shapes, bytes contributed by this rank, whether it was asynchronous, and
where in the event order it was issued and waited for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .base import Communicator, Work


@dataclass
class CollectiveRecord:
    id: int
    kind: str
    tag: str | None
    group_size: int
    dtype: str
    shape: tuple[int, ...]
    bytes: int
    async_op: bool
    issue_index: int
    wait_index: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@Communicator.register
class Recorder:
    """Wraps `inner`; `records` lists collectives, `events` the issue/wait order.

    `on_event(event)` is called at every issue and wait, so a profiler can cut the compute
    between collectives into segments (the simulator does this). Sub-communicators made by
    `split` share the parent's record.
    """

    def __init__(self, inner: Communicator, on_event: Callable[[dict], None] | None = None):
        self.inner = inner
        self.rank, self.world_size, self.device = inner.rank, inner.world_size, inner.device
        self.records: list[CollectiveRecord] = []
        self.events: list[dict] = []
        self.on_event = on_event

    def _event(self, op: str, rec: CollectiveRecord) -> int:
        event = {"op": op, "id": rec.id, "index": len(self.events)}
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)
        return event["index"]

    def _record(self, kind: str, tensor: torch.Tensor, tag: str | None, async_op: bool) -> CollectiveRecord:
        rec = CollectiveRecord(
            id=len(self.records), kind=kind, tag=tag, group_size=self.world_size, dtype=str(tensor.dtype).removeprefix("torch."),
            shape=tuple(tensor.shape), bytes=tensor.numel() * tensor.element_size(),
            async_op=async_op, issue_index=-1,
        )
        self.records.append(rec)
        rec.issue_index = self._event("issue", rec)
        return rec

    def _wrap(self, rec: CollectiveRecord, result: torch.Tensor | Work) -> torch.Tensor | Work:
        if not rec.async_op:
            rec.wait_index = self._event("wait", rec)
            return result

        def wait() -> torch.Tensor:
            value = result.wait()
            rec.wait_index = self._event("wait", rec)
            return value

        return Work(wait)

    def all_gather(self, tensor, async_op=False, out=None, tag=None):
        rec = self._record("all_gather", tensor, tag, async_op)
        return self._wrap(rec, self.inner.all_gather(tensor, async_op=async_op, out=out, tag=tag))

    def all_reduce(self, tensor, op="sum", async_op=False, tag=None):
        rec = self._record("all_reduce", tensor, tag, async_op)
        return self._wrap(rec, self.inner.all_reduce(tensor, op=op, async_op=async_op, tag=tag))

    def broadcast(self, tensor, src=0, tag=None):
        rec = self._record("broadcast", tensor, tag, False)
        return self._wrap(rec, self.inner.broadcast(tensor, src=src, tag=tag))

    def barrier(self) -> None:
        rec = self._record("barrier", torch.empty(0), None, False)
        self.inner.barrier()
        self._wrap(rec, torch.empty(0))

    def split(self, color: int) -> "Recorder":
        sub = Recorder(self.inner.split(color), self.on_event)
        sub.records, sub.events = self.records, self.events
        return sub

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.inner.__exit__(exc_type, exc, tb)
