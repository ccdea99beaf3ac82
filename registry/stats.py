"""Paired statistics for comparing two evaluation runs item by item. Plain Python and numpy, no Django.

Two runs on the same dataset give two values per item (1/0 correct, refused or not); the comparison works on the
per-item differences, so the item-to-item variation that both runs share cancels out:

* `bootstrap_ci`       percentile bootstrap interval of the mean difference (seeded: the same data gives the
                       same interval);
* `mcnemar`            exact binomial McNemar test on the discordant pairs of 0/1 values (a continuity-corrected
                       chi-square only once there are too many discordant pairs for the exact sum to matter);
* `permutation_test`   paired sign-flip permutation test for any values: exact enumeration for few non-zero
                       differences, a seeded Monte Carlo estimate otherwise;
* `wilson_interval`    the interval of a single proportion (a refusal rate, an accuracy);
* `pareto_front`       the points no other point beats on every objective.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 10_000
EXACT_MCNEMAR_MAX = 1_000  # discordant pairs; beyond, the corrected chi-square agrees to many decimals
EXACT_PERMUTATION_MAX = 16  # non-zero differences; 2**16 sign patterns are enumerated


def _as_array(values: Sequence[float] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=float).reshape(-1)


def is_binary(values: Sequence[float] | np.ndarray) -> bool:
    arr = _as_array(values)
    return bool(np.all((arr == 0) | (arr == 1)))


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (for paired data: of the per-item differences)."""
    if not 0 < confidence < 1:
        raise ValueError("confidence must be between 0 and 1")
    x = _as_array(values)
    n = len(x)
    if n == 0:
        return (math.nan, math.nan)
    if np.all(x == x[0]):
        return (float(x[0]), float(x[0]))
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    block = max(1, 2_000_000 // n)  # bounds the index matrix at about 16 MB
    for start in range(0, resamples, block):
        stop = min(resamples, start + block)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = x[idx].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return (float(low), float(high))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of b successes in b + c trials at p = 1/2."""
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be >= 0")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def mcnemar_chi2(b: int, c: int) -> float:
    """McNemar's chi-square with the continuity correction, one degree of freedom."""
    n = b + c
    if n == 0:
        return 1.0
    stat = max(abs(b - c) - 1, 0) ** 2 / n
    return float(math.erfc(math.sqrt(stat / 2)))


def mcnemar(b: int, c: int) -> tuple[float, str]:
    """(p-value, name of the test): exact for up to EXACT_MCNEMAR_MAX discordant pairs."""
    if b + c <= EXACT_MCNEMAR_MAX:
        return mcnemar_exact(b, c), "mcnemar-exact"
    return mcnemar_chi2(b, c), "mcnemar-chi2"


def permutation_test(
    differences: Sequence[float] | np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, str]:
    """Two-sided paired permutation (sign-flip) test of mean difference 0; returns (p-value, name of the test).

    Under the null hypothesis each pair's two values are exchangeable, so each difference's sign is a coin flip.
    The statistic is |sum of differences|; zero differences do not change it and are left out.
    """
    d = _as_array(differences)
    d = d[d != 0]
    m = len(d)
    if m == 0:
        return 1.0, "permutation-exact"
    observed = abs(d.sum())
    tolerance = 1e-9 * max(1.0, observed)
    if m <= EXACT_PERMUTATION_MAX:
        patterns = (np.arange(2**m)[:, None] >> np.arange(m)) & 1
        sums = np.abs((patterns * 2 - 1) @ d)
        return float(np.mean(sums >= observed - tolerance)), "permutation-exact"
    rng = np.random.default_rng(seed)
    hits = 0
    block = max(1, 2_000_000 // m)
    for start in range(0, resamples, block):
        size = min(resamples, start + block) - start
        signs = rng.integers(0, 2, size=(size, m)) * 2 - 1
        hits += int(np.sum(np.abs(signs @ d) >= observed - tolerance))
    # Counting the observed arrangement itself keeps the estimate a valid p-value (never 0).
    return (hits + 1) / (resamples + 1), "permutation-monte-carlo"


def wilson_interval(successes: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion."""
    if n == 0:
        return (math.nan, math.nan)
    z = normal_quantile(1 - (1 - confidence) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def normal_quantile(q: float) -> float:
    """Inverse of the standard normal distribution function (bisection on erfc; plenty for intervals)."""
    if not 0 < q < 1:
        raise ValueError("q must be between 0 and 1")
    low, high = -40.0, 40.0
    for _ in range(200):
        mid = (low + high) / 2
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < q:
            low = mid
        else:
            high = mid
    return (low + high) / 2


@dataclass(frozen=True)
class PairedComparison:
    """B against A on the same items: mean difference (B - A), its interval and a test of 'no difference'."""

    items: int
    mean_a: float | None
    mean_b: float | None
    delta: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    test: str
    wins: int  # items where B is higher
    losses: int  # items where B is lower
    confidence: float

    def significant(self, alpha: float | None = None) -> bool:
        alpha = 1 - self.confidence if alpha is None else alpha
        return self.p_value is not None and self.p_value < alpha

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["significant"] = self.significant()
        return out


def compare_paired(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> PairedComparison:
    """Paired comparison of two equally long value lists (item i of `a` belongs with item i of `b`)."""
    x, y = _as_array(a), _as_array(b)
    if len(x) != len(y):
        raise ValueError(f"paired values need equal lengths, got {len(x)} and {len(y)}")
    n = len(x)
    if n == 0:
        return PairedComparison(0, None, None, None, None, None, None, "none", 0, 0, confidence)
    d = y - x
    low, high = bootstrap_ci(d, confidence=confidence, resamples=resamples, seed=seed)
    wins, losses = int(np.sum(d > 0)), int(np.sum(d < 0))
    if is_binary(x) and is_binary(y):
        p, test = mcnemar(wins, losses)
    else:
        p, test = permutation_test(d, resamples=resamples, seed=seed)
    return PairedComparison(
        items=n,
        mean_a=float(x.mean()),
        mean_b=float(y.mean()),
        delta=float(d.mean()),
        ci_low=low,
        ci_high=high,
        p_value=p,
        test=test,
        wins=wins,
        losses=losses,
        confidence=confidence,
    )


def pareto_front(
    points: Sequence[Mapping[str, float | None]], *, maximise: Sequence[str] = (), minimise: Sequence[str] = ()
) -> list[int]:
    """Indices of the points that no other point dominates (at least as good everywhere, better somewhere).

    A point missing an objective (None) cannot be compared on it and is left out.
    """
    keys = [(k, 1.0) for k in maximise] + [(k, -1.0) for k in minimise]
    usable = [i for i, p in enumerate(points) if all(p.get(k) is not None for k, _ in keys)]

    def vector(i: int) -> list[float]:
        return [sign * float(points[i][k]) for k, sign in keys]  # type: ignore[arg-type]

    front = []
    for i in usable:
        vi = vector(i)
        dominated = False
        for j in usable:
            if j == i:
                continue
            vj = vector(j)
            if all(a >= b for a, b in zip(vj, vi, strict=True)) and any(a > b for a, b in zip(vj, vi, strict=True)):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return front
