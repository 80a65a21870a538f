"""Two-sample statistics for the paper's claims, with numpy and the standard library only.

Every test compares a reference group ``a`` (``A``, e.g. K-FAC) with a group ``b`` (``B``,
e.g. KLD-WRM SO) and is reported in the direction ``B − A``:

* differences of means: :func:`welch_t_test` (normal theory, unequal variances),
  :func:`permutation_test` (distribution-free) and :func:`bootstrap_diff_ci` (percentile
  interval);
* ratio of variances ``s²_B / s²_A``: :func:`f_test` (normal theory) and
  :func:`brown_forsythe` (robust).

:func:`compare` runs all of them. All p-values are two-sided. The Student-t and F
distribution functions come from the regularized incomplete beta function
:func:`betainc`, evaluated by its continued fraction with the modified Lentz method.

Sample variances ``s²`` use ``ddof=1``: ``s² = Σ (x_i − x̄)² / (n − 1)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain, combinations

import numpy as np

__all__ = [
    "BootstrapCI",
    "BrownForsytheTest",
    "Comparison",
    "FTest",
    "PermutationTest",
    "WelchTest",
    "betainc",
    "bootstrap_diff_ci",
    "brown_forsythe",
    "compare",
    "f_cdf",
    "f_sf",
    "f_test",
    "permutation_test",
    "t_cdf",
    "t_two_sided_p",
    "welch_t_test",
]

_CF_EPS = 1e-15  # relative convergence of the continued fraction
_CF_TINY = 1e-300  # Lentz's guard against division by zero
_CF_MAX_ITER = 10_000
_CHUNK = 20_000  # Monte-Carlo relabelings per numpy batch


# --------------------------------------------------------------------------- distributions


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of ``I_x(a, b)`` (Numerical Recipes §6.4), by modified Lentz.

    ``I_x(a, b) = x^a (1−x)^b / (a B(a, b)) · 1/(1+ d_1/(1+ d_2/(1+ …)))`` with
    ``d_{2m+1} = −(a+m)(a+b+m) x / ((a+2m)(a+2m+1))`` and
    ``d_{2m} = m(b−m) x / ((a+2m−1)(a+2m))``; it converges fast for ``x < (a+1)/(a+b+2)``.
    """

    def guard(v: float) -> float:
        return _CF_TINY if abs(v) < _CF_TINY else v

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, _CF_MAX_ITER + 1):
        m2 = 2 * m
        for coef in (
            m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
            -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0)),
        ):
            d = 1.0 / guard(1.0 + coef * d)
            c = guard(1.0 + coef / c)
            h *= d * c
        if abs(d * c - 1.0) < _CF_EPS:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b) = B(x; a, b) / B(a, b)``.

    ``B(x; a, b) = ∫_0^x u^(a−1) (1−u)^(b−1) du`` and ``B(a, b) = Γ(a)Γ(b)/Γ(a+b)``. Uses the
    continued fraction for ``x < (a+1)/(a+b+2)`` and ``I_x(a, b) = 1 − I_(1−x)(b, a)``
    otherwise, so a small result is computed directly, without cancellation.

    Raises:
        ValueError: ``a`` or ``b`` not positive, or ``x`` outside ``[0, 1]``.
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a > 0 and b > 0, got a={a}, b={b}")
    if math.isnan(x):
        return math.nan
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student-t distribution function ``P(T ≤ t)`` with ``df > 0`` degrees of freedom.

    ``P(|T| > |t|) = I_(df/(df+t²))(df/2, 1/2)``; the CDF is half of that for ``t < 0`` and
    one minus half of it for ``t ≥ 0``. ``df`` need not be an integer (Welch).
    """
    if math.isnan(t):
        return math.nan
    tail = 0.5 * t_two_sided_p(t, df)
    return 1.0 - tail if t > 0 else tail


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value ``P(|T| ≥ |t|) = I_(df/(df+t²))(df/2, 1/2)`` of a t statistic."""
    if math.isnan(t) or math.isnan(df):
        return math.nan
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def f_cdf(f: float, d1: float, d2: float) -> float:
    """F distribution function ``P(F ≤ f) = I_(d1 f/(d1 f + d2))(d1/2, d2/2)`` (0 for f ≤ 0)."""
    if math.isnan(f):
        return math.nan
    if f <= 0.0:
        return 0.0
    if math.isinf(f):
        return 1.0
    return betainc(d1 / 2.0, d2 / 2.0, 1.0 / (1.0 + d2 / (d1 * f)))


