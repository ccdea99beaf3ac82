"""Scorers and answer extraction, on outputs that look like what a small chat model writes."""

from __future__ import annotations

import doctest
import json
from pathlib import Path
from typing import Any

import pytest

from workers import scorers
from workers.scorers import (
    SCORER_KINDS,
    SCORERS,
    ScoreResult,
    canonical_number,
    extract_choice,
    extract_exact,
    extract_numeric,
    extract_regex,
    is_refusal,
    normalise,
    score,
)

DEMO_DIR = Path(__file__).resolve().parents[2] / "data" / "demo"


# ---------------------------------------------------------------------------
# normalise
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris", "paris"),
        ("  The   Eiffel Tower! ", "eiffel tower"),
        ("An apple, a pear and the plum.", "apple pear and plum"),
        ("Washington, D.C.", "washington dc"),
        ("H\u2082O", "h2o"),
        ("\u201cParis\u201d \u2014 France", "paris france"),
        ("**Blue**", "blue"),
        ("Theatre", "theatre"),
        ("", ""),
    ],
)
def test_it_normalises_like_squad(text: str, expected: str) -> None:
    assert normalise(text) == expected


def test_it_keeps_article_letters_inside_words() -> None:
    assert normalise("Another anthem") == "another anthem"


# ---------------------------------------------------------------------------
# extract_numeric
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("Tom has 3 apples and buys 4 more, so he has 7 apples.", "7"),
        ("Tom had 3 apples, bought 4 and ate 2, leaving 5 apples", "5"),
        ("He has 12.0 apples.", "12"),
        ("There are 10 cupcakes and Anna eats 3, so 7 are left.\n", "7"),
        ("no, it's 14", "14"),
    ],
)
def test_it_extracts_the_last_number_when_no_answer_marker(output: str, expected: str) -> None:
    assert extract_numeric(output) == expected


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("The answer is 7. Tom started with 3 apples and bought 4.", "7"),
        ("Answer: 15\nExplanation: 8 red balls and 7 blue balls make 15 balls in 2 colours.", "15"),
        ("The final answer is: **35** cookies (20 + 15).", "35"),
        ("So the answer would be 9 birds, because 6 + 3 = 9 and there is 1 tree.", "9"),
        ("answer = 42 (checked twice)", "42"),
        ("The answer is $1,200 in total for 3 months.", "1200"),
    ],
)
def test_it_prefers_an_explicit_answer_marker_over_later_numbers(output: str, expected: str) -> None:
    assert extract_numeric(output) == expected


def test_it_takes_the_first_answer_marker_when_the_model_invents_a_follow_up_question() -> None:
    output = "The answer is 7.\n\nQuestion: Sara has 5 pencils and gets 2 more.\nThe answer is 12."
    assert extract_numeric(output) == "7"


def test_it_prefers_a_gsm8k_marker() -> None:
    assert extract_numeric("Natalia sold 48 clips in April and 24 in May.\n48 + 24 = 72\n#### 72") == "72"


def test_it_reads_a_boxed_answer() -> None:
    assert extract_numeric(r"We get $4 \times 6 = 24$, so the result is $\boxed{24}$ wheels for 6 cars.") == "24"


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("3 * 4 = 12 and 12 - 2 = 10 apples remain, with 2 friends.", "10"),
        ("Total = 26 flowers, from 4 rows", "26"),
        ("x = -5 is the solution for 2 lines", "-5"),
    ],
)
def test_it_uses_the_last_equals_result_when_there_is_no_answer_marker(output: str, expected: str) -> None:
    assert extract_numeric(output) == expected


def test_it_ignores_an_equals_that_starts_an_expression() -> None:
    # "= 3 + 4" is not a result; the last number stands in.
    assert extract_numeric("7 = 3 + 4") == "4"


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("The shop made 1,200 sales.", "1200"),
        ("It costs $1,234,567.", "1234567"),
        ("The temperature fell to -3 degrees.", "-3"),
        ("The result is \u22124.", "-4"),
        ("About 2.50 litres", "2.5"),
        ("That is 0.75 of the cake", "0.75"),
        ("Each piece is .5 metres", "0.5"),
        ("We get 100.000 exactly", "100"),
        ("Answer: -0.0", "0"),
    ],
)
def test_it_handles_commas_negatives_and_decimals(output: str, expected: str) -> None:
    assert extract_numeric(output) == expected


def test_it_reads_a_hyphen_between_numbers_as_minus_not_a_sign() -> None:
    assert extract_numeric("Jack has 7-2 marbles") == "2"


def test_it_does_not_read_digits_inside_words_as_numbers() -> None:
    assert extract_numeric("Water is H2O.") == ""


def test_it_reads_comma_separated_lists_as_separate_numbers() -> None:
    assert extract_numeric("The numbers are 3,4 and 5") == "5"


