"""Property-based tests of the patch GroupNorm statistics (distrifusion/stale_groupnorm.py)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distrifusion.stale_groupnorm import combine, corrected, local_moments, renormalize

settings.register_profile("stats", max_examples=60, deadline=None)
settings.load_profile("stats")


@st.composite
def patched_tensors(draw, even: bool = False):
    """A random (B, C, H, W) float64 tensor, a group count, and a row split into N patches."""
    n = draw(st.integers(1, 8))
    groups = draw(st.sampled_from([1, 2, 4]))
    b, c, w = draw(st.integers(1, 3)), groups * draw(st.integers(1, 3)), draw(st.integers(1, 5))
    if even:
        rows = [draw(st.integers(1, 4))] * n
    else:
        rows = draw(st.lists(st.integers(1, 6), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**31 - 1))
    scale, offset = draw(st.floats(0.01, 100)), draw(st.floats(-50, 50))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, sum(rows), w, generator=g, dtype=torch.float64) * scale + offset
    return x, groups, rows


def exact(x: torch.Tensor, groups: int) -> torch.Tensor:
    v, m = torch.var_mean(x.reshape(x.shape[0], groups, -1), dim=-1, unbiased=False)
    return torch.stack([m, v], -1)


def per_patch(x: torch.Tensor, groups: int, rows: list[int]) -> torch.Tensor:
    gn = torch.nn.GroupNorm(groups, x.shape[1])
    return torch.stack([local_moments(p, gn)[1].double() for p in x.split(rows, dim=2)])


def per_patch64(x, groups, rows):
    return torch.stack([exact(p, groups) for p in x.split(rows, dim=2)])


@given(patched_tensors())
def test_combining_patch_statistics_gives_the_full_statistics_for_any_split(case):
    x, groups, rows = case
    weights = torch.tensor(rows, dtype=torch.float64) / sum(rows)
    got = combine(per_patch64(x, groups, rows), weights)
    torch.testing.assert_close(got, exact(x, groups), rtol=1e-9, atol=1e-9)


@given(patched_tensors(even=True))
def test_local_moments_in_float32_match_float64(case):
    x, groups, rows = case
    got = combine(per_patch(x.float(), groups, rows).float())
    torch.testing.assert_close(got.double(), exact(x, groups), rtol=1e-4, atol=1e-3)


@given(patched_tensors(even=True), st.data(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_renormalizing_with_the_global_statistics_is_groupnorm_of_the_whole(case, data, dtype):
    x, groups, rows = case
    x = (x - x.mean()) / x.std(correction=0).clamp_min(1e-3)  # magnitudes a half-precision model sees
    gn = torch.nn.GroupNorm(groups, x.shape[1], eps=data.draw(st.sampled_from([1e-5, 1e-6])))
    with torch.no_grad():
        gn.weight.normal_(generator=torch.Generator().manual_seed(1))
        gn.bias.normal_(generator=torch.Generator().manual_seed(2))
    gn = gn.to(dtype)
    own = data.draw(st.integers(0, len(rows) - 1))
    patch = x.split(rows, dim=2)[own].to(dtype)
    z, moments = local_moments(patch, gn)
    assert z.dtype == dtype and moments.dtype == torch.float32
    stats = exact(x, groups)
    got = renormalize(z, moments, stats.float(), gn)
    b, c = x.shape[:2]
    mean, var = (stats[..., i].repeat_interleave(c // groups, 1).view(b, c, 1, 1) for i in (0, 1))
    want = ((x - mean) / (var + gn.eps).sqrt() * gn.weight.double().view(1, c, 1, 1)
            + gn.bias.double().view(1, c, 1, 1)).split(rows, dim=2)[own]
    tol = {torch.float32: 1e-4, torch.bfloat16: 6e-2}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@given(patched_tensors(even=True), st.data())
def test_corrected_equals_exact_when_nothing_changed(case, data):
    x, groups, rows = case
    stale = per_patch64(x, groups, rows)
    own = data.draw(st.integers(0, len(rows) - 1))
    torch.testing.assert_close(corrected(stale, own, stale[own]), exact(x, groups), rtol=1e-9, atol=1e-9)


@given(patched_tensors(even=True), st.data(), st.floats(-100, 100))
def test_corrected_mean_is_exact_when_every_patch_shifts_by_the_same_offset(case, data, shift):
    x, groups, rows = case
    stale = per_patch64(x, groups, rows)
    own = data.draw(st.integers(0, len(rows) - 1))
    fresh_own = exact(x.split(rows, dim=2)[own] + shift, groups)
    got = corrected(stale, own, fresh_own)
    truth = exact(x + shift, groups)
    torch.testing.assert_close(got[..., 0], truth[..., 0], rtol=1e-9, atol=1e-9)


@given(patched_tensors(even=True), st.data())
def test_corrected_variance_is_never_negative_or_nan(case, data):
    x, groups, rows = case
    stale = per_patch64(x, groups, rows)
    own = data.draw(st.integers(0, len(rows) - 1))
    shift, scale = data.draw(st.floats(-1e3, 1e3)), data.draw(st.floats(0, 10))
    fresh = exact(x.split(rows, dim=2)[own] * scale + shift, groups)
    got = corrected(stale, own, fresh)
    assert not got.isnan().any()
    assert (got[..., 1] >= 0).all()


@given(patched_tensors(even=True), st.data(), st.floats(1e-6, 1e-1))
def test_corrected_error_shrinks_with_the_step_to_step_change(case, data, eps):
    x, groups, rows = case
    own = data.draw(st.integers(0, len(rows) - 1))
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))),
                            dtype=torch.float64)
    x_new = x + eps * direction
    err = corrected(per_patch64(x, groups, rows), own, per_patch64(x_new, groups, rows)[own]) - exact(x_new, groups)
    a, d = x.abs().max().item() + eps * direction.abs().max().item(), direction.abs().max().item()
    assert err[..., 0].abs().max() <= 2 * eps * d + 1e-9
    assert err[..., 1].abs().max() <= (16 * a * d + 4 * eps * d * d) * eps + 1e-9


@given(patched_tensors(even=True), st.data())
def test_corrected_variance_is_the_e_x2_minus_e_x_squared_estimator(case, data):
    x, groups, rows = case
    stale = per_patch64(x, groups, rows)
    own = data.draw(st.integers(0, len(rows) - 1))
    fresh = exact(x.split(rows, dim=2)[own] * 1.1 + 0.3, groups)
    second = lambda m: m[..., 1] + m[..., 0] ** 2  # noqa: E731 - E[x^2] from (mean, var)
    mean = stale[..., 0].mean(0) + fresh[..., 0] - stale[own, ..., 0]
    ex2 = second(stale).mean(0) + second(fresh) - second(stale[own])
    expected = (ex2 - mean**2).clamp_min(0)
    torch.testing.assert_close(corrected(stale, own, fresh)[..., 1], expected, rtol=1e-7, atol=1e-6)
