"""MPI backend (mpi4py): nonblocking Iallgather/Iallreduce, launched by mpiexec/mpirun.

Works with MPICH and Open MPI (4.1 and 5.0); mpi4py's wheel loads whichever `libmpi` its
environment has, or the one `MPI4PY_LIBMPI` names. CPU tensors are handed to MPI as zero-copy
numpy views. 16-bit floats travel as their raw 16-bit words: Open MPI 4.1 has no float16
datatype and no MPI has a portable bfloat16 one (so they cannot be reduced). CUDA tensors go
straight to MPI when it is CUDA-aware, else through pinned host buffers allocated once per
shape. Every wait polls the request against a deadline, so a lost peer gives
`CollectiveTimeout` instead of a hang; a rank that raises aborts the whole job.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import traceback
from typing import Sequence

import numpy as np
import torch

from .base import (
    SIGNATURE_LEN,
    CollectiveTimeout,
    CommError,
    Communicator,
    Work,
    check_signatures,
    encode_signature,
    signature,
)

_REDUCIBLE = (torch.float32, torch.float64, torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)
_AS_WORDS = {torch.float16: torch.int16, torch.bfloat16: torch.int16}
_HOST_BYTES = 64
# mpiexec forwards a rank's output asynchronously and drops what it has not read when the job is
# aborted; before aborting, a rank waits this long so that its error reaches the user.
_ABORT_GRACE_S = 1.0
log = logging.getLogger(__name__)


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the install
        raise CommError("the mpi backend needs mpi4py: pip install 'distrifusion[mpi]'") from e
    return MPI


def _mpi_buffer(t: torch.Tensor):
    """What MPI is handed for contiguous `t`: a zero-copy view, 16-bit floats as raw int16 words."""
    if t.dtype in _AS_WORDS:
        t = t.view(_AS_WORDS[t.dtype])
    return t if t.device.type == "cuda" else t.detach().numpy()


class MPICommunicator(Communicator):
    """One rank of an MPI communicator (COMM_WORLD by default).

    Options: `device` ("cpu" or "cuda"; CUDA devices are picked by node-local rank),
    `timeout` seconds per collective, `world_size` to check against the launcher, `validate`
    to check every collective's shape and dtype across ranks first, `cuda_aware` to hand CUDA
    buffers to MPI directly (default: ask MPI).
    """

    def __init__(self, device: str = "cpu", timeout: float = 60.0, world_size: int | None = None,
                 validate: bool = True, cuda_aware: bool | None = None, _comm=None):
        super().__init__()
        MPI = _mpi()
        self._MPI = MPI
        self._comm = _comm if _comm is not None else MPI.COMM_WORLD
        self.rank, self.world_size = self._comm.Get_rank(), self._comm.Get_size()
        if world_size is not None and world_size != self.world_size:
            raise CommError(f"world_size={world_size} was asked for but mpiexec started {self.world_size} ranks")
        if device == "cuda":
            local = self._comm.Split_type(MPI.COMM_TYPE_SHARED)
            torch.cuda.set_device(local.Get_rank() % torch.cuda.device_count())
            local.Free()
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device(device)
        if cuda_aware is None:
            query = getattr(MPI, "Query_cuda_support", None)
            cuda_aware = bool(query()) if query is not None else False
        self._cuda_aware = cuda_aware
        self._timeout = timeout
        self._validate = validate
        self._staging: dict[tuple, torch.Tensor] = {}
        self._options = dict(device=device, timeout=timeout, validate=validate, cuda_aware=cuda_aware)
        if _comm is None:
            self._log_ranks()

    def _log_ranks(self) -> None:
        """Rank 0 logs the MPI library and every rank's host and pid.

        When a rank dies, MPICH's mpiexec names only its pid; this line maps it to the rank.
        """
        me = f"{socket.gethostname()[:_HOST_BYTES - 9]}:{os.getpid()}".encode().ljust(_HOST_BYTES)
        where = np.empty((self.world_size, _HOST_BYTES), dtype=np.uint8)
        self._poll(self._comm.Iallgather(np.frombuffer(me, dtype=np.uint8), where), "start-up")
        if self.rank == 0:
            ranks = " ".join(f"{r}={row.tobytes().decode().strip()}" for r, row in enumerate(where))
            library = " ".join(self._MPI.Get_library_version().splitlines()[0].split(",")[0].split())
            log.info("mpi: %d ranks on %s; rank=host:pid %s", self.world_size, library, ranks)

    def _poll(self, request, what: str) -> None:
        deadline = time.monotonic() + self._timeout
        pause = 1e-6
        while not request.Test():
            if time.monotonic() > deadline:
                raise CollectiveTimeout(f"rank {self.rank}: MPI {what} timed out after {self._timeout:g}s")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def _check(self, sig: tuple) -> None:
        if not self._validate:
            return
        mine = np.array(encode_signature(sig), dtype=np.int64)
        rows = np.empty((self.world_size, SIGNATURE_LEN), dtype=np.int64)
        self._poll(self._comm.Iallgather(mine, rows), f"{sig[0]} (shape and dtype check)")
        check_signatures(rows.tolist(), self.rank)

    def _host(self, t: torch.Tensor, role: str) -> torch.Tensor:
        """`t` itself if MPI can read it in place, else a pinned host buffer of its shape."""
        if t.device.type == "cpu" or self._cuda_aware:
            return t
        key = (role, tuple(t.shape), t.dtype)
        if key not in self._staging:
            self._staging[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return self._staging[key]

    def _all_gather(self, tensor: torch.Tensor, out: torch.Tensor) -> Work:
        self._check(signature("all_gather", tensor))
        send, recv = self._host(tensor, "send"), self._host(out, "recv")
        if send is not tensor:
            send.copy_(tensor)
        request = self._comm.Iallgather(_mpi_buffer(send), _mpi_buffer(recv))

        def wait() -> torch.Tensor:
            self._poll(request, "all_gather")
            return out if recv is out else out.copy_(recv, non_blocking=True)

        return Work(wait)

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> Work:
        if tensor.dtype not in _REDUCIBLE:
            raise TypeError(
                f"the mpi backend cannot reduce {tensor.dtype} (MPI has no such type); "
                f"supported: {', '.join(str(d) for d in _REDUCIBLE)}"
            )
        self._check(signature("all_reduce", tensor, op))
        buf = self._host(tensor, "reduce")
        if buf is not tensor:
            buf.copy_(tensor)
        mpi_op = {"sum": self._MPI.SUM, "max": self._MPI.MAX, "min": self._MPI.MIN}[op]
        request = self._comm.Iallreduce(self._MPI.IN_PLACE, _mpi_buffer(buf), mpi_op)

        def wait() -> torch.Tensor:
            self._poll(request, "all_reduce")
            return tensor if buf is tensor else tensor.copy_(buf)

        return Work(wait)

    def _broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self._check(signature("broadcast", tensor, src))
        buf = self._host(tensor, "bcast")
        if buf is not tensor:
            buf.copy_(tensor)
        self._poll(self._comm.Ibcast(_mpi_buffer(buf), root=src), "broadcast")
        return tensor if buf is tensor else tensor.copy_(buf)

    def _barrier(self) -> None:
        self._poll(self._comm.Ibarrier(), "barrier")

    def _split(self, groups: Sequence[tuple[int, ...]], members: Sequence[int]) -> Communicator:
        sub = self._comm.Split(color=groups.index(tuple(members)), key=self.rank)
        return MPICommunicator(_comm=sub, **self._options)

    def _close(self) -> None:
        if self._comm is not self._MPI.COMM_WORLD:
            self._comm.Free()

    def abort(self) -> None:
        """Print the error being handled and abort the whole MPI job, so no rank waits forever."""
        traceback.print_exc()
        print(f"rank {self.rank}: aborting the MPI job", file=sys.stderr, flush=True)
        time.sleep(_ABORT_GRACE_S)
        self._comm.Abort(1)
