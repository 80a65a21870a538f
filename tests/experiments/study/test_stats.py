"""The two-sample statistics against values derived independently in this file: closed
forms, Simpson integration of the densities, brute-force enumeration and simulation."""

from __future__ import annotations

import math
import statistics
from fractions import Fraction
from itertools import combinations

import numpy as np
import pytest

from kldwrm.experiments.study.stats import (
    betainc,
    bootstrap_diff_ci,
    brown_forsythe,
    compare,
    f_cdf,
    f_sf,
    f_test,
    permutation_test,
    t_cdf,
    t_two_sided_p,
    welch_t_test,
)

# --------------------------------------------------------------------------- helpers


def simpson(f, lo: float, hi: float, n: int = 20_000) -> float:
    """Composite Simpson rule with ``n`` (even) intervals."""
    x = np.linspace(lo, hi, n + 1)
    y = f(x)
    return float((hi - lo) / n / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum()))


def t_pdf(df: float):
    """Student-t density ``Γ((ν+1)/2) / (√(νπ) Γ(ν/2)) (1 + x²/ν)^(−(ν+1)/2)``."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return lambda x: np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))


def t_two_sided_by_simpson(t: float, df: float) -> float:
    """``P(|T| ≥ |t|) = 1 − 2 ∫_0^|t| pdf``."""
    return 1.0 - 2.0 * simpson(t_pdf(df), 0.0, abs(t))


def f_pdf(d1: float, d2: float):
    """F density ``(d1/d2)^(d1/2) x^(d1/2−1) (1 + d1 x/d2)^(−(d1+d2)/2) / B(d1/2, d2/2)``."""
    log_b = math.lgamma(d1 / 2) + math.lgamma(d2 / 2) - math.lgamma((d1 + d2) / 2)

    def pdf(x):
        with np.errstate(divide="ignore"):
            log = (d1 / 2 * math.log(d1 / d2) + (d1 / 2 - 1) * np.log(x)
                   - (d1 + d2) / 2 * np.log1p(d1 * x / d2) - log_b)
        return np.where(x > 0, np.exp(log), 0.0)

    return pdf


def binomial_tail(a: int, b: int, x: float) -> float:
    """``I_x(a, b) = Σ_{j=a}^{a+b−1} C(a+b−1, j) x^j (1−x)^(a+b−1−j)`` for integer a, b."""
    n = a + b - 1
    return math.fsum(math.comb(n, j) * x**j * (1 - x) ** (n - j) for j in range(a, n + 1))


def brute_permutation_p(a, b) -> float:
    """Exact two-sided permutation p by enumerating every split, in exact arithmetic."""
    pooled = [Fraction(v) for v in (*a, *b)]
    nb = len(b)

    def abs_diff(idx_b):
        xb = [pooled[i] for i in idx_b]
        xa = [pooled[i] for i in range(len(pooled)) if i not in idx_b]
        return abs(sum(xb) / len(xb) - sum(xa) / len(xa))

    observed = abs_diff(tuple(range(len(a), len(pooled))))
    splits = list(combinations(range(len(pooled)), nb))
    return sum(abs_diff(s) >= observed for s in splits) / len(splits)


def rejection_rate(test, draw, reps: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    return sum(test(*draw(rng)) < 0.05 for _ in range(reps)) / reps


# --------------------------------------------------------------------------- distributions


@pytest.mark.parametrize("x", [0.0, 1e-6, 0.1, 0.37, 0.5, 0.8, 0.999, 1.0])
def test_betainc_closed_forms(x):
    assert betainc(1, 1, x) == pytest.approx(x, abs=1e-14)
    assert betainc(3.5, 1, x) == pytest.approx(x**3.5, rel=1e-12, abs=1e-300)
    assert betainc(1, 2.5, x) == pytest.approx(1 - (1 - x) ** 2.5, rel=1e-12, abs=1e-15)
    # arcsine law: I_x(1/2, 1/2) = (2/π) asin(√x)
    assert betainc(0.5, 0.5, x) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)), abs=1e-13)


@pytest.mark.parametrize(("a", "b"), [(2, 3), (5, 1), (7, 9), (50, 60), (3, 200)])
@pytest.mark.parametrize("x", [0.01, 0.2, 0.45, 0.7, 0.95])
def test_betainc_integer_parameters_equal_binomial_tails(a, b, x):
    assert betainc(a, b, x) == pytest.approx(binomial_tail(a, b, x), rel=1e-10, abs=1e-300)
    # reflection I_x(a, b) = 1 − I_(1−x)(b, a)
    assert betainc(a, b, x) + betainc(b, a, 1 - x) == pytest.approx(1.0, abs=1e-13)


@pytest.mark.parametrize(("a", "b", "x"), [(2.5, 3.7, 0.3), (1.5, 1.5, 0.8), (4.2, 1.3, 0.65)])
def test_betainc_equals_integrated_density(a, b, x):
    beta = math.exp(math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))

    def integrand(v):  # u = v² turns u^(a−1) (1−u)^(b−1) du into a smooth integrand
        return 2 * v ** (2 * a - 1) * (1 - v * v) ** (b - 1) / beta

    assert betainc(a, b, x) == pytest.approx(simpson(integrand, 0.0, math.sqrt(x)), abs=1e-10)


def test_betainc_rejects_bad_arguments():
    for args in ((0, 1, 0.5), (1, -2, 0.5), (1, 1, 1.5), (1, 1, -0.1)):
        with pytest.raises(ValueError):
            betainc(*args)
    assert math.isnan(betainc(1, 1, math.nan))


@pytest.mark.parametrize("t", [-30.0, -2.5, -0.3, 0.0, 0.7, 1.0, 4.0, 100.0])
def test_t_cdf_one_and_two_degrees_of_freedom(t):
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)


def test_t_tails_have_no_cancellation():
    for t in (1e3, 1e6):
        # Cauchy: P(|T| ≥ t) = 1 − 2 atan(t)/π = 2 atan(1/t)/π
        assert t_two_sided_p(t, 1) == pytest.approx(2 * math.atan(1 / t) / math.pi, rel=1e-10)
        # ν = 2: 1 − t/√(2+t²) = 2 / (√(2+t²) (√(2+t²) + t))
        r = math.sqrt(2 + t * t)
        assert t_two_sided_p(-t, 2) == pytest.approx(2 / (r * (r + t)), rel=1e-10)
    assert t_two_sided_p(math.inf, 5) == 0.0 and t_cdf(math.inf, 5) == 1.0
    assert t_cdf(-math.inf, 5) == 0.0


@pytest.mark.parametrize(("t", "df"), [(0.4, 5), (2.1, 5), (1.7, 7.3), (3.2, 16.158), (2.0, 60)])
def test_t_against_integrated_density(t, df):
    assert t_two_sided_p(t, df) == pytest.approx(t_two_sided_by_simpson(t, df), abs=1e-10)
    assert t_cdf(t, df) + t_cdf(-t, df) == pytest.approx(1.0, abs=1e-14)


def test_t_approaches_the_normal():
    for t in (-1.96, 0.5, 2.3):
        assert t_cdf(t, 1e8) == pytest.approx(statistics.NormalDist().cdf(t), abs=1e-7)


@pytest.mark.parametrize("f", [0.01, 0.3, 1.0, 2.7, 40.0])
@pytest.mark.parametrize("d", [1, 3.5, 12])
def test_f_closed_forms(f, d):
    # F(2, d2): 1 − (1 + 2f/d2)^(−d2/2);  F(d1, 2): (d1 f / (d1 f + 2))^(d1/2)
    assert f_cdf(f, 2, d) == pytest.approx(1 - (1 + 2 * f / d) ** (-d / 2), abs=1e-13)
    assert f_cdf(f, d, 2) == pytest.approx((d * f / (d * f + 2)) ** (d / 2), abs=1e-13)
    # reciprocal: P(F_(d1,d2) ≤ f) = P(F_(d2,d1) ≥ 1/f), and cdf + sf = 1
    assert f_cdf(f, d, 7) == pytest.approx(f_sf(1 / f, 7, d), abs=1e-13)
    assert f_cdf(f, d, 7) + f_sf(f, d, 7) == pytest.approx(1.0, abs=1e-13)
    # F(1, 1) is the square of a Cauchy variable: P(F ≤ f) = (2/π) atan(√f)
    assert f_cdf(f, 1, 1) == pytest.approx(2 / math.pi * math.atan(math.sqrt(f)), abs=1e-13)


@pytest.mark.parametrize(("f", "d1", "d2"), [(0.6, 3, 7.5), (1.9, 4, 9), (3.3, 9, 9)])
def test_f_against_integrated_density(f, d1, d2):
    assert f_cdf(f, d1, d2) == pytest.approx(simpson(f_pdf(d1, d2), 0.0, f, 200_000), abs=1e-7)


def test_f_edges_and_tail():
    assert f_cdf(0.0, 3, 4) == 0.0 and f_sf(0.0, 3, 4) == 1.0
    assert f_cdf(math.inf, 3, 4) == 1.0 and f_sf(math.inf, 3, 4) == 0.0
    # F(2, 2): P(F > f) = 1/(1 + f), tiny for a large f without cancellation
    assert f_sf(1e9, 2, 2) == pytest.approx(1 / (1 + 1e9), rel=1e-10)


# --------------------------------------------------------------------------- difference of means

A = [0.962, 0.981, 0.975, 0.930, 0.984, 0.979, 0.968, 0.985, 0.955, 0.977]
B = [0.978, 0.982, 0.976, 0.983, 0.971, 0.980, 0.985, 0.979, 0.974, 0.981]


def test_welch_by_hand():
    va, vb = statistics.variance(A) / len(A), statistics.variance(B) / len(B)
    t = (statistics.fmean(B) - statistics.fmean(A)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(A) - 1) + vb**2 / (len(B) - 1))
    w = welch_t_test(A, B)
    assert w.diff == pytest.approx(statistics.fmean(B) - statistics.fmean(A), rel=1e-12)
    assert (w.t, w.df) == pytest.approx((t, df), rel=1e-12)
    assert w.p == pytest.approx(t_two_sided_by_simpson(t, df), abs=1e-9)


def test_welch_equal_variances_is_students_t():
    a = [1.0, 2.5, 3.0, 4.5, 2.0]
    b = [7.0 - v for v in a]  # same sample variance, mirrored
    n, sp2 = len(a), statistics.variance(a)
    student_t = (statistics.fmean(b) - statistics.fmean(a)) / math.sqrt(sp2 * 2 / n)
    w = welch_t_test(a, b)
    assert w.df == pytest.approx(2 * n - 2) and w.t == pytest.approx(student_t)


def test_welch_invariances_and_degenerate():
    w = welch_t_test(A, B)
    swapped = welch_t_test(B, A)
    assert (swapped.t, swapped.diff) == pytest.approx((-w.t, -w.diff)) and swapped.p == w.p
    shifted = welch_t_test([v + 3 for v in A], [v + 3 for v in B])
    assert shifted.p == pytest.approx(w.p, rel=1e-8)
    assert math.isnan(welch_t_test([1, 1], [2, 2]).p)
    with pytest.raises(ValueError):
        welch_t_test([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        welch_t_test([1.0, math.nan], [1.0, 2.0])


def test_welch_level_under_the_null():
    def draw(rng):
        return rng.normal(0, 1, 6), rng.normal(0, 3, 9)

    rate = rejection_rate(lambda a, b: welch_t_test(a, b).p, draw, 4000, 1)
    assert 0.035 <= rate <= 0.065  # 5% ± 4 binomial SE


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([1.2, 3.4, 0.5], [2.2, 5.1, 4.4, 3.3]),
        ([1, 2, 2, 3], [2, 3, 3]),  # ties
        ([0.25, 0.2, 0.3], [0.28, 0.18]),
        ([5, 1, 4, 4, 2, 7], [3, 8, 6, 9, 6]),
    ],
)
def test_permutation_equals_brute_force(a, b):
    res = permutation_test(a, b)
    assert res.exact and res.relabelings == math.comb(len(a) + len(b), len(b))
    assert res.p == pytest.approx(brute_permutation_p(a, b), abs=1e-15)


def test_permutation_fully_separated_groups():
    # of the C(6, 3) = 20 splits only the observed one and its mirror reach |Δ| = 10
    res = permutation_test([0, 1, 2], [10, 11, 12])
    assert res.p == pytest.approx(2 / 20) and res.diff == 10


def test_permutation_invariances():
    p = permutation_test(A, B).p
    assert permutation_test(B, A).p == p
    assert permutation_test([v + 100 for v in A], [v + 100 for v in B]).p == pytest.approx(p)
    assert permutation_test([7 * v for v in A], [7 * v for v in B]).p == pytest.approx(p)


def test_permutation_monte_carlo_agrees_with_exact():
    a, b = A[:7], B[:8]
    exact = permutation_test(a, b)
    mc = permutation_test(a, b, max_exact=0, resamples=20_000, seed=3)
    assert not mc.exact and mc.relabelings == 20_000
    se = math.sqrt(exact.p * (1 - exact.p) / 20_000)
    assert abs(mc.p - exact.p) < 4 * se + 1 / 20_001
    assert mc == permutation_test(a, b, max_exact=0, resamples=20_000, seed=3)
    # the Monte-Carlo p-value never reaches 0: (1 + hits) / (1 + R)
    sep = permutation_test([0] * 5, [1] * 5, max_exact=0, resamples=999, seed=0)
    assert sep.p >= 1 / 1000


def test_bootstrap_two_values_per_group_reaches_the_extremes():
    # with two values per group, each extreme mean has probability 1/4, so the extreme
    # difference has mass 1/16 > 2.5%: the percentile limits are min(B)−max(A), max(B)−min(A)
    a, b = [1.0, 3.0], [2.0, 7.0]
    ci = bootstrap_diff_ci(a, b, resamples=20_000, seed=5)
    assert (ci.low, ci.high) == pytest.approx((2.0 - 3.0, 7.0 - 1.0))
    assert ci.diff == pytest.approx(2.5) and ci.method == "percentile"


def test_bootstrap_large_samples_match_the_normal_interval():
    rng = np.random.default_rng(11)
    a, b = rng.normal(0, 1, 400), rng.normal(0.3, 2, 400)
    se = math.sqrt(np.var(a) / a.size + np.var(b) / b.size)  # bootstrap SE uses ddof=0
    z = statistics.NormalDist().inv_cdf(0.975)
    ci = bootstrap_diff_ci(a, b, resamples=20_000, seed=2)
    diff = b.mean() - a.mean()
    assert ci.low == pytest.approx(diff - z * se, abs=0.05 * z * se)
    assert ci.high == pytest.approx(diff + z * se, abs=0.05 * z * se)


def test_bootstrap_coverage():
    rng = np.random.default_rng(4)
    hits = 0
    for i in range(400):
        a, b = rng.normal(0, 1, 10), rng.normal(0.5, 1.5, 10)
        ci = bootstrap_diff_ci(a, b, resamples=2000, seed=i)
        hits += ci.low <= 0.5 <= ci.high
    assert 0.88 <= hits / 400 <= 0.98  # percentile intervals under-cover a little at n = 10


def test_bootstrap_reproducible_and_equivariant():
    ci = bootstrap_diff_ci(A, B, seed=9)
    assert ci == bootstrap_diff_ci(A, B, seed=9)
    shifted = bootstrap_diff_ci(A, [v + 0.5 for v in B], seed=9)
    assert (shifted.low, shifted.high) == pytest.approx((ci.low + 0.5, ci.high + 0.5))
    swapped = bootstrap_diff_ci(B, A, resamples=40_000, seed=1)
    width = ci.high - ci.low
    assert swapped.low == pytest.approx(-ci.high, abs=0.05 * width)
    assert swapped.high == pytest.approx(-ci.low, abs=0.05 * width)
    narrow = bootstrap_diff_ci(A, B, level=0.5, seed=9)
    assert ci.low < narrow.low < narrow.high < ci.high
    with pytest.raises(ValueError):
        bootstrap_diff_ci(A, B, level=1.0)


# --------------------------------------------------------------------------- variances


def test_f_test_by_hand():
    ratio = statistics.variance(B) / statistics.variance(A)
    res = f_test(A, B)
    assert res.ratio == pytest.approx(ratio, rel=1e-12) and (res.df1, res.df2) == (9, 9)
    cdf = simpson(f_pdf(9, 9), 0.0, ratio, 200_000)
    assert res.p == pytest.approx(2 * min(cdf, 1 - cdf), abs=1e-7)


def test_f_test_invariances_and_degenerate():
    res = f_test(A, B[:6])
    swapped = f_test(B[:6], A)
    assert swapped.ratio == pytest.approx(1 / res.ratio) and swapped.p == pytest.approx(res.p)
    assert f_test([3 * v for v in A], [3 * v for v in B[:6]]).p == pytest.approx(res.p)
    assert f_test(A, [2 * v for v in B[:6]]).ratio == pytest.approx(4 * res.ratio)
    assert math.isnan(f_test([1.0, 1.0], [2.0, 2.0]).ratio)  # 0 / 0
    zero = f_test([1.0, 1.0], [1.0, 3.0])
    assert zero.ratio == math.inf and math.isnan(zero.p)


def test_f_test_level_under_the_null():
    def draw(rng):
        return rng.normal(0, 2, 10), rng.normal(5, 2, 7)

    assert 0.035 <= rejection_rate(lambda a, b: f_test(a, b).p, draw, 4000, 2) <= 0.065


def test_brown_forsythe_is_pooled_t_on_median_deviations():
    za = [abs(v - statistics.median(A)) for v in A]
    zb = [abs(v - statistics.median(B[:7])) for v in B[:7]]
    na, nb = len(za), len(zb)
    sp2 = ((na - 1) * statistics.variance(za) + (nb - 1) * statistics.variance(zb)) / (na + nb - 2)
    t = (statistics.fmean(zb) - statistics.fmean(za)) / math.sqrt(sp2 * (1 / na + 1 / nb))
    res = brown_forsythe(A, B[:7])
    assert res.statistic == pytest.approx(t * t, rel=1e-10)
    assert (res.df1, res.df2) == (1, na + nb - 2)
    assert res.p == pytest.approx(t_two_sided_by_simpson(t, na + nb - 2), abs=1e-9)


def test_brown_forsythe_invariances_and_degenerate():
    p = brown_forsythe(A, B).p
    assert brown_forsythe(B, A).p == pytest.approx(p)
    assert brown_forsythe(A, [v + 10 for v in B]).p == pytest.approx(p, rel=1e-6)
    assert brown_forsythe([5 * v for v in A], [5 * v for v in B]).p == pytest.approx(p)
    assert math.isnan(brown_forsythe([1.0, 3.0], [0.0, 4.0]).p)  # every |x − median| equal


def test_brown_forsythe_level_under_the_null():
    def draw(rng):
        return rng.normal(0, 1, 10), rng.normal(0, 1, 10)

    rate = rejection_rate(lambda a, b: brown_forsythe(a, b).p, draw, 4000, 3)
    assert 0.02 <= rate <= 0.065  # Brown–Forsythe is slightly conservative


# --------------------------------------------------------------------------- everything


def test_compare_runs_every_test():
    c = compare(A, B, seed=4)
    assert (c.n_a, c.n_b) == (10, 10)
    assert c.mean_a == pytest.approx(statistics.fmean(A)) and c.sd_b == pytest.approx(
        statistics.stdev(B))
    assert c.diff == pytest.approx(c.welch.diff) and c.diff == pytest.approx(c.permutation.diff)
    assert c.welch == welch_t_test(A, B) and c.f == f_test(A, B)
    assert c.permutation == permutation_test(A, B, seed=4)
    assert c.bootstrap == bootstrap_diff_ci(A, B, seed=4)
    assert c.brown_forsythe == brown_forsythe(A, B)
    assert c.permutation.exact and c.permutation.relabelings == 184_756
    with pytest.raises(ValueError):
        compare([1.0], B)


def test_brute_force_helper_by_hand():
    """Pooled [0, 1, 1, 2], B = positions {2, 3} (|Δ| = 1): the six splits of B give
    {0,1}: 1, {0,2}: 1, {0,3}: 0, {1,2}: 0, {1,3}: 1, {2,3}: 1, so p = 4/6."""
    assert brute_permutation_p([0, 1], [1, 2]) == pytest.approx(4 / 6)
    assert permutation_test([0, 1], [1, 2]).p == pytest.approx(4 / 6)
