"""Majority vote and best-of-N over sampled answers."""

from __future__ import annotations

import doctest
import math

import pytest

from workers import aggregation
from workers.aggregation import VoteResult, best_of_n, majority_vote


def test_it_picks_the_most_common_answer() -> None:
    assert majority_vote(["7", "12", "7", "7", "5"]) == VoteResult("7", votes=3, total=5, agreement=0.6)


def test_it_breaks_a_tie_by_earliest_first_occurrence() -> None:
    assert majority_vote(["12", "7", "7", "12"]).answer == "12"
    assert majority_vote(["7", "12", "12", "7"]).answer == "7"


def test_it_breaks_a_three_way_tie_by_earliest_first_occurrence() -> None:
    result = majority_vote(["b", "c", "a", "a", "c", "b"])
    assert (result.answer, result.votes, result.total) == ("b", 2, 6)
    assert result.agreement == pytest.approx(1 / 3)


def test_a_later_answer_wins_only_with_strictly_more_votes() -> None:
    assert majority_vote(["5", "7", "7"]).answer == "7"


def test_it_ignores_empty_answers_when_voting() -> None:
    result = majority_vote(["", "", "", "7", "  "])
    assert result.answer == "7"
    assert result.votes == 1


def test_empty_answers_count_in_the_total_and_lower_agreement() -> None:
    result = majority_vote(["7", "", "7", ""])
    assert result == VoteResult("7", votes=2, total=4, agreement=0.5)


def test_it_returns_empty_when_every_answer_is_empty() -> None:
    assert majority_vote(["", " ", ""]) == VoteResult("", votes=0, total=3, agreement=0.0)


def test_it_returns_empty_for_no_answers() -> None:
    assert majority_vote([]) == VoteResult("", votes=0, total=0, agreement=0.0)


def test_it_strips_whitespace_before_comparing_answers() -> None:
    result = majority_vote([" paris", "paris ", "london"])
    assert (result.answer, result.votes, result.total) == ("paris", 2, 3)
    assert result.agreement == pytest.approx(2 / 3)


def test_it_votes_on_the_exact_extracted_strings() -> None:
    # Extraction canonicalises; the vote itself does not second-guess it.
    assert majority_vote(["B", "b", "b"]).answer == "b"


def test_unanimous_votes_have_full_agreement() -> None:
    assert majority_vote(["42"] * 8) == VoteResult("42", votes=8, total=8, agreement=1.0)


def test_it_accepts_any_sequence() -> None:
    assert majority_vote(("A", "B", "B")).answer == "B"


def test_best_of_n_picks_the_highest_mean_logprob() -> None:
    assert best_of_n([("7", -1.2), ("8", -0.3), ("9", -0.8)]) == "8"


def test_best_of_n_breaks_ties_by_the_first_candidate() -> None:
    assert best_of_n([("first", -0.5), ("second", -0.5), ("third", -0.9)]) == "first"


def test_best_of_n_skips_empty_texts() -> None:
    assert best_of_n([("", -0.01), ("  ", -0.02), ("Paris", -0.7)]) == "Paris"


def test_best_of_n_skips_nan_scores() -> None:
    assert best_of_n([("a", math.nan), ("b", -3.0)]) == "b"


def test_best_of_n_handles_negative_infinity() -> None:
    assert best_of_n([("a", -math.inf), ("b", -math.inf)]) == "a"


def test_best_of_n_returns_the_text_unchanged() -> None:
    assert best_of_n([("  The answer is 7.\n", -0.4)]) == "  The answer is 7.\n"


@pytest.mark.parametrize("candidates", [[], [("", -0.1)], [("x", math.nan)]])
def test_best_of_n_returns_empty_when_nothing_qualifies(candidates: list[tuple[str, float]]) -> None:
    assert best_of_n(candidates) == ""


def test_its_docstring_examples_hold() -> None:
    failures, _ = doctest.testmod(aggregation)
    assert failures == 0