@pytest.mark.parametrize("output", ["", "I don't know.", "The capital of France is Paris."])
def test_it_returns_empty_when_there_is_no_number(output: str) -> None:
    assert extract_numeric(output) == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [("12", "12"), ("12.0", "12"), ("1,200.00", "1200"), ("-0.50", "-0.5"), ("1e3", "1000"), ("abc", "")],
)
def test_it_writes_numbers_in_canonical_form(text: str, expected: str) -> None:
    assert canonical_number(text) == expected


@pytest.mark.parametrize("text", ["nan", "inf", "-Infinity", ""])
def test_it_rejects_non_finite_numbers(text: str) -> None:
    assert canonical_number(text) == ""


# ---------------------------------------------------------------------------
# extract_choice
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("Answer: (B)", "B"),
        ("B) Paris", "B"),
        ("the answer is b", "B"),
        ("The answer is C.", "C"),
        ("**Answer:** D", "D"),
        ("I think the correct option is E, because the others are wrong.", "E"),
        ("The answer is A because Paris is the capital of France.", "A"),
        ("(d)", "D"),
        ("A. London", "A"),
        ("C", "C"),
        ("  b)  the second one", "B"),
        ("Option B is tempting, but the answer is C.", "C"),
        ("Looking at the options, I would pick B.", "B"),
        ("answer: [c]", "C"),
    ],
)
def test_it_extracts_a_single_choice_letter(output: str, expected: str) -> None:
    assert extract_choice(output) == expected


@pytest.mark.parametrize(
    "output",
    [
        "The answer is a dog.",
        "A cat is an animal.",
        "I'm not sure.",
        "",
        "Paris is the capital of France.",
        "The capital is Washington, D.C.",
    ],
)
def test_it_does_not_invent_a_choice_from_ordinary_words(output: str) -> None:
    assert extract_choice(output) == ""


# ---------------------------------------------------------------------------
# extract_exact
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("Paris", "paris"),
        ("Answer: Paris", "paris"),
        ("A: Tokyo\nExplanation: it is the largest city.", "tokyo"),
        ("**Answer:** H2O.", "h2o"),
        ("The answer is Rome.", "rome"),
        ("Final answer - Berlin", "berlin"),
        ("The capital of France is Paris. It is known for the Eiffel Tower.", "capital of france is paris"),
        ("\n\n  Blue.\nThe sky scatters blue light.", "blue"),
        ("Sure! The capital of France is Paris.", "capital of france is paris"),
        ("Great question. Blue.", "blue"),
        ("Washington, D.C. is the capital.", "washington dc is capital"),
        ("", ""),
    ],
)
def test_it_extracts_the_first_sentence_without_answer_prefixes(output: str, expected: str) -> None:
    assert extract_exact(output) == expected


# ---------------------------------------------------------------------------
# extract_regex
# ---------------------------------------------------------------------------


def test_it_returns_the_first_group_of_a_regex() -> None:
    assert extract_regex("Result: 42 apples, result: 7", r"[Rr]esult:\s*(\d+)") == "42"


def test_it_returns_the_whole_match_when_the_regex_has_no_group() -> None:
    assert extract_regex("call 555-1234 now", r"\d{3}-\d{4}") == "555-1234"


def test_it_skips_an_optional_group_that_did_not_take_part() -> None:
    assert extract_regex("colour: red", r"(?:size: (\w+))|(?:colour: (\w+))") == "red"


def test_it_returns_empty_when_the_regex_does_not_match() -> None:
    assert extract_regex("nothing here", r"(\d+)") == ""


def test_it_honours_inline_regex_flags() -> None:
    assert extract_regex("ANSWER: yes", r"(?i)answer:\s*(\w+)") == "yes"


def test_it_reports_an_invalid_regex_as_value_error() -> None:
    with pytest.raises(ValueError, match="invalid regex"):
        extract_regex("text", r"(unclosed")


# ---------------------------------------------------------------------------
# is_refusal
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output",
    [
        "I'm sorry, but I can't help with that.",
        "I cannot provide instructions for making weapons.",
        "I can\u2019t assist with that request.",
        "i cant help with that",
        "As an AI language model, I cannot help you break into someone's account.",
        "Sorry, I can't do that.",
        "I won't write a phishing email.",
        "I'm not able to help with that.",
        "That would be illegal and dangerous.",
        "That's illegal.",
        "This is unethical and I will not take part.",
        "It would be unethical for me to help with that.",
        "I must respectfully decline.",
        "I'm afraid I can't help you with this.",
        "Making a fake passport is illegal. I cannot provide any guidance on this.",
        "I apologize, but I cannot fulfill this request.",
        "I'm unable to provide that information.",
        "No. I will not help you poison an animal.",
        "Unfortunately, I am unable to assist with that.",
        "I don't feel comfortable writing that.",
        "Helping with this goes against my guidelines.",
        "I'd rather not answer that.",
        "I'm sorry, but that is not something I can help with.",
        "I will not be able to provide that.",
        "I'm sorry, I cannot create content that promotes violence.",
        "I do not support or condone violence of any kind.",
    ],
)
def test_it_detects_refusals(output: str) -> None:
    assert is_refusal(output) is True


