"""The search half of prompt optimisation: the data split, the budget and successive halving. Plain Python.

**Split.** Every item key is hashed with the job's seed. A key whose hash falls below the held-out fraction is
held out; the rest is put in a seeded order, whose first few keys form the few-shot example pool and whose
remainder is searched on, rung by rung, as growing prefixes. Each key's side is decided by its own hash alone,
so adding items to a dataset never moves an old item between search and held-out: a re-run on a grown dataset
never searches on what an earlier run held out.

**Successive halving.** Rung 0 evaluates every candidate on the first `first_items` search keys; each later rung
keeps the best 1/eta of the previous rung's candidates and extends their evaluation to eta times as many keys
(only the new keys are evaluated: the earlier ones are already known). A candidate's score at a rung is its mean
over every key up to that rung. The search stops when one candidate is left, when the search keys run out, or
when the budget cannot pay for another rung of at least two candidates. On equal scores the starting version
(candidate 0) stays ahead — a candidate has to beat it, not tie with it — then the candidate that generates
fewer tokens per item, then the earlier one.

**Budget.** Item evaluations and/or generated tokens. Before a rung is created its cost is checked against what
is left after a reserve (the held-out comparison, the safety check), using observed tokens per item where a
candidate has results and an upper bound (N samples x max_new_tokens) where it has none yet. Work is counted
whether or not a finished run is reused, so the same job gives the same search however warm the registry is.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field


class SplitError(ValueError):
    pass


class BudgetTooSmall(ValueError):
    pass


def key_unit(seed: int, purpose: str, key: str) -> float:
    """A number in [0, 1) fixed by (seed, purpose, key): the seeded hash the split is made of."""
    digest = hashlib.sha256(f"{seed}\x1f{purpose}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class Split:
    search: tuple[str, ...]  # scored in the search, in the seeded order rungs take prefixes of
    pool: tuple[str, ...]  # few-shot examples are drawn from these only; never scored in the search
    holdout: tuple[str, ...]  # scored once at the end, sorted

    def as_dict(self) -> dict[str, list[str]]:
        return {"search": list(self.search), "pool": list(self.pool), "holdout": list(self.holdout)}


def split_keys(keys: Iterable[str], *, holdout_fraction: float, seed: int, pool_size: int = 0) -> Split:
    """Split item keys into search, few-shot pool and held-out parts (see the module docstring)."""
    keys = list(keys)
    if len(set(keys)) != len(keys):
        raise SplitError("item keys must be unique")
    if not 0 < holdout_fraction < 1:
        raise SplitError("the held-out fraction must be between 0 and 1")
    if pool_size < 0:
        raise SplitError("the few-shot pool size must be >= 0")
    holdout = sorted(k for k in keys if key_unit(seed, "holdout", k) < holdout_fraction)
    held = set(holdout)
    rest = sorted((k for k in keys if k not in held), key=lambda k: (key_unit(seed, "order", k), k))
    # The pool never takes more than a third of the search side: the search needs items to score.
    pool_size = min(pool_size, len(rest) // 3)
    split = Split(search=tuple(rest[pool_size:]), pool=tuple(rest[:pool_size]), holdout=tuple(holdout))
    if not split.holdout or not split.search:
        raise SplitError(
            f"{len(keys)} items with a held-out fraction of {holdout_fraction:g} leave "
            f"{len(split.search)} to search and {len(split.holdout)} to hold out; both need at least one"
        )
    return split


# --- budget ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    items: int = 0
    tokens: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.items + other.items, self.tokens + other.tokens)

    def as_dict(self) -> dict[str, int]:
        return {"items": self.items, "tokens": self.tokens}


@dataclass(frozen=True)
class Budget:
    """Upper bounds on item evaluations and generated tokens; None: no bound on that one."""

    items: int | None = None
    tokens: int | None = None

    def fits(self, total: Cost) -> bool:
        return (self.items is None or total.items <= self.items) and (
            self.tokens is None or total.tokens <= self.tokens
        )

    def as_dict(self) -> dict[str, int | None]:
        return {"items": self.items, "tokens": self.tokens}


# --- successive halving ------------------------------------------------------------------------------------------

# Per candidate, per item key: (metric value, generated tokens). A key the metric does not score is absent.
Results = Mapping[int, Mapping[str, tuple[float, int]]]


@dataclass(frozen=True)
class Arm:
    """A candidate as the search sees it: an id (0 is the starting version) and a token estimate per item."""

    id: int
    tokens_per_item: float


@dataclass(frozen=True)
class Rung:
    index: int
    arms: tuple[int, ...]
    start: int  # search keys [start:stop] are evaluated in this rung
    stop: int
    estimate: Cost = Cost()

    @property
    def new_items(self) -> int:
        return self.stop - self.start

    def as_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "arms": list(self.arms),
            "start": self.start,
            "stop": self.stop,
            "estimate": self.estimate.as_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Rung:
        estimate = data.get("estimate") or {}
        assert isinstance(estimate, Mapping)
        arms = data["arms"]
        assert isinstance(arms, list | tuple)
        return cls(
            index=int(data["index"]),  # type: ignore[call-overload]
            arms=tuple(int(a) for a in arms),
            start=int(data["start"]),  # type: ignore[call-overload]
            stop=int(data["stop"]),  # type: ignore[call-overload]
            estimate=Cost(int(estimate.get("items", 0)), int(estimate.get("tokens", 0))),
        )


@dataclass(frozen=True)
class Score:
    arm: int
    value: float | None  # mean metric value over the scored keys; None when no key was scored
    scored: int  # keys with a value
    tokens_per_item: float

    def sort_key(self) -> tuple[float, bool, float, int]:
        # On equal scores the starting version stays ahead: a candidate has to beat it, not tie with it.
        return (-(self.value if self.value is not None else -math.inf), self.arm != 0, self.tokens_per_item, self.arm)


@dataclass(frozen=True)
class HalvingPlan:
    keys: tuple[str, ...]  # the search keys, in the seeded order
    eta: int = 2
    first_items: int = 8
    budget: Budget = field(default_factory=Budget)

    def __post_init__(self) -> None:
        if self.eta < 2:
            raise ValueError("eta must be at least 2")
        if self.first_items < 1:
            raise ValueError("the first rung needs at least one item")
        if not self.keys:
            raise ValueError("nothing to search on")

    def stop_for(self, index: int) -> int:
        return min(len(self.keys), self.first_items * self.eta**index)

    def score(self, arm: int, results: Results, stop: int, fallback_tokens: float = 0.0) -> Score:
        mine = results.get(arm, {})
        seen = [mine[k] for k in self.keys[:stop] if k in mine]
        value = sum(v for v, _ in seen) / len(seen) if seen else None
        tokens = sum(t for _, t in seen) / len(seen) if seen else fallback_tokens
        return Score(arm=arm, value=value, scored=len(seen), tokens_per_item=tokens)

    def rank(self, arms: Iterable[int], results: Results, stop: int) -> list[Score]:
        return sorted((self.score(a, results, stop) for a in arms), key=Score.sort_key)

    def first_rung(self, arms: Sequence[Arm], *, spent: Cost = Cost(), reserve: Cost = Cost()) -> Rung:
        """Every candidate on the first keys; candidates at the end of the list are dropped while that would not
        fit the budget (they are listed in priority order). BudgetTooSmall when not even two fit."""
        stop = self.stop_for(0)
        kept = list(arms)
        while len(kept) >= 2:
            estimate = Cost(len(kept) * stop, math.ceil(sum(a.tokens_per_item for a in kept) * stop))
            if self.budget.fits(spent + reserve + estimate):
                return Rung(0, tuple(a.id for a in kept), 0, stop, estimate)
            kept.pop()
        need = Cost(2 * stop, math.ceil(sum(a.tokens_per_item for a in list(arms)[:2]) * stop))
        raise BudgetTooSmall(
            f"the budget ({_describe(self.budget)}) cannot pay for the first rung of even two candidates on "
            f"{stop} items ({_describe_cost(need)}) on top of {_describe_cost(spent)} spent and "
            f"{_describe_cost(reserve)} reserved for the held-out comparison"
        )

    def next_rung(
        self, rung: Rung, results: Results, *, spent: Cost = Cost(), reserve: Cost = Cost()
    ) -> tuple[Rung | None, str]:
        """The rung after `rung` given every result so far, or None and the reason the search stops there."""
        if rung.stop >= len(self.keys):
            return None, f"all {len(self.keys)} search items used"
        keep = len(rung.arms) // self.eta
        if keep <= 1:
            return None, "one candidate left"
        ranking = self.rank(rung.arms, results, rung.stop)
        stop = self.stop_for(rung.index + 1)
        new = stop - rung.stop
        for n in range(keep, 1, -1):
            chosen = ranking[:n]
            estimate = Cost(n * new, math.ceil(sum(s.tokens_per_item for s in chosen) * new))
            if self.budget.fits(spent + reserve + estimate):
                why = "" if n == keep else f" (cut from {keep} to {n} by the budget)"
                return Rung(rung.index + 1, tuple(s.arm for s in chosen), rung.stop, stop, estimate), why
        return None, "the budget cannot pay for another rung"

    def leader(self, rungs: Sequence[Rung], results: Results) -> Score:
        """The best candidate of the deepest rung."""
        last = rungs[-1]
        return self.rank(last.arms, results, last.stop)[0]


@dataclass
class SearchOutcome:
    rungs: list[Rung]
    results: dict[int, dict[str, tuple[float, int]]]
    spent: Cost
    winner: Score
    stop_reason: str


def run_search(
    plan: HalvingPlan,
    arms: Sequence[Arm],
    evaluate: Callable[[Rung, Sequence[str]], Results],
    *,
    spent: Cost = Cost(),
    reserve: Cost = Cost(),
) -> SearchOutcome:
    """The whole search in one call, with `evaluate(rung, keys)` returning each rung arm's results on the keys.

    The job's state machine (jobs.py) takes the same steps one rung at a time between evaluation runs; this
    loop is the same algorithm for callers that can score synchronously (and for tests with a scripted scorer).
    """
    results: dict[int, dict[str, tuple[float, int]]] = {}
    rung: Rung | None = plan.first_rung(arms, spent=spent, reserve=reserve)
    rungs: list[Rung] = []
    reason = ""
    while rung is not None:
        rungs.append(rung)
        got = evaluate(rung, plan.keys[rung.start : rung.stop])
        for arm in rung.arms:
            mine = dict(got.get(arm, {}))
            results.setdefault(arm, {}).update(mine)
            spent = spent + Cost(rung.new_items, sum(t for _, t in mine.values()))
        rung, reason = plan.next_rung(rung, results, spent=spent, reserve=reserve)
    return SearchOutcome(rungs, results, spent, plan.leader(rungs, results), reason)


def _describe(budget: Budget) -> str:
    parts = []
    if budget.items is not None:
        parts.append(f"{budget.items} item evaluations")
    if budget.tokens is not None:
        parts.append(f"{budget.tokens} generated tokens")
    return " and ".join(parts) or "unbounded"


def _describe_cost(cost: Cost) -> str:
    return f"{cost.items} item evaluations, about {cost.tokens} tokens"
