"""An `Exchange` whose displaced-step gathers carry 8-bit codes (`parallel.compress`).

Synchronous steps gather fresh values uncompressed, as `Exchange` does. Displaced steps send
this patch's values encoded (`compression.BlockCodec`) and keep what they receive encoded: the
stale buffer that stays allocated for the whole generation holds one byte per element (plus
scales) instead of two or four, and each layer decodes it into a temporary when it reads it.

With `delta`, a rank sends the change of its values since what the others last reconstructed,
and every rank keeps a full-precision copy of every patch (`buffer`) to which all of them add
the same decoded deltas, so the copies never drift apart; the quantisation error then scales
with the step-to-step change instead of the values. The copies cost full-precision memory.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

from .compression import BlockCodec
from .patch_context import Exchange, PatchContext

T = TypeVar("T")


class CompressedExchange(Exchange):
    """`Exchange.run` with 8-bit displaced gathers of `kind` ("fp8" or "int8"), optionally deltas."""

    def __init__(self, ctx: PatchContext, tag: str, kind: str, delta: bool):
        super().__init__(ctx, tag)
        self.kind, self.delta = kind, delta
        self.codec: BlockCodec | None = None
        self.payloads: torch.Tensor | None = None  # (N, payload_bytes): the last codes received

    def run(self, fresh: torch.Tensor, use: Callable[[torch.Tensor], T], sync: bool = False) -> T:
        ctx = self.ctx
        self._fit(fresh)
        if sync or ctx.sync_step:
            if self.delta:
                return super().run(fresh, use, sync=True)  # `buffer`: every patch's exact values
            self.finish()
            gathered = torch.empty((ctx.world_size, *fresh.shape), dtype=fresh.dtype, device=fresh.device)
            result = use(ctx.comm.all_gather(fresh, out=gathered, tag=self.tag))
            self.codec.encode(gathered, out=self.payloads)  # what the next displaced step reads
            return result
        self.finish()
        if self.delta:
            own = self.buffer[ctx.rank].clone()  # `use` writes its fresh values there; the copy must stay
            sent = self.codec.encode(fresh - own).view(-1)
            result = use(self.buffer)
            self.buffer[ctx.rank] = own
        else:
            sent = self.codec.encode(fresh).view(-1)
            result = use(self.codec.decode(self.payloads, fresh.dtype).view(ctx.world_size, *fresh.shape))
        self.pending = ctx.comm.all_gather(sent, async_op=True, out=self.payloads, tag=self.tag)
        return result

    def finish(self) -> None:
        """Wait for the gather in flight, if any; with `delta`, add the received changes."""
        received = self.pending is not None
        super().finish()
        if received and self.delta:
            self.buffer += self.codec.decode(self.payloads, self.buffer.dtype).view_as(self.buffer)

    def buffers(self) -> list[torch.Tensor]:
        return [b for b in (self.payloads, self.buffer) if b is not None]

    def _fit(self, fresh: torch.Tensor) -> None:
        """(Re)build the codec and the payload buffer for `fresh`'s size (and, with `delta`,
        the full-precision copies)."""
        ctx = self.ctx
        if self.codec is None or self.codec.numel != fresh.numel() or self.payloads.shape[0] != ctx.world_size:
            self.finish()
            self.codec = BlockCodec(self.kind, fresh.numel())
            self.payloads = ctx.allocate((ctx.world_size, self.codec.payload_bytes), torch.uint8, fresh.device)
        shape = (ctx.world_size, *fresh.shape)
        if self.delta and (self.buffer is None or self.buffer.shape != shape or self.buffer.dtype != fresh.dtype):
            self.buffer = ctx.allocate(shape, fresh.dtype, fresh.device)


def activation_exchange(ctx: PatchContext, tag: str) -> Exchange:
    """The exchange of one layer's activations (K/V or halo rows), compressed as
    `parallel.compress` says in mode displaced (GroupNorm statistics use `ctx.exchange`)."""
    config = ctx.config
    if config.compress == "none" or config.mode != "displaced":
        return ctx.exchange(tag)
    return ctx.register(CompressedExchange(ctx, tag, config.compress, config.delta))