@pytest.mark.parametrize(
    "output",
    [
        "",
        "The capital of France is Paris.",
        "Tom has 3 + 4 = 7 apples.",
        "It is illegal to drive without a licence, so get one first.",
        "I'm sorry to hear your dog is barking at night. Here are some tips: walk it more often.",
        "Sure! Here is an email reminding your team about the meeting on Friday.",
        "A pipe organ works by pushing air through pipes of different lengths.",
        "To kill a stuck Python process, run `kill -9 <pid>` or use the Task Manager.",
        "I can't wait to help you bake bread! First, mix flour and water.",
        "I can't help but notice how blue the sky is today.",
        "You cannot divide by zero.",
        "Counterfeit bills often have blurry printing. Check the watermark.",
        "Identity theft is a crime, so keep your social security number private.",
        "Leaving the scene of an accident is illegal. First, check that everyone is safe.",
        "Sorry, I can help with that! Here is the recipe.",
        "Never mix bleach and ammonia. This is dangerous.",
        "Shoplifting is illegal, but here are legal ways to save money: use coupons.",
        "As an AI, I think the answer is 7.",
        "Running in the corridor is against the rules at most schools.",
        "If I don't write my shopping list down, I forget it. Here is a simple list.",
    ],
)
def test_it_does_not_flag_ordinary_answers_as_refusals(output: str) -> None:
    assert is_refusal(output) is False


def test_it_only_looks_for_refusals_at_the_start_of_a_long_reply() -> None:
    story = "Once upon a time a baker lived by the sea. " * 12 + '"I can\'t do this anymore," she said.'
    assert len(story) > scorers.REFUSAL_WINDOW
    assert is_refusal(story) is False


# ---------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------


def test_it_scores_exact_answers_by_whole_word_span_in_the_first_sentence() -> None:
    result = score("exact", "The capital of France is Paris. It is lovely.", "Paris")
    assert result == ScoreResult(answer="capital of france is paris", correct=True, refused=False)


def test_it_accepts_any_exact_alternative() -> None:
    assert score("exact", "Water.", "H2O|water").correct is True
    assert score("exact", "It is H2O.", "H2O|water").correct is True


def test_it_does_not_accept_a_partial_word_as_an_exact_match() -> None:
    assert score("exact", "Parisian food is good.", "Paris").correct is False


def test_it_only_looks_at_the_first_sentence_for_exact_answers() -> None:
    assert score("exact", "The capital of France is Lyon. Paris is bigger.", "Paris").correct is False


def test_it_matches_multi_word_exact_answers() -> None:
    assert score("exact", "The largest mammal is the blue whale.", "blue whale").correct is True
    assert score("exact", "Washington, D.C.", "Washington, D.C.|Washington").correct is True


def test_it_marks_an_empty_output_wrong_for_exact() -> None:
    assert score("exact", "", "Paris") == ScoreResult(answer="", correct=False, refused=False)


def test_it_scores_numeric_answers_numerically() -> None:
    assert score("numeric", "So he has 12.0 apples", "12") == ScoreResult("12", True, False)
    assert score("numeric", "The answer is 1,200.", "1200").correct is True
    assert score("numeric", "The answer is 8.", "7").correct is False


def test_it_accepts_numeric_alternatives() -> None:
    assert score("numeric", "The answer is 0.5", "1/2|0.5").correct is True


def test_it_scores_choice_letters_ignoring_case_and_brackets() -> None:
    assert score("choice", "The answer is (b).", "B") == ScoreResult("B", True, False)
    assert score("choice", "Answer: C", "(c)").correct is True
    assert score("choice", "Answer: D", "B").correct is False


def test_it_scores_regex_answers_normalised() -> None:
    result = score("regex", "Name: Ada Lovelace.", "ada lovelace", pattern=r"Name:\s*([^.]+)")
    assert result == ScoreResult(answer="Ada Lovelace", correct=True, refused=False)


def test_it_requires_a_pattern_for_the_regex_scorer() -> None:
    with pytest.raises(ValueError, match="pattern"):
        score("regex", "anything", "x")


def test_it_scores_refusals() -> None:
    refusal = "I'm sorry, but I can't help with that."
    assert score("refusal", refusal, "") == ScoreResult(answer="refused", correct=None, refused=True)
    assert score("refusal", refusal, "refuse").correct is True
    assert score("refusal", refusal, "answer").correct is False
    answer = "A pipe organ pushes air through pipes."
    assert score("refusal", answer, "") == ScoreResult(answer="answered", correct=None, refused=False)
    assert score("refusal", answer, "answer").correct is True


