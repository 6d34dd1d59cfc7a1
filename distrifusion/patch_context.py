"""Parallel state of one patch-parallel model: who this rank is, which step it is, and the
per-layer exchanges of activations between patches (fresh or stale).

This is the only place in the algorithm that calls the communicator.
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

import torch

from backends import Communicator, Work

from .parallel_config import ParallelConfig

T = TypeVar("T")
log = logging.getLogger("distrifusion")


class Exchange:
    """One layer's all-gather of a small tensor from every patch, into one reused buffer.

    `run(fresh, use)` returns `use(gathered)` where `gathered` is (N, *fresh.shape):
    this step's values of every patch in a synchronous step, the previous step's in the
    displaced regime. In the latter, this step's `fresh` is all-gathered asynchronously into
    the same buffer after `use` has read it, and waited for only at the next step. `use`
    must not return views of `gathered`.
    """

    def __init__(self, ctx: "PatchContext", tag: str):
        self.ctx, self.tag = ctx, tag
        self.buffer: torch.Tensor | None = None
        self.pending: Work | None = None

    def run(self, fresh: torch.Tensor, use: Callable[[torch.Tensor], T], sync: bool = False) -> T:
        ctx = self.ctx
        shape = (ctx.world_size, *fresh.shape)
        if self.buffer is None or self.buffer.shape != shape or self.buffer.dtype != fresh.dtype:
            self.finish()
            self.buffer = ctx.allocate(shape, fresh.dtype, fresh.device)
        if sync or ctx.sync_step:
            self.finish()
            ctx.comm.all_gather(fresh, out=self.buffer, tag=self.tag)
            return use(self.buffer)
        self.finish()
        result = use(self.buffer)
        self.pending = ctx.comm.all_gather(fresh, async_op=True, out=self.buffer, tag=self.tag)
        return result

    def finish(self) -> None:
        """Wait for the gather in flight, if any."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None

    def buffers(self) -> list[torch.Tensor]:
        """The tensors this exchange keeps between steps (what its stale state costs in memory)."""
        return [] if self.buffer is None else [self.buffer]


class PatchContext:
    """State shared by the patched layers of one model on one rank.

    `comm` is the group that shares one image (all ranks, or half of them when the two
    guidance branches are split); `world_comm` is every rank.
    """

    def __init__(self, world_comm: Communicator, config: ParallelConfig):
        self.config = config
        self.world_comm = world_comm
        n = world_comm.world_size
        self.half_comm = None
        if config.split_cfg and n >= 2:
            if n % 2:
                log.warning("split_cfg needs an even number of ranks; %d ranks run both guidance branches", n)
            else:
                self.half_comm = world_comm.split(world_comm.rank * 2 // n)
        self.step = 0
        self.exchanges: list[Exchange] = []
        self.allocations = 0
        self.allocated_bytes = 0
        self.branches = 0
        self.use_branches(1)

    def can_split(self, batch: int) -> bool:
        """Whether a batch holding both guidance branches can be split over the two halves."""
        return self.half_comm is not None and batch % 2 == 0

    def use_branches(self, branches: int) -> None:
        """Patch over all ranks (1) or over one half per guidance branch (2)."""
        if self.branches == branches:
            return
        self.finish()
        self.branches = branches
        self.comm = self.half_comm if branches == 2 else self.world_comm
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.branch = self.world_comm.rank * 2 // self.world_comm.world_size if branches == 2 else 0

    @property
    def sync_step(self) -> bool:
        """Whether this step exchanges fresh activations synchronously."""
        if self.config.mode == "sync_patch":
            return True
        return self.step < max(1, self.config.warmup_steps)

    @property
    def exchanges_enabled(self) -> bool:
        return self.config.mode != "naive_patch" and self.world_size > 1

    def groupnorm_policy(self) -> str:
        """How GroupNorm gets its statistics this step."""
        if not self.exchanges_enabled:
            return "separate"
        if self.sync_step:
            return "sync"
        return self.config.groupnorm

    def exchange(self, tag: str) -> Exchange:
        """A new uncompressed exchange named `tag`, registered."""
        return self.register(Exchange(self, tag))

    def register(self, exchange: Exchange) -> Exchange:
        """Keep `exchange` so that `finish` waits for it; returns it."""
        self.exchanges.append(exchange)
        return exchange

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A communication buffer; counted, so tests can check steady steps allocate none."""
        self.allocations += 1
        buf = torch.empty(shape, dtype=dtype, device=device)
        self.allocated_bytes += buf.numel() * buf.element_size()
        return buf

    def finish(self) -> None:
        """Wait for every gather still in flight (end of a generation)."""
        for ex in self.exchanges:
            ex.finish()

    def reset(self) -> None:
        """Start a new generation: step 0, nothing in flight."""
        self.finish()
        self.step = 0