def f_sf(f: float, d1: float, d2: float) -> float:
    """Upper tail ``P(F > f) = I_(d2/(d2 + d1 f))(d2/2, d1/2)``, computed directly (no
    ``1 − CDF`` cancellation)."""
    if math.isnan(f):
        return math.nan
    if f <= 0.0:
        return 1.0
    if math.isinf(f):
        return 0.0
    return betainc(d2 / 2.0, d1 / 2.0, 1.0 / (1.0 + d1 * f / d2))


# --------------------------------------------------------------------------- samples


def _sample(x: Sequence[float], name: str, min_n: int) -> np.ndarray:
    """``x`` as a 1-D float array of finite values with at least ``min_n`` of them."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1 or arr.size < min_n:
        raise ValueError(f"{name} needs a 1-D sample of at least {min_n} values, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite values")
    return arr


def _samples(
    a: Sequence[float], b: Sequence[float], min_n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Groups ``a`` and ``b`` checked by :func:`_sample`."""
    return _sample(a, "a", min_n), _sample(b, "b", min_n)


# --------------------------------------------------------------------------- difference of means


@dataclass(frozen=True)
class WelchTest:
    """Welch's unequal-variance t-test of ``mean(B) − mean(A)``.

    ``t = (x̄_B − x̄_A) / sqrt(s²_A/n_A + s²_B/n_B)``, Welch–Satterthwaite
    ``df = (v_A + v_B)² / (v_A²/(n_A−1) + v_B²/(n_B−1))`` with ``v = s²/n``, and
    ``p = P(|T_df| ≥ |t|)``. ``t``, ``df`` and ``p`` are NaN when both groups are constant.
    """

    diff: float
    t: float
    df: float
    p: float


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> WelchTest:
    """Welch's two-sided t-test of equal means (see :class:`WelchTest`); n ≥ 2 per group."""
    xa, xb = _samples(a, b, 2)
    va, vb = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size
    diff = float(xb.mean() - xa.mean())
    if va + vb == 0.0:
        return WelchTest(diff, math.nan, math.nan, math.nan)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (xa.size - 1) + vb**2 / (xb.size - 1))
    return WelchTest(diff, t, float(df), t_two_sided_p(t, float(df)))


@dataclass(frozen=True)
class PermutationTest:
    """Two-sided permutation test of ``mean(B) − mean(A)``.

    Statistic ``|x̄_B − x̄_A|`` over relabelings of the pooled sample into groups of sizes
    ``n_A`` and ``n_B``. Exact: ``p = #{splits with |d*| ≥ |d|} / C(n_A+n_B, n_B)``, the
    observed split included. Monte-Carlo (``exact`` false): ``p = (1 + #{|d*| ≥ |d|}) /
    (1 + R)`` over ``R`` seeded random relabelings, a valid p-value.
    """

    diff: float
    p: float
    relabelings: int
    exact: bool


@lru_cache(maxsize=4)
def _subsets(n: int, k: int) -> np.ndarray:
    """All ``k``-subsets of ``range(n)``, one per row (read-only, cached)."""
    count = math.comb(n, k)
    flat = np.fromiter(chain.from_iterable(combinations(range(n), k)), dtype=np.intp,
                       count=count * k)
    out = flat.reshape(count, k)
    out.setflags(write=False)
    return out


def _abs_mean_diffs(sums: np.ndarray, k: int, pooled: np.ndarray) -> np.ndarray:
    """``|mean(subset) − mean(rest)|`` of ``k``-subsets of ``pooled`` from their ``sums``."""
    n, total = pooled.size, pooled.sum()
    return np.abs(sums / k - (total - sums) / (n - k))


