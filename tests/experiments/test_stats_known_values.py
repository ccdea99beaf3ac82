"""registry/stats.py against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from registry import stats


@pytest.mark.parametrize(
    ("b", "c", "expected"),
    [
        # 2 * P(X <= 1), X ~ Bin(8, 1/2) = 2 * (1 + 8) / 256
        (7, 1, 18 / 256),
        (1, 7, 18 / 256),
        # 2 * P(X <= 0), X ~ Bin(5, 1/2) = 2 / 32
        (5, 0, 2 / 32),
        # 2 * P(X <= 2), X ~ Bin(10, 1/2) = 2 * (1 + 10 + 45) / 1024
        (8, 2, 112 / 1024),
        # a tie is as far from significant as it gets
        (3, 3, 1.0),
        (0, 0, 1.0),
    ],
)
def test_exact_mcnemar_is_the_two_sided_binomial_test(b: int, c: int, expected: float) -> None:
    assert stats.mcnemar_exact(b, c) == pytest.approx(expected, abs=1e-12)
    assert stats.mcnemar(b, c) == (pytest.approx(expected, abs=1e-12), "mcnemar-exact")


def test_mcnemar_chi_square_with_continuity_correction() -> None:
    # (|30 - 10| - 1)^2 / 40 = 9.025; P(chi2_1 > 9.025) = erfc(sqrt(9.025 / 2))
    assert stats.mcnemar_chi2(30, 10) == pytest.approx(math.erfc(math.sqrt(9.025 / 2)), rel=1e-12)
    assert stats.mcnemar_chi2(30, 10) == pytest.approx(0.002663, abs=1e-6)
    # Many discordant pairs: the corrected chi-square takes over, and agrees with the exact test closely.
    p, test = stats.mcnemar(700, 620)
    assert test == "mcnemar-chi2"
    assert p == pytest.approx(stats.mcnemar_exact(700, 620), rel=0.02)


def test_exact_permutation_test_on_a_small_table() -> None:
    # Differences +1, +1, +1, -1: of the 16 sign patterns, |sum| >= 2 for 1 + 4 + 4 + 1 = 10.
    p, test = stats.permutation_test([1, 1, 1, -1, 0, 0])
    assert test == "permutation-exact"
    assert p == pytest.approx(10 / 16)
    # On 0/1 data the sign-flip test is the exact McNemar test (b = 3, c = 1).
    assert p == pytest.approx(stats.mcnemar_exact(3, 1))
    # Differences 2, 1, 3: only all-plus and all-minus reach |sum| = 6, so p = 2 / 8.
    assert stats.permutation_test([2, 1, 3])[0] == pytest.approx(0.25)
    # Differences 2, -1, 3 (sum 4), by hand:
    # sums over the 8 sign patterns: 4, 6, -2, 0, 0, 2, -6, -4 -> |s| >= 4 for 4 of 8.
    assert stats.permutation_test([2, -1, 3])[0] == pytest.approx(0.5)
    assert stats.permutation_test([0, 0]) == (1.0, "permutation-exact")


def test_monte_carlo_permutation_test_is_seeded_and_close_to_exact() -> None:
    diffs = [1] * 14 + [-1] * 6  # 20 non-zero differences: beyond exact enumeration
    p1, test = stats.permutation_test(diffs, resamples=20_000, seed=3)
    p2, _ = stats.permutation_test(diffs, resamples=20_000, seed=3)
    assert test == "permutation-monte-carlo" and p1 == p2
    assert p1 == pytest.approx(stats.mcnemar_exact(14, 6), abs=0.01)  # 0.1153


def test_bootstrap_interval_known_cases() -> None:
    # Two items with differences 0 and 1: resampled means are 0, 1/2, 1 with chances 1/4, 1/2, 1/4, so the
    # 2.5 % and 97.5 % points are 0 and 1.
    assert stats.bootstrap_ci([0, 1], seed=1) == (0.0, 1.0)
    # Every difference equal: the interval is that value.
    assert stats.bootstrap_ci([0.25] * 7) == (0.25, 0.25)
    # Seeded: the same data and seed give the same interval; another seed a slightly different one.
    data = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1]
    assert stats.bootstrap_ci(data, seed=5) == stats.bootstrap_ci(data, seed=5)


def test_bootstrap_interval_matches_the_normal_approximation_for_many_items() -> None:
    rng = np.random.default_rng(0)
    d = rng.choice([-1.0, 0.0, 1.0], p=[0.2, 0.5, 0.3], size=2000)
    low, high = stats.bootstrap_ci(d, resamples=20_000, seed=0)
    half = 1.959964 * d.std(ddof=0) / math.sqrt(len(d))
    assert low == pytest.approx(d.mean() - half, abs=0.004)
    assert high == pytest.approx(d.mean() + half, abs=0.004)


def test_wilson_interval_known_value() -> None:
    # 8 of 10 at 95 %: the textbook Wilson interval is [0.4902, 0.9433].
    low, high = stats.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert stats.normal_quantile(0.975) == pytest.approx(1.959964, abs=1e-6)


def test_compare_paired_uses_mcnemar_for_binary_values() -> None:
    a = [0] * 7 + [1] * 1 + [1] * 5 + [0] * 7
    b = [1] * 7 + [0] * 1 + [1] * 5 + [0] * 7
    c = stats.compare_paired(a, b, seed=0)
    assert (c.items, c.wins, c.losses, c.test) == (20, 7, 1, "mcnemar-exact")
    assert c.delta == pytest.approx(6 / 20)
    assert c.p_value == pytest.approx(18 / 256)
    assert not c.significant()  # 0.07 > 0.05
    assert c.ci_low is not None and c.ci_high is not None and c.ci_low <= 0.3 <= c.ci_high
    scores = stats.compare_paired([0.5, 0.2, 0.1], [0.7, 0.3, 0.4])
    assert scores.test == "permutation-exact" and scores.p_value == pytest.approx(0.25)
    with pytest.raises(ValueError, match="equal lengths"):
        stats.compare_paired([1, 0], [1])


def test_pareto_front() -> None:
    points: list[dict[str, float | None]] = [
        {"safety": 0.9, "helpfulness": 0.6, "cost": 2.0},  # front
        {"safety": 0.5, "helpfulness": 0.9, "cost": 1.0},  # front
        {"safety": 0.5, "helpfulness": 0.8, "cost": 1.0},  # beaten by the one above
        {"safety": 0.9, "helpfulness": 0.6, "cost": 3.0},  # beaten by the first (dearer)
        {"safety": 0.95, "helpfulness": None, "cost": 0.1},  # cannot be compared
    ]
    assert stats.pareto_front(points, maximise=["safety", "helpfulness"], minimise=["cost"]) == [0, 1]
