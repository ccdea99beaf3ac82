"""Combine N sampled answers for one input into a single answer.

Plain Python (standard library only). The inputs are the answers already extracted by
:mod:`workers.scorers` (``"12"``, ``"B"``, ``"paris"``), so equal answers are equal
strings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["VoteResult", "majority_vote", "best_of_n"]


@dataclass(frozen=True, slots=True)
class VoteResult:
    """The outcome of a majority vote.

    ``answer`` is the winning answer (``""`` when every answer was empty), ``votes`` how
    many samples gave it, ``total`` how many samples there were (empty ones included, so
    abstentions lower the agreement), and ``agreement`` is ``votes / total`` (``0.0`` for
    no samples).
    """

    answer: str
    votes: int
    total: int
    agreement: float


def majority_vote(answers: Sequence[str]) -> VoteResult:
    """The most common non-empty answer.

    Answers are compared after stripping surrounding whitespace; empty answers cast no
    vote. Ties go to the answer that appeared first, so the result does not depend on
    hashing or sort order.

    >>> majority_vote(["7", "", "12", "7"])
    VoteResult(answer='7', votes=2, total=4, agreement=0.5)
    """
    counts: dict[str, int] = {}
    for raw in answers:
        answer = raw.strip()
        if answer:
            # dicts keep insertion order, i.e. the order of first occurrence.
            counts[answer] = counts.get(answer, 0) + 1
    total = len(answers)
    winner = ""
    votes = 0
    for answer, count in counts.items():
        if count > votes:
            winner, votes = answer, count
    agreement = votes / total if total else 0.0
    return VoteResult(answer=winner, votes=votes, total=total, agreement=agreement)


def best_of_n(candidates: Sequence[tuple[str, float]]) -> str:
    """The candidate text with the highest mean log-probability.

    ``candidates`` are ``(text, mean_logprob)`` pairs. Ties go to the earliest candidate.
    Empty texts are skipped (a model that stops at once scores a deceptively high mean
    log-probability), as are NaN scores; returns ``""`` when nothing is left.

    >>> best_of_n([("7", -0.9), ("8", -0.2), ("", -0.01)])
    '8'
    """
    best_text = ""
    best_score = -math.inf
    found = False
    for text, mean_logprob in candidates:
        if not text.strip() or math.isnan(mean_logprob):
            continue
        if not found or mean_logprob > best_score:
            best_text, best_score, found = text, mean_logprob, True
    return best_text
