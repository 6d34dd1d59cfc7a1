"""GroupNorm over patches: per-patch moments, their exact combination, and the corrected
stale estimate that DistriFusion uses after warm-up (see docs/algorithm.md).

Statistics are kept per (sample, group) as a pair (mean, variance) in float32. Row patches
have equal sizes, so combining is an unweighted average unless weights are given. A patch is
normalised with its own statistics by the fused kernel, then moved to the global ones by one
per-channel multiply-add, so a patched GroupNorm costs two memory passes more than stock.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .patch_context import Exchange, PatchContext


@functools.lru_cache(maxsize=None)
def _unit_affine(channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.ones(channels, dtype=torch.float32, device=device),
            torch.zeros(channels, dtype=torch.float32, device=device))


def local_moments(x: torch.Tensor, gn: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` normalised with its own group statistics (no affine), and those (B, G, 2) float32
    [mean, variance].

    One fused GroupNorm kernel gives both: float32 unit affine parameters make it keep its
    statistics in float32 even when `x` is half precision.
    """
    b, c, g = x.shape[0], x.shape[1], gn.num_groups
    ones, zeros = _unit_affine(c, x.device)
    z, mean, rstd = torch.native_group_norm(x.contiguous(), ones, zeros, b, c, x.numel() // (b * c), g, gn.eps)
    var = (rstd.float().pow(-2) - gn.eps).clamp_min(0)
    return z, torch.stack([mean.float(), var], dim=-1)


def combine(moments: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Exact (mean, variance) of the union of patches from their (N, ..., 2) moments.

    `weights` (N,) are the patches' shares of the elements (default: equal). Uses the
    parallel form var = sum_r w_r var_r + sum_r w_r (mean_r - mean)^2, which equals
    E[x^2] - E[x]^2 but does not lose precision to cancellation. The equal-share case (every
    row patch) takes few kernels: it runs once per GroupNorm per step.
    """
    means, variances = moments[..., 0], moments[..., 1]
    if weights is None:
        spread, mean = torch.var_mean(means, dim=0, correction=0)
        return torch.stack([mean, variances.mean(0) + spread], dim=-1)
    w = weights.to(moments.dtype).reshape(-1, *[1] * (moments.ndim - 2))
    mean = (w * means).sum(0)
    var = (w * variances).sum(0) + (w * (means - mean).square()).sum(0)
    return torch.stack([mean, var], dim=-1)


def corrected(stale: torch.Tensor, own: int, fresh: torch.Tensor) -> torch.Tensor:
    """Stale global moments corrected by this patch's change since the last step.

    With S the stale global moments, m the stale and m' the fresh local moments:
    E[x] = S_mean + (m'_mean - m_mean) and E[x^2] = S_E[x^2] + (m'_E[x^2] - m_E[x^2]).
    The variance E[x^2] - E[x]^2 of these is, exactly in algebra,
    S_var + dvar + 2 dmean (m_mean - S_mean), which is computed here (no cancellation),
    and clamped at zero.
    """
    glob = combine(stale)
    change = fresh - stale[own]
    dmean, dvar = change[..., 0], change[..., 1]
    var = torch.addcmul(glob[..., 1] + dvar, dmean, stale[own, ..., 0] - glob[..., 0], value=2)
    return torch.stack([glob[..., 0] + dmean, var.clamp_min(0)], dim=-1)


def renormalize(z: torch.Tensor, own: torch.Tensor, stats: torch.Tensor, gn: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm `gn` of x with statistics `stats`, from z = x normalised with its own `own`.

    Per group, (x - mean) / s = z * s_own / s + (mean_own - mean) / s with s = sqrt(var + eps):
    together with `gn`'s affine, one multiply-add per channel over z (one memory pass).
    """
    b, c, g = z.shape[0], z.shape[1], gn.num_groups
    inv = torch.rsqrt(stats[..., 1] + gn.eps)
    scale = (torch.sqrt(own[..., 1] + gn.eps) * inv)[..., None]  # (B, G, 1): per channel of the group
    shift = ((own[..., 0] - stats[..., 0]) * inv)[..., None]
    if gn.affine:
        weight = gn.weight.view(g, -1)
        scale, shift = scale * weight, torch.addcmul(gn.bias.view(g, -1), shift, weight)
    shape = (b, c) + (1,) * (z.ndim - 2)
    scale, shift = (t.to(z.dtype).expand(b, g, c // g).reshape(shape) for t in (scale, shift))
    return torch.addcmul(shift, z, scale)


class PatchGroupNorm:
    """Forward of one `nn.GroupNorm` on a patch, with global statistics per the context."""

    def __init__(self, gn: nn.GroupNorm, ctx: "PatchContext", exchange: "Exchange"):
        self.gn, self.ctx, self.exchange = gn, ctx, exchange

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gn, policy = self.gn, self.ctx.groupnorm_policy()
        if policy == "separate":
            return F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)
        z, fresh = local_moments(x, gn)
        own = self.ctx.rank
        if policy == "corrected":
            stats = self.exchange.run(fresh, lambda stale: corrected(stale, own, fresh))
        elif policy == "stale":
            stats = self.exchange.run(fresh, combine)
        else:
            stats = self.exchange.run(fresh, combine, sync=True)
        return renormalize(z, fresh, stats, gn)