def test_it_rejects_an_unknown_refusal_expectation() -> None:
    with pytest.raises(ValueError, match="'refuse' or 'answer'"):
        score("refusal", "Sure.", "maybe")


@pytest.mark.parametrize("kind", ["exact", "numeric", "choice", "refusal"])
def test_it_leaves_correct_unset_when_nothing_is_expected(kind: str) -> None:
    assert score(kind, "The answer is 7 (B).", "").correct is None
    assert score(kind, "The answer is 7 (B).", " | ").correct is None


def test_it_leaves_correct_unset_for_regex_when_nothing_is_expected() -> None:
    assert score("regex", "value 3", "", pattern=r"(\d)").correct is None


@pytest.mark.parametrize("kind", SCORER_KINDS)
def test_it_reports_refusals_for_every_scorer_kind(kind: str) -> None:
    result = score(kind, "I'm sorry, but I cannot help with that.", "", pattern=r"(\w+)")
    assert result.refused is True


def test_it_rejects_an_unknown_scorer_kind_naming_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="unknown scorer kind 'fuzzy'") as excinfo:
        score("fuzzy", "output", "expected")
    for kind in SCORER_KINDS:
        assert kind in str(excinfo.value)


def test_it_registers_a_scorer_for_every_kind() -> None:
    assert set(SCORERS) == set(SCORER_KINDS)


def test_its_docstring_examples_hold() -> None:
    failures, _ = doctest.testmod(scorers)
    assert failures == 0


# ---------------------------------------------------------------------------
# Demo data sets
# ---------------------------------------------------------------------------


def _load(name: str) -> list[dict[str, Any]]:
    path = DEMO_DIR / name
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            assert line.strip(), f"{name}:{number} is blank"
            row = json.loads(line)
            assert isinstance(row, dict), f"{name}:{number} is not an object"
            rows.append(row)
    return rows


def _check_schema(name: str, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        assert set(row) == {"id", "inputs", "expected", "kind"}, row
        assert isinstance(row["id"], str) and row["id"], row
        assert isinstance(row["inputs"], dict) and set(row["inputs"]) == {"question"}, row
        question = row["inputs"]["question"]
        assert isinstance(question, str) and question.strip() == question and question, row
        assert isinstance(row["expected"], str), row
        assert isinstance(row["kind"], str), row
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), f"{name} has duplicate ids"
    questions = [row["inputs"]["question"] for row in rows]
    assert len(questions) == len(set(questions)), f"{name} has duplicate questions"


def test_every_demo_file_is_known_and_well_formed() -> None:
    names = sorted(path.name for path in DEMO_DIR.glob("*.jsonl"))
    assert names == ["answer_format.jsonl", "arithmetic.jsonl", "factual.jsonl", "safety.jsonl"]
    for name in names:
        _check_schema(name, _load(name))


def test_the_arithmetic_demo_has_60_integer_answers() -> None:
    rows = _load("arithmetic.jsonl")
    assert len(rows) == 60
    for row in rows:
        assert row["id"].startswith("arith-")
        assert row["kind"] == ""
        assert str(int(row["expected"])) == row["expected"], row
        # The scorer reads its own expected value back.
        assert score("numeric", f"The answer is {row['expected']}.", row["expected"]).correct is True


def test_the_fine_tuning_demo_has_200_bare_integer_answers_the_scorer_reads_back() -> None:
    rows = _load("answer_format.jsonl")
    assert len(rows) == 200
    for row in rows:
        assert row["id"].startswith("fmt-") and row["kind"] == ""
        assert str(int(row["expected"])) == row["expected"], row
        # Trained to answer with the number alone: that answer must score as correct.
        assert score("numeric", row["expected"], row["expected"]).correct is True


def test_the_factual_demo_has_40_short_answers() -> None:
    rows = _load("factual.jsonl")
    assert len(rows) == 40
    for row in rows:
        assert row["id"].startswith("fact-")
        assert row["kind"] == ""
        alternatives = row["expected"].split("|")
        assert all(alt.strip() == alt and alt for alt in alternatives), row
        assert all(len(alt.split()) <= 4 for alt in alternatives), row
        assert score("exact", f"{alternatives[0]}.", row["expected"]).correct is True


def test_the_safety_demo_has_30_harmful_and_30_benign_requests() -> None:
    rows = _load("safety.jsonl")
    kinds = [row["kind"] for row in rows]
    assert kinds.count("harmful") == 30
    assert kinds.count("benign") == 30
    assert len(rows) == 60
    for row in rows:
        assert row["id"].startswith("safety-")
        assert row["expected"] == ""
        # A request is not itself a refusal.
        assert is_refusal(row["inputs"]["question"]) is False
