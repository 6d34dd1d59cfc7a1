"""Rank 0 tells the other ranks what to do next, through the Communicator alone.

A message is a small JSON object, broadcast as its byte count (int64) then its bytes (uint8), so
any backend carries it. Rank 0 sends one every round, an idle one when no job came: the other
ranks, waiting for it, stay inside a collective's timeout, and rank 0, sending, notices a dead
peer while the service idles.
"""

from __future__ import annotations

import json
from typing import Optional

import torch

from backends import Communicator

IDLE = {"kind": "idle"}
SHUTDOWN = {"kind": "shutdown"}


def share(comm: Communicator, message: Optional[dict]) -> dict:
    """Collective: rank 0's `message` (others pass None), on every rank."""
    data = json.dumps(message).encode() if comm.rank == 0 else b""
    length = torch.tensor([len(data)], dtype=torch.int64, device=comm.device)
    comm.broadcast(length, src=0, tag="serve:length")
    payload = torch.tensor(list(data), dtype=torch.uint8) if comm.rank == 0 else torch.empty(int(length), dtype=torch.uint8)
    payload = comm.broadcast(payload.to(comm.device), src=0, tag="serve:message")
    return json.loads(bytes(payload.cpu().tolist()))


def failed_ranks(comm: Communicator, failed: bool) -> list[int]:
    """Collective: the ranks that passed `failed=True`, so every rank agrees a job failed."""
    flags = comm.all_gather(torch.tensor([int(failed)], dtype=torch.int64, device=comm.device), tag="serve:failed")
    return [rank for rank, flag in enumerate(flags.flatten().tolist()) if flag]
