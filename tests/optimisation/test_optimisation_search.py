"""The split and successive halving, on plain Python with a scripted scorer (no database, no model)."""

from __future__ import annotations

import pytest
from optimisation_helpers import coin

from registry.optimisation.search import (
    Arm,
    Budget,
    BudgetTooSmall,
    Cost,
    HalvingPlan,
    Rung,
    SplitError,
    run_search,
    split_keys,
)

KEYS = [f"item-{i:03d}" for i in range(200)]


def test_the_split_is_deterministic_disjoint_and_complete() -> None:
    split = split_keys(KEYS, holdout_fraction=0.3, seed=4, pool_size=8)
    again = split_keys(list(reversed(KEYS)), holdout_fraction=0.3, seed=4, pool_size=8)
    assert split == again  # the input order does not matter
    parts = [set(split.search), set(split.pool), set(split.holdout)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == set(KEYS)
    assert len(split.pool) == 8
    assert 40 <= len(split.holdout) <= 80  # 30 % of 200, give or take the hash's spread


def test_an_item_keeps_its_side_of_the_split_when_items_are_added() -> None:
    before = split_keys(KEYS[:120], holdout_fraction=0.5, seed=1)
    after = split_keys(KEYS, holdout_fraction=0.5, seed=1)
    assert set(before.holdout) <= set(after.holdout)
    assert set(before.search) <= set(after.search)


def test_another_seed_gives_another_split() -> None:
    assert (
        split_keys(KEYS, holdout_fraction=0.5, seed=1).holdout != split_keys(KEYS, holdout_fraction=0.5, seed=2).holdout
    )


@pytest.mark.parametrize(
    ("keys", "fraction", "message"),
    [
        (["only"], 0.5, "both need at least one"),
        (["a", "b", "a"], 0.5, "unique"),
        (KEYS, 1.0, "between 0 and 1"),
    ],
)
def test_a_split_that_cannot_work_is_refused(keys: list[str], fraction: float, message: str) -> None:
    with pytest.raises(SplitError, match=message):
        split_keys(keys, holdout_fraction=fraction, seed=0)


def scripted_evaluate(p: dict[int, float], tokens: dict[int, int] | None = None):  # type: ignore[no-untyped-def]
    """Arm a answers key k correctly when coin(k) < p[a]: better arms are right wherever worse ones are, and more."""

    def evaluate(rung: Rung, keys: list[str]) -> dict[int, dict[str, tuple[float, int]]]:
        return {
            arm: {k: (1.0 if coin(k) < p[arm] else 0.0, (tokens or {}).get(arm, 10)) for k in keys} for arm in rung.arms
        }

    return evaluate


@pytest.mark.parametrize("best", [1, 4, 7, 11])
def test_successive_halving_finds_the_known_best_candidate_within_budget(best: int) -> None:
    p = {arm: 0.3 + 0.01 * arm for arm in range(12)}
    p[best] = 0.8
    plan = HalvingPlan(keys=tuple(KEYS[:64]), eta=2, first_items=8, budget=Budget(items=400))
    reserve = Cost(60, 0)
    arms = [Arm(a, 10.0) for a in range(12)]
    outcome = run_search(plan, arms, scripted_evaluate(p), reserve=reserve)
    assert outcome.winner.arm == best
    assert outcome.spent.items + reserve.items <= 400
    assert [len(r.arms) for r in outcome.rungs] == [12, 6, 3]  # 12 -> 6 -> 3 -> one left
    assert [r.stop for r in outcome.rungs] == [8, 16, 32]
    # Each rung evaluates only the keys its survivors have not seen.
    assert outcome.spent.items == 12 * 8 + 6 * 8 + 3 * 16


def test_the_first_rung_drops_the_last_candidates_while_over_budget() -> None:
    plan = HalvingPlan(keys=tuple(KEYS[:40]), eta=2, first_items=10, budget=Budget(items=100))
    rung = plan.first_rung([Arm(a, 5.0) for a in range(12)], spent=Cost(4, 0), reserve=Cost(30, 0))
    assert rung.arms == tuple(range(6))  # (100 - 4 - 30) // 10 candidates fit
    with pytest.raises(BudgetTooSmall, match="even two candidates"):
        plan.first_rung([Arm(a, 5.0) for a in range(12)], spent=Cost(4, 0), reserve=Cost(80, 0))


def test_the_token_budget_bounds_the_search_with_observed_costs() -> None:
    p = {arm: 0.3 + 0.05 * arm for arm in range(8)}
    tokens = {arm: 40 if arm % 2 else 10 for arm in range(8)}
    plan = HalvingPlan(keys=tuple(KEYS[:64]), eta=2, first_items=8, budget=Budget(tokens=5000))
    # Before any result a candidate is estimated at its upper bound (N x max_new_tokens).
    outcome = run_search(plan, [Arm(a, 48.0) for a in range(8)], scripted_evaluate(p, tokens))
    assert outcome.spent.tokens <= 5000
    assert len(outcome.rungs) >= 2
    # A tighter budget stops earlier, with the best of the last rung.
    tight = HalvingPlan(keys=tuple(KEYS[:64]), eta=2, first_items=8, budget=Budget(tokens=3500))
    short = run_search(tight, [Arm(a, 48.0) for a in range(8)], scripted_evaluate(p, tokens))
    assert short.spent.tokens <= 3500
    assert short.stop_reason in {"the budget cannot pay for another rung", "one candidate left"}


def test_on_equal_scores_the_start_stays_ahead_then_the_cheaper_candidate() -> None:
    plan = HalvingPlan(keys=tuple(KEYS[:8]), eta=2, first_items=8)
    results = {
        0: {k: (1.0, 30) for k in KEYS[:8]},
        1: {k: (1.0, 5) for k in KEYS[:8]},
        2: {k: (1.0, 9) for k in KEYS[:8]},
        3: {k: (0.0, 1) for k in KEYS[:8]},
    }
    assert [s.arm for s in plan.rank([3, 2, 1, 0], results, 8)] == [0, 1, 2, 3]


def test_the_search_stops_when_the_search_items_run_out() -> None:
    p = {arm: 0.5 for arm in range(16)}
    plan = HalvingPlan(keys=tuple(KEYS[:12]), eta=2, first_items=8)
    outcome = run_search(plan, [Arm(a, 1.0) for a in range(16)], scripted_evaluate(p))
    assert [r.stop for r in outcome.rungs] == [8, 12]
    assert outcome.stop_reason == "all 12 search items used"
