"""torch.distributed backend: NCCL for CUDA tensors, gloo for CPU, set up from `torchrun`'s env.

One `timeout` bounds every collective on both. gloo waits with it on the host, and a peer that
died shows up as a broken connection, raised here as `PeerFailure` naming that peer. NCCL waits
on the stream, not the host, so compute keeps overlapping communication; there the timeout is
the process group's, enforced by torch's NCCL watchdog, which tears the process down when a
collective outlives it (`TORCH_NCCL_ASYNC_ERROR_HANDLING`) instead of leaving it hanging.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

from .base import (
    SIGNATURE_LEN,
    CollectiveTimeout,
    CommError,
    Communicator,
    PeerFailure,
    Work,
    check_signatures,
    encode_signature,
    signature,
)

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# all_gather_single replaced all_gather_into_tensor in newer torch; same semantics.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
# 3: the watchdog ends the process when an NCCL collective fails or outlives the timeout. It is
# current torch's default; set for older releases, where such a rank could hang instead.
_NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}


def _translate(error: RuntimeError, rank: int, peers: Sequence[int]) -> CommError:
    """A torch.distributed error as ours: a timeout, or a peer (named when it can only be one) gone."""
    text = str(error)
    if "timed out" in text.lower() or "timeout" in text.lower():
        return CollectiveTimeout(f"rank {rank}: {text}")
    who = f"rank {peers[0]}" if len(peers) == 1 else f"one of ranks {list(peers)}"
    return PeerFailure(f"rank {rank}: {who} failed or left ({text.splitlines()[0]})")


class TorchCommunicator(Communicator):
    """One rank of a torch.distributed process group.

    Options: `backend` ("nccl"/"gloo", default by device), `device` ("cpu"/"cuda", default
    cuda when available), `timeout` seconds per collective, `world_size` to check against the
    launcher, `validate` to check every collective's shape and dtype across ranks first (one
    small extra collective; turn off for speed once a program is known to be right).
    """

    def __init__(self, backend: str | None = None, device: str | None = None, timeout: float = 60.0,
                 world_size: int | None = None, validate: bool = True, _group=None):
        super().__init__()
        self._validate = validate
        self._group = _group
        if _group is None and not dist.is_initialized():
            missing = [v for v in _LAUNCH_VARS if v not in os.environ]
            if missing:
                raise CommError(
                    f"the torch backend must be launched by torchrun (missing env {missing}); "
                    "e.g. torchrun --nproc_per_node 2 -m distrifusion backend=torch"
                )
            launched = int(os.environ["WORLD_SIZE"])
            if world_size is not None and world_size != launched:
                raise CommError(f"world_size={world_size} was asked for but torchrun started {launched} ranks")
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            backend = backend or ("nccl" if device == "cuda" else "gloo")
            if backend == "nccl":
                for name, value in _NCCL_ENV.items():
                    os.environ.setdefault(name, value)
            if device == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        self.rank = dist.get_rank(self._group)
        self.world_size = dist.get_world_size(self._group)
        self._nccl = dist.get_backend(self._group) == "nccl"
        if self._nccl:
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self._timeout = timedelta(seconds=timeout)
        self._global_rank = dist.get_rank()
        self._peers = [self._to_global(r) for r in range(self.world_size) if r != self.rank]

    def _to_global(self, rank: int) -> int:
        return dist.get_global_rank(self._group, rank) if self._group is not None else rank

    def _check(self, sig: tuple) -> None:
        if not self._validate:
            return
        mine = torch.tensor(encode_signature(sig), dtype=torch.int64, device=self.device)
        rows = torch.empty(self.world_size, SIGNATURE_LEN, dtype=torch.int64, device=self.device)
        self._call(lambda: dist.all_gather(list(rows.unbind(0)), mine, group=self._group))
        check_signatures(rows.tolist(), self.rank)

    def _call(self, fn):
        try:
            return fn()
        except RuntimeError as e:
            raise _translate(e, self._global_rank, self._peers) from e

    def _finish(self, handle, result: torch.Tensor) -> Work:
        def wait() -> torch.Tensor:
            if self._nccl:
                self._call(handle.wait)  # orders the stream; a timeout would block the host
            else:
                self._call(lambda: handle.wait(self._timeout))
            return result

        return Work(wait)

    def _all_gather(self, tensor: torch.Tensor, out: torch.Tensor) -> Work:
        self._check(signature("all_gather", tensor))
        handle = self._call(lambda: _ALL_GATHER(out.view(-1), tensor.view(-1), group=self._group, async_op=True))
        return self._finish(handle, out)

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> Work:
        self._check(signature("all_reduce", tensor, op))
        handle = self._call(lambda: dist.all_reduce(tensor, _OPS[op], group=self._group, async_op=True))
        return self._finish(handle, tensor)

    def _broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self._check(signature("broadcast", tensor, src))
        handle = self._call(lambda: dist.broadcast(tensor, self._to_global(src), group=self._group, async_op=True))
        return self._finish(handle, tensor).wait()

    def _barrier(self) -> None:
        flag = torch.zeros(1, device=self.device)
        self._all_reduce(flag, "sum").wait()

    def _split(self, groups: Sequence[tuple[int, ...]], members: Sequence[int]) -> Communicator:
        mine = None
        for g in groups:  # every rank must create every group, in the same order
            pg = dist.new_group([self._to_global(r) for r in g])
            if tuple(g) == tuple(members):
                mine = pg
        return TorchCommunicator(timeout=self._timeout.total_seconds(), validate=self._validate, _group=mine)

    def _close(self) -> None:
        if self._group is None and dist.is_initialized():
            dist.destroy_process_group()

    def abort(self) -> None:
        """Say why, and leave the process group, so the other ranks' collectives fail at once."""
        error = sys.exc_info()[1]
        why = f" after {type(error).__name__}: {error}" if error is not None else ""
        print(f"rank {self._global_rank}: leaving the process group{why}", file=sys.stderr, flush=True)
        self.close()
