"""Timing work on a device without stopping it: timing events, and a step captured once and replayed.

On CUDA an event marks a point of the stream's timeline; `elapsed_time` between two events is
read only after the work ran, so timing needs no synchronisation where the work is issued.
Events made with `in_graph=True` are "external" (`cudaEventRecordExternal`): recorded during
a CUDA-graph capture they become event-record nodes, re-recorded at every replay, so parts
of a replayed graph can be timed (torch >= 2.8). Elsewhere `HostEvent` stands in: CPU ops run
synchronously, so the host clock at `record()` is the device's timeline position.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


class HostEvent:
    """A timing event on the host clock, with the methods of `torch.cuda.Event` that timing uses."""

    def __init__(self) -> None:
        self.at: float | None = None

    def record(self, stream: Any = None) -> None:
        self.at = time.perf_counter()

    def elapsed_time(self, end: "HostEvent") -> float:
        """Milliseconds from this event to `end`."""
        if self.at is None or end.at is None:
            raise RuntimeError("elapsed_time between events that were not both recorded")
        return (end.at - self.at) * 1e3


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def timing_event(device: str | torch.device, in_graph: bool = False) -> Any:
    """A new timing event for `device`'s timeline (recordable inside a CUDA graph if `in_graph`)."""
    if not is_cuda(device):
        return HostEvent()
    if in_graph:
        try:
            return torch.cuda.Event(enable_timing=True, external=True)
        except TypeError as e:
            raise RuntimeError(f"timing inside CUDA graphs needs torch.cuda.Event(external=True) "
                               f"(torch >= 2.8); this is torch {torch.__version__}") from e
    return torch.cuda.Event(enable_timing=True)


def wait(device: str | torch.device) -> None:
    """Block until `device` has run everything issued (outside any measured region)."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def time_ms(device: str | torch.device, fn: Callable[[], Any]) -> float:
    """Milliseconds `fn()`'s work takes on `device`'s timeline (waits for it)."""
    start, end = timing_event(device), timing_event(device)
    start.record()
    fn()
    end.record()
    wait(device)
    return start.elapsed_time(end)


class StepGraph:
    """`fn()` captured once, then replayed: a CUDA graph on CUDA.

    Elsewhere a stand-in with the same calls: capture runs `fn` once, replay runs it again
    (what `fn` recorded during capture, e.g. timing events, is not recorded again). Graphs
    given the same `pool` share their memory (only one may run at a time).
    """

    def __init__(self, fn: Callable[[], Any], device: str | torch.device, pool: Any = None):
        self.fn = fn
        self.graph = None
        if not is_cuda(device):
            self.output = fn()
            return
        self.graph = torch.cuda.CUDAGraph()
        wait(device)
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn()

    def pool(self) -> Any:
        """The memory pool to share with another graph (None for the stand-in)."""
        return self.graph.pool() if self.graph is not None else None

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.output = self.fn()


class HostClock:
    """Eager op timing: the host clock, read after `sync()` (e.g. `torch.cuda.synchronize`) so
    that the device has finished what was issued. It stops the device at every mark, which
    a CUDA-graph capture forbids."""

    contiguous = False

    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync = sync

    def mark(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        return end - start


class EventClock:
    """Op timing by events on `device`'s timeline, recordable inside CUDA graphs; marking
    never synchronises, and `seconds` is read once the work has run (after `wait`).

    Contiguous: on a device's timeline every kernel between two marks belongs to the
    interval, so one op's end mark serves as the next op's start (half the events)."""

    contiguous = True

    def __init__(self, device: str | torch.device):
        self.device = device

    def mark(self) -> Any:
        event = timing_event(self.device, in_graph=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3
