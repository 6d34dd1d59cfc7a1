"""The ceiling's UNet (see `simulator.ceiling`): self-attention over every patch's tokens with
no exchange, recorded on the meta device."""

from __future__ import annotations

from typing import Any

import torch

from distrifusion.patch_attention import PatchSelfAttention
from distrifusion.patch_context import PatchContext


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


def to_ceiling(unet: torch.nn.Module) -> torch.nn.Module:
    """Turn a UNet parallelized in mode `naive_patch` into the ceiling's (its self-attention
    attends over every patch's tokens); returns it."""
    ctx = unet.forward.ctx
    for module in unet.modules():
        if isinstance(getattr(module, "processor", None), PatchSelfAttention):
            module.set_processor(FullTokenAttention(ctx))
    return unet


def record_ceiling(model: str, resolution: int, world_size: int, split_cfg: bool = True, cfg: bool = True,
                   dtype: str = "float16") -> dict[str, Any]:
    """The ceiling as a trace without collectives (layout: `simulator.engine`): every step is
    one steady ceiling step of rank `unet_run.role_rank`, recorded on the meta device."""
    from .meta_memo import MetaMemo
    from .op_counter import OpCounter
    from .unet_run import EmulatedUNet

    counter = OpCounter()
    run = EmulatedUNet(model, resolution, world_size, "naive_patch", counter, device="meta",
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
