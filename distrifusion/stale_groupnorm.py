"""GroupNorm over patches: per-patch moments, their exact combination, and the corrected
stale estimate that DistriFusion uses after warm-up (see docs/stale_groupnorm.md).

Statistics are kept per (sample, group) as a pair (mean, variance) in float32. Row patches
have equal sizes, so combining is an unweighted average unless weights are given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .patch_context import Exchange, PatchContext


def local_moments(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, G, 2) float32 [mean, variance] of each group of this patch."""
    var, mean = torch.var_mean(x.reshape(x.shape[0], groups, -1).float(), dim=-1, unbiased=False)
    return torch.stack([mean, var], dim=-1)


def combine(moments: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Exact (mean, variance) of the union of patches from their (N, ..., 2) moments.

    `weights` (N,) are the patches' shares of the elements (default: equal). Uses the
    parallel form var = sum_r w_r var_r + sum_r w_r (mean_r - mean)^2, which equals
    E[x^2] - E[x]^2 but does not lose precision to cancellation.
    """
    if weights is None:
        weights = torch.full((moments.shape[0],), 1.0 / moments.shape[0], dtype=moments.dtype, device=moments.device)
    w = weights.to(moments.dtype).reshape(-1, *[1] * (moments.ndim - 2))
    means, variances = moments[..., 0], moments[..., 1]
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
    dmean = fresh[..., 0] - stale[own, ..., 0]
    dvar = fresh[..., 1] - stale[own, ..., 1]
    mean = glob[..., 0] + dmean
    var = glob[..., 1] + dvar + 2 * dmean * (stale[own, ..., 0] - glob[..., 0])
    return torch.stack([mean, var.clamp_min(0)], dim=-1)


def normalize(x: torch.Tensor, stats: torch.Tensor, gn: nn.GroupNorm) -> torch.Tensor:
    """Apply GroupNorm `gn` to `x` with given (B, G, 2) statistics."""
    b, g = x.shape[0], gn.num_groups
    mean, var = stats[..., 0:1], stats[..., 1:2]
    y = ((x.reshape(b, g, -1).float() - mean) * torch.rsqrt(var + gn.eps)).to(x.dtype).reshape(x.shape)
    if gn.affine:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        y = y * gn.weight.reshape(shape) + gn.bias.reshape(shape)
    return y


class PatchGroupNorm:
    """Forward of one `nn.GroupNorm` on a patch, with global statistics per the context."""

    def __init__(self, gn: nn.GroupNorm, ctx: "PatchContext", exchange: "Exchange"):
        self.gn, self.ctx, self.exchange = gn, ctx, exchange

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        fresh = local_moments(x, self.gn.num_groups)
        policy = self.ctx.groupnorm_policy()
        if policy == "separate":
            return normalize(x, fresh, self.gn)
        own = self.ctx.rank
        if policy == "corrected":
            stats = self.exchange.run(fresh, lambda stale: corrected(stale, own, fresh))
        elif policy == "stale":
            stats = self.exchange.run(fresh, combine)
        else:
            stats = self.exchange.run(fresh, combine, sync=True)
        return normalize(x, stats, self.gn)
