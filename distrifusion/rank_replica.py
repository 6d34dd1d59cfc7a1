"""Per-rank replicas of one pipeline for ranks that share a process (the fake backend).

Patching installs per-rank forwards on the denoiser's (UNet's, DiT's) and the VAE's modules, and schedulers and
(fast) tokenizers keep per-call state, so each rank needs its own of these; the weights are
shared, so N in-process ranks cost one copy of the model's memory.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


def unet_replica(unet: torch.nn.Module) -> torch.nn.Module:
    """A copy of `unet` with its own modules and the same weight tensors."""
    return copy.deepcopy(unet, memo={id(t): t for t in (*unet.parameters(), *unet.buffers())})


def vae_replica(vae: torch.nn.Module) -> torch.nn.Module:
    """A copy of `vae` with its own modules and parameter objects over the same weight tensors: a
    pipeline that casts its VAE for the decode (SDXL's float16 upcast) casts only its own."""
    params = {id(p): torch.nn.Parameter(p.data, p.requires_grad) for p in vae.parameters()}
    return copy.deepcopy(vae, memo={**params, **{id(t): t for t in vae.buffers()}})


def replica(pipe: Any) -> Any:
    """A shallow copy of `pipe` with its own UNet (or diffusion transformer) and VAE modules
    (sharing weights), scheduler and tokenizers."""
    twin = copy.copy(pipe)
    denoiser = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    setattr(twin, denoiser, unet_replica(getattr(pipe, denoiser)))
    twin.vae = vae_replica(pipe.vae)
    for name in ("scheduler", "tokenizer", "tokenizer_2", "tokenizer_3"):
        if getattr(pipe, name, None) is not None:
            setattr(twin, name, copy.deepcopy(getattr(pipe, name)))
    return twin