def _abs_diffs_exact(pooled: np.ndarray, k: int) -> np.ndarray:
    """``|mean(subset) − mean(rest)|`` for every ``k``-subset of ``pooled``."""
    return _abs_mean_diffs(pooled[_subsets(pooled.size, k)].sum(axis=1), k, pooled)


def _abs_diffs_random(pooled: np.ndarray, k: int, count: int, seed: int) -> np.ndarray:
    """``|mean(first k) − mean(rest)|`` for ``count`` seeded random permutations."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, count, _CHUNK):
        batch = rng.permuted(np.tile(pooled, (min(_CHUNK, count - start), 1)), axis=1)
        out.append(_abs_mean_diffs(batch[:, :k].sum(axis=1), k, pooled))
    return np.concatenate(out)


def permutation_test(
    a: Sequence[float],
    b: Sequence[float],
    *,
    max_exact: int = 200_000,
    resamples: int = 100_000,
    seed: int = 0,
) -> PermutationTest:
    """Permutation test of equal means (see :class:`PermutationTest`); n ≥ 1 per group.

    Exact when ``C(n_A+n_B, n_A) ≤ max_exact`` (10 vs 10 runs: 184 756 splits), else
    Monte-Carlo with ``resamples`` relabelings from ``numpy.random.default_rng(seed)``.
    Ties are counted with a tolerance of ``1e-9 · max|x|`` against rounding.
    """
    xa, xb = _samples(a, b, 1)
    pooled, k = np.concatenate([xa, xb]), min(xa.size, xb.size)
    diff = float(xb.mean() - xa.mean())
    threshold = abs(diff) - 1e-9 * float(np.abs(pooled).max())
    total = math.comb(pooled.size, k)
    if total <= max_exact:
        hits = int(np.count_nonzero(_abs_diffs_exact(pooled, k) >= threshold))
        return PermutationTest(diff, hits / total, total, True)
    hits = int(np.count_nonzero(_abs_diffs_random(pooled, k, resamples, seed) >= threshold))
    return PermutationTest(diff, (hits + 1) / (resamples + 1), resamples, False)


@dataclass(frozen=True)
class BootstrapCI:
    """Percentile bootstrap confidence interval for ``mean(B) − mean(A)``.

    Each of ``R`` resamples draws ``n_A`` values from ``A`` and ``n_B`` from ``B`` with
    replacement (groups resampled separately); ``[low, high]`` are the ``α/2`` and
    ``1 − α/2`` quantiles (numpy's linear interpolation) of the ``R`` differences, with
    ``α = 1 − level``. Percentile intervals under-cover for small samples.
    """

    diff: float
    low: float
    high: float
    level: float
    resamples: int
    method: str = "percentile"


def bootstrap_diff_ci(
    a: Sequence[float],
    b: Sequence[float],
    *,
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> BootstrapCI:
    """Percentile bootstrap CI (see :class:`BootstrapCI`), reproducible through ``seed``
    (``numpy.random.default_rng``); n ≥ 1 per group."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    xa, xb = _samples(a, b, 1)
    rng = np.random.default_rng(seed)
    ma = xa[rng.integers(0, xa.size, size=(resamples, xa.size))].mean(axis=1)
    mb = xb[rng.integers(0, xb.size, size=(resamples, xb.size))].mean(axis=1)
    low, high = np.quantile(mb - ma, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return BootstrapCI(float(xb.mean() - xa.mean()), float(low), float(high), level, resamples)


# --------------------------------------------------------------------------- variances


@dataclass(frozen=True)
class FTest:
    """Two-sided F-test of equal variances (assumes normal data).

    ``ratio = s²_B / s²_A ~ F(n_B − 1, n_A − 1)`` under equal variances;
    ``p = min(1, 2 · min(P(F ≤ ratio), P(F ≥ ratio)))``. NaN p when a variance is 0.
    """

    ratio: float
    df1: int
    df2: int
    p: float


def f_test(a: Sequence[float], b: Sequence[float]) -> FTest:
    """F-test of ``s²_B / s²_A = 1`` (see :class:`FTest`); n ≥ 2 per group."""
    xa, xb = _samples(a, b, 2)
    va, vb = float(xa.var(ddof=1)), float(xb.var(ddof=1))
    d1, d2 = xb.size - 1, xa.size - 1
    if va == 0.0 or vb == 0.0:
        ratio = math.nan if va == vb else (math.inf if va == 0.0 else 0.0)
        return FTest(ratio, d1, d2, math.nan)
    ratio = vb / va
    p = 2.0 * min(f_cdf(ratio, d1, d2), f_sf(ratio, d1, d2))
    return FTest(ratio, d1, d2, min(1.0, p))


@dataclass(frozen=True)
class BrownForsytheTest:
    """Brown–Forsythe test of equal spread: Levene's ANOVA on ``z = |x − median(group)|``.

    ``W = (N − k) Σ_g n_g (z̄_g − z̄)² / ((k − 1) Σ_g Σ_i (z_gi − z̄_g)²) ~ F(k − 1, N − k)``
    with ``k = 2`` groups and ``N = n_A + n_B``; for two groups ``W`` is the square of the
    pooled two-sample t statistic of the ``z``. ``p = P(F ≥ W)``; NaN when every ``z`` equals
    its group mean.
    """

    statistic: float
    df1: int
    df2: int
    p: float


def brown_forsythe(a: Sequence[float], b: Sequence[float]) -> BrownForsytheTest:
    """Brown–Forsythe test (see :class:`BrownForsytheTest`); n ≥ 2 per group."""
    groups = [np.abs(x - np.median(x)) for x in _samples(a, b, 2)]
    n = sum(z.size for z in groups)
    grand = float(np.concatenate(groups).mean())
    between = sum(z.size * (z.mean() - grand) ** 2 for z in groups)
    within = sum(float(((z - z.mean()) ** 2).sum()) for z in groups)
    if within == 0.0:
        return BrownForsytheTest(math.nan, 1, n - 2, math.nan)
    w = float((n - 2) * between / within)
    return BrownForsytheTest(w, 1, n - 2, f_sf(w, 1, n - 2))


# --------------------------------------------------------------------------- everything


@dataclass(frozen=True)
class Comparison:
    """All the tests of group ``B`` against reference group ``A`` (differences ``B − A``,
    variance ratio ``s²_B / s²_A``; SDs with ``ddof=1``)."""

    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    sd_a: float
    sd_b: float
    welch: WelchTest
    permutation: PermutationTest
    bootstrap: BootstrapCI
    f: FTest
    brown_forsythe: BrownForsytheTest

    @property
    def diff(self) -> float:
        """``mean(B) − mean(A)``."""
        return self.mean_b - self.mean_a


def compare(
    a: Sequence[float],
    b: Sequence[float],
    *,
    level: float = 0.95,
    boot_resamples: int = 10_000,
    perm_max_exact: int = 200_000,
    perm_resamples: int = 100_000,
    seed: int = 0,
) -> Comparison:
    """Run every test of this module on ``A = a`` and ``B = b`` (n ≥ 2 per group, finite).

    ``seed`` seeds the bootstrap and, when the permutation test is not exact, its
    Monte-Carlo relabelings, so the result is reproducible.
    """
    xa, xb = _samples(a, b, 2)
    return Comparison(
        n_a=xa.size,
        n_b=xb.size,
        mean_a=float(xa.mean()),
        mean_b=float(xb.mean()),
        sd_a=float(xa.std(ddof=1)),
        sd_b=float(xb.std(ddof=1)),
        welch=welch_t_test(xa, xb),
        permutation=permutation_test(xa, xb, max_exact=perm_max_exact,
                                     resamples=perm_resamples, seed=seed),
        bootstrap=bootstrap_diff_ci(xa, xb, level=level, resamples=boot_resamples, seed=seed),
        f=f_test(xa, xb),
        brown_forsythe=brown_forsythe(xa, xb),
    )
