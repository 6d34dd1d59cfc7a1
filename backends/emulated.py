"""Emulated backend: this process plays rank `rank` of `world_size` alone.

Collectives complete locally with the other ranks' contributions synthesised (copies of
this rank's own tensor), so one device runs exactly the code path, buffers and shapes of
one rank of a larger group. It times one rank's work on one GPU, and records a rank's
trace for the simulator without starting the others.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import Communicator, Work


class EmulatedCommunicator(Communicator):
    """Rank `rank` of an imagined group of `world_size` ranks, on `device` (`timeout` is moot)."""

    def __init__(self, world_size: int = 2, rank: int = 0, device: str | torch.device = "cpu",
                 timeout: float | None = None):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"emulated rank must be in [0, {world_size}), got {rank}")
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)

    def _all_gather(self, tensor: torch.Tensor, out: torch.Tensor) -> Work:
        out.copy_(tensor.unsqueeze(0).expand_as(out))
        return Work(lambda: out)

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> Work:
        if op == "sum":
            tensor.mul_(self.world_size)
        return Work(lambda: tensor)

    def _broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        return tensor

    def _barrier(self) -> None:
        return None

    def _split(self, groups: Sequence[tuple[int, ...]], members: Sequence[int]) -> Communicator:
        return EmulatedCommunicator(len(members), members.index(self.rank), self.device)

    def split(self, color: int) -> Communicator:
        """Every imagined rank r takes colour `r * 2 // world_size` (the guidance halves)."""
        self._check_open()
        half = self.world_size // 2
        members = tuple(range(half)) if self.rank < half else tuple(range(half, self.world_size))
        return self._split([members], members)

    def _close(self) -> None:
        return None
