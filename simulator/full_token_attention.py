"""The ceiling's denoiser (see `simulator.ceiling`): attention over every patch's tokens with no
exchange, recorded on the meta device."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch

from distrifusion.dit_attention import PatchTokenAttention
from distrifusion.model_configs import get_spec
from distrifusion.patch_attention import PatchSelfAttention
from distrifusion.patch_context import PatchContext

T = TypeVar("T")


class FullTokenAttention(PatchSelfAttention):
    """Self-attention of this patch's queries over the K/V of every patch of its image
    (`ctx.world_size` patches, read when called), with no exchange.

    The other patches' K/V sit in a buffer allocated on the first call (copies of that call's
    K/V, so on a GPU the data and with it the clocks look like real activations); every call
    writes its own slot, as the real displaced step does.
    """

    def __init__(self, ctx: PatchContext):
        self.ctx, self.kv = ctx, None

    def _attend(self, attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        patches, tokens = self.ctx.world_size, key.shape[1]
        if self.kv is None or self.kv.shape[2] != patches * tokens:
            self.kv = torch.stack([key, value]).repeat(1, 1, patches, 1)
        mine = slice(self.ctx.rank * tokens, (self.ctx.rank + 1) * tokens)
        self.kv[0, :, mine] = key
        self.kv[1, :, mine] = value
        return PatchSelfAttention._attend(attn, query, self.kv[0], self.kv[1])


class NoExchange:
    """Stands in for a DiT attention's `Exchange` in a synchronous step: `run(fresh, use)` hands
    `use` a buffer with a slot per patch, made on the first call from copies of that call's
    values (the attention writes its own slot fresh), and sends nothing."""

    def __init__(self, patches: int):
        self.patches, self.buffer = patches, None

    def run(self, fresh: torch.Tensor, use: Callable[[torch.Tensor], T], sync: bool = False) -> T:
        if self.buffer is None or self.buffer.shape[1:] != fresh.shape:
            self.buffer = fresh.expand(self.patches, *fresh.shape).clone()
        return use(self.buffer)


def ceiling_mode(model: str) -> str:
    """The mode the ceiling is made from: a UNet's "naive_patch" (no halos, no shared GroupNorm
    statistics), a DiT's "sync_patch" (its attention reads every patch's K/V; it has nothing else
    to exchange)."""
    return "naive_patch" if get_spec(model).unet is not None else "sync_patch"


def to_ceiling(denoiser: torch.nn.Module) -> torch.nn.Module:
    """Turn a denoiser parallelized in `ceiling_mode` into the ceiling's (its attention attends
    over every patch's tokens, nothing exchanged); returns it."""
    for module in denoiser.modules():
        processor: Any = getattr(module, "processor", None)
        if isinstance(processor, PatchSelfAttention):
            module.set_processor(FullTokenAttention(processor.ctx))
        elif isinstance(processor, PatchTokenAttention):
            processor.exchange = NoExchange(processor.ctx.world_size)
    return denoiser


def record_ceiling(model: str, resolution: int, world_size: int, split_cfg: bool = True, cfg: bool = True,
                   dtype: str = "float16") -> dict[str, Any]:
    """The ceiling as a trace without collectives (layout: `simulator.engine`): every step is
    one steady ceiling step of rank `unet_run.role_rank`, recorded on the meta device."""
    from .meta_memo import MetaMemo
    from .op_counter import OpCounter
    from .unet_run import EmulatedUNet

    counter = OpCounter()
    run = EmulatedUNet(model, resolution, world_size, ceiling_mode(model), counter, device="meta",
                       dtype=getattr(torch, dtype), cfg=cfg, warmup_steps=1, split_cfg=split_cfg)
    to_ceiling(run.unet)
    with MetaMemo():
        run.step()  # allocates the K/V buffers
        with counter:
            run.step()
    step = [counter.cut("ceiling step")]
    meta = {"model": model, "resolution": resolution, "world_size": world_size, "mode": "ceiling",
            "warmup_steps": 0, "split_cfg": split_cfg, "cfg": cfg, "dtype": dtype, "recorded_rank": run.rank}
    return {"meta": meta, "roles": [{"ranks": list(range(world_size)), "phases": {"steady": step}}]}
