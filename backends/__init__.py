"""Communicator backends: one contract (`Communicator`), several implementations.

`create(name, **options)` builds this process's communicator; `launch(name, fn, ...)` runs
`fn(comm)` on every rank this process hosts (one for torch and mpi, all of them for the fake)
and returns the results of those ranks in rank order.
"""

from __future__ import annotations

from typing import Any, Callable

from .base import (
    CollectiveMismatch,
    CollectiveTimeout,
    CommClosed,
    CommError,
    Communicator,
    PeerFailure,
    Work,
)

BACKENDS = ("fake", "torch", "mpi", "emulated")


def create(name: str, **options: Any) -> Communicator:
    """Build the communicator of this process for backend `name` (see `BACKENDS`)."""
    if name == "torch":
        from .torch_dist import TorchCommunicator

        return TorchCommunicator(**options)
    if name == "mpi":
        from .mpi import MPICommunicator

        return MPICommunicator(**options)
    if name == "fake":
        from .fake import make_group

        world_size = options.pop("world_size", None) or 1
        if world_size != 1:
            raise CommError("a fake group of several ranks lives in one process: use backends.launch or fake.spawn")
        return make_group(1, **options)[0]
    if name == "emulated":
        from .emulated import EmulatedCommunicator

        return EmulatedCommunicator(**options)
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


def launch(name: str, fn: Callable[[Communicator], Any], **options: Any) -> list[Any]:
    """Run `fn(comm)` on the ranks this process hosts; closes (or aborts) the communicators."""
    if name == "fake":
        from .fake import spawn

        world_size = options.pop("world_size", None) or 1

        def run(comm: Communicator) -> Any:
            with comm:
                return fn(comm)

        return spawn(run, world_size, **options)
    with create(name, **options) as comm:
        return [fn(comm)]


__all__ = [
    "BACKENDS", "CollectiveMismatch", "CollectiveTimeout", "CommClosed", "CommError",
    "Communicator", "PeerFailure", "Work", "create", "launch",
]
