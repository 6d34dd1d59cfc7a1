"""Property-based tests of the patch GroupNorm statistics (distrifusion/stale_groupnorm.py)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distrifusion.stale_groupnorm import combine, corrected, local_moments, normalize

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
    return torch.stack([local_moments(p, gn).double() for p in x.split(rows, dim=2)])


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


UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
LOW_PRECISION = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@given(patched_tensors(even=True), LOW_PRECISION)
def test_local_moments_are_float32_accurate_in_every_dtype(case, dtype):
    """Statistics of a half-precision tensor are as accurate as float32 arithmetic on it: within
    the worst-case bound of summing n terms in float32, n * u32 * max|term| (far below
    half-precision rounding of the statistics themselves)."""
    x, groups, _ = case
    x = x.to(dtype)
    got = local_moments(x, torch.nn.GroupNorm(groups, x.shape[1]))
    assert got.dtype == torch.float32
    want = exact(x.double(), groups)
    n = x[0].numel() // groups
    big = x.double().reshape(x.shape[0], groups, -1).abs().amax(-1)
    u = UNIT_ROUNDOFF[torch.float32]
    assert ((got[..., 0] - want[..., 0]).abs() <= (n + 2) * u * big).all()
    assert ((got[..., 1] - want[..., 1]).abs() <= 4 * (n + 2) * u * big**2).all()


@given(patched_tensors(even=True), st.data(), LOW_PRECISION)
def test_normalizing_with_the_global_statistics_is_groupnorm_of_the_whole(case, data, dtype):
    """A patch normalised with the whole tensor's statistics equals GroupNorm of the whole, up to
    rounding the output to `dtype` and float32 arithmetic on terms as large as |x * scale| and
    |shift| (derived bound, per element)."""
    x, groups, rows = case
    gn = torch.nn.GroupNorm(groups, x.shape[1], eps=data.draw(st.sampled_from([1e-5, 1e-6])))
    with torch.no_grad():
        gn.weight.normal_(generator=torch.Generator().manual_seed(1))
        gn.bias.normal_(generator=torch.Generator().manual_seed(2))
    gn = gn.to(dtype)
    x = x.to(dtype).double()  # the tensor the model holds, rounded to its dtype
    own = data.draw(st.integers(0, len(rows) - 1))
    patch = x.split(rows, dim=2)[own]
    stats = exact(x, groups)
    got = normalize(patch.to(dtype), stats.float(), gn)
    assert got.dtype == dtype
    b, c = x.shape[:2]
    mean, var = (stats[..., i].repeat_interleave(c // groups, 1).view(b, c, 1, 1) for i in (0, 1))
    weight, bias = (p.double().view(1, c, 1, 1) for p in (gn.weight, gn.bias))
    scale = weight / (var + gn.eps).sqrt()
    want = ((x - mean) * scale + bias).split(rows, dim=2)[own]
    terms = (x * scale).abs() + (mean * scale).abs() + bias.abs()
    terms = terms.split(rows, dim=2)[own]
    bound = UNIT_ROUNDOFF[dtype] * want.abs() + 8 * UNIT_ROUNDOFF[torch.float32] * terms * (1 + UNIT_ROUNDOFF[dtype])
    assert ((got.double() - want).abs() <= bound + 1e-300).all()


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
