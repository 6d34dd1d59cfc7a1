"""GroupNorm over patches: per-patch moments, their exact combination, and the corrected
stale estimate that DistriFusion uses after warm-up (see docs/algorithm.md).

Statistics are kept per (sample, group) as a pair (mean, variance) in float32 (float64 for
float64 activations), whatever the activations' dtype. Row patches have equal sizes, so combining is an unweighted average unless
weights are given. A patched GroupNorm reads its patch three times (two float32-accumulating
reductions, one per-channel multiply-add that writes the output): 8 bytes per fp16 element,
against 6 for the stock fused kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .patch_context import Exchange, PatchContext


def local_moments(x: torch.Tensor, gn: nn.GroupNorm) -> torch.Tensor:
    """(B, G, 2) float32 [mean, variance] of `x`'s groups, whatever `x`'s dtype (float64 stays float64).

    Two reductions that read `x` once each and accumulate and write float32 (on CUDA the
    half-to-float cast happens inside the reduction kernel, no float copy of `x`): as accurate
    as a float32 computation of the same tensor, which a half-precision fused GroupNorm kernel,
    returning its statistics in the input's dtype, is not.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    groups = x.reshape(x.shape[0], gn.num_groups, -1)
    if x.device.type == "cpu":  # CPU reductions make this float32 copy anyway (and var's has gaps)
        groups = groups.to(acc)
    var = torch.empty(groups.shape[:2], dtype=acc, device=x.device)
    torch.var(groups, dim=-1, correction=0, out=var)
    return torch.stack([groups.mean(dim=-1, dtype=acc), var], dim=-1)


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


def normalize(x: torch.Tensor, stats: torch.Tensor, gn: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm `gn` of `x` with given (B, G, 2) group statistics (float32 or float64), in `x`'s dtype.

    y = x * scale + shift per channel, with scale = weight / sqrt(var + eps) and
    shift = bias - mean * scale: one pass over `x`, computed in float32 (the form the fused
    GroupNorm kernels use), written in `x`'s dtype. Inference only: no autograd graph.
    """
    b, c, g = x.shape[0], x.shape[1], gn.num_groups
    scale = torch.rsqrt(stats[..., 1] + gn.eps)[..., None].expand(b, g, c // g)  # (B, G, C/G)
    shift = -stats[..., 0, None] * scale
    if gn.affine:
        weight, bias = (p.detach().view(g, -1).to(stats.dtype) for p in (gn.weight, gn.bias))
        scale, shift = scale * weight, torch.addcmul(bias, shift, weight)
    shape = (b, c) + (1,) * (x.ndim - 2)
    return torch.addcmul(shift.reshape(shape), x, scale.reshape(shape), out=torch.empty_like(x))


class PatchGroupNorm:
    """Forward of one `nn.GroupNorm` on a patch, with global statistics per the context."""

    def __init__(self, gn: nn.GroupNorm, ctx: "PatchContext", exchange: "Exchange"):
        self.gn, self.ctx, self.exchange = gn, ctx, exchange

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gn, policy = self.gn, self.ctx.groupnorm_policy()
        if policy == "separate":
            return F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)
        fresh = local_moments(x, gn)
        own = self.ctx.rank
        if policy == "corrected":
            stats = self.exchange.run(fresh, lambda stale: corrected(stale, own, fresh))
        elif policy == "stale":
            stats = self.exchange.run(fresh, combine)
        else:
            stats = self.exchange.run(fresh, combine, sync=True)
        return normalize(x, stats, gn)
