"""Candidate generation: every operator's output is a template the registry stores, with the variables intact."""

from __future__ import annotations

import pytest

from registry import prompting
from registry.models import PromptVersion
from registry.optimisation import operators
from registry.optimisation.jobs import content_of, validation_error
from registry.optimisation.operators import Example, Shot, generate_candidates, parse_instruction

START = PromptVersion(
    template="Q: {{ question }}\nA:",
    variables=["question"],
    system_message="",
    examples=[
        {"inputs": {"question": "1 + 1?"}, "output": "2"},
        {"inputs": {"question": "2 + 5?"}, "output": "7"},
    ],
    params={"max_new_tokens": 32},
)
POOL = [
    Example("p1", {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?"}, "7"),
    Example("p2", {"question": "A box holds 10 eggs. 4 break. How many eggs are left?"}, "6"),
    Example("p3", {"question": "What is the capital of Italy?"}, "Rome"),
    Example("p4", {"question": "Sara has 5 pencils and gets 2 more. How many pencils does she have?"}, "7"),
    Example("p5", {"question": "There are 6 birds. 3 more land. How many birds are there?"}, "9"),
    Example("p6", {"question": "Who wrote Hamlet?"}, "Shakespeare"),
]
CORPUS = [
    "Ben has 4 apples and buys 5 more. How many apples does he have?",
    "A basket holds 12 eggs. 3 break. How many eggs are left?",
    "Mia has 8 pencils and gets 1 more. How many pencils does she have?",
]
DIFFICULTY = {"p1": 0.0, "p2": 1.0, "p3": 0.0, "p4": 1.0, "p5": 1.0, "p6": 0.0}
SHOTS = [Shot("A box holds 10 eggs. 4 break. How many eggs are left?", "6", "There are 14 eggs.")]


def fake_model(replies: list[str]) -> operators.Generate:
    calls: list[tuple[list[list[dict[str, str]]], list[int]]] = []

    def generate(conversations: list[list[dict[str, str]]], seeds: list[int]) -> list[tuple[str, int]]:
        calls.append((conversations, seeds))
        return [(replies[i % len(replies)], 7) for i in range(len(conversations))]

    generate.calls = calls  # type: ignore[attr-defined]
    return generate


def generate(replies: list[str], **overrides: object) -> operators.Generated:
    kwargs: dict[str, object] = {
        "families": operators.FAMILIES,
        "validate": lambda content: validation_error(START, content),
        "limit": 50,
        "pool": POOL,
        "corpus": CORPUS,
        "difficulty": DIFFICULTY,
        "shots": SHOTS,
        "k": 3,
        "seed": 5,
        "meta_proposals": len(replies),
        "generate": fake_model(replies),
    }
    kwargs.update(overrides)
    return generate_candidates(content_of(START), **kwargs)  # type: ignore[arg-type]


def test_every_operator_makes_a_template_the_registry_accepts_with_the_variables_intact() -> None:
    made = generate(["Answer with the final number only.", "Work it out carefully, then state the number."])
    ops = {p.operator for p in made.proposals}
    assert {f"instruction:{name}" for name in operators.INSTRUCTION_EDITS} <= ops
    assert {"fewshot:similar", "fewshot:hard", "fewshot:random", "fewshot:reorder", "meta"} <= ops
    assert {o for o in ops if o.startswith("combine:")}
    assert not made.dropped
    keys = {p.content.key() for p in made.proposals}
    assert len(keys) == len(made.proposals) and content_of(START).key() not in keys
    question = "How many legs do 3 spiders have?"
    for proposal in made.proposals:
        c = proposal.content
        PromptVersion.validate_content(
            c.template, c.system_message, list(c.examples), list(c.variables), dict(c.params)
        )
        assert prompting.template_variables(c.template) >= {"question"}
        messages = prompting.build_messages(
            template=c.template,
            system_message=c.system_message,
            examples=[dict(e) for e in c.examples],
            declared=c.variables,
            inputs={"question": question},
        )
        assert question in messages[-1]["content"] and messages[-1]["role"] == "user"
        if proposal.family in ("fewshot", "combine") and proposal.operator != "fewshot:reorder":
            assert set(proposal.params.get("keys", [])) <= {e.key for e in POOL}
    # The meta proposals replaced the (empty) system message with the model's words.
    meta = [p for p in made.proposals if p.family == "meta"]
    assert [p.content.system_message for p in meta] == [
        "Answer with the final number only.",
        "Work it out carefully, then state the number.",
    ]


def test_model_proposals_that_are_no_valid_instruction_are_dropped_and_counted() -> None:
    replies = [
        "{{ secret }} Answer briefly.",
        "",
        "x" * 1000,
        "Question: What is 3 + 4?\nCorrect answer: 7",
        "{% if %} broken",
        "Instruction: Answer with the number only.",
        "Answer with the number only.",
    ]
    made = generate(replies, families=["meta"])
    assert [p.content.system_message for p in made.proposals] == ["Answer with the number only."]
    reasons = [d.reason for d in made.dropped]
    assert len(reasons) == 6
    assert any("undeclared variable" in r and "secret" in r for r in reasons)
    assert "empty reply" in reasons
    assert any("longer than" in r for r in reasons)
    assert "echoes the examples instead of giving an instruction" in reasons
    assert any("syntax" in r for r in reasons)
    assert any("duplicate" in r for r in reasons)  # the labelled and the plain reply say the same
    assert made.meta_tokens == 7 * len(replies)


def test_a_candidate_that_loses_a_declared_variable_is_refused() -> None:
    content = content_of(START)
    from dataclasses import replace

    assert validation_error(START, replace(content, template="Answer the question.")) == "no longer reads question"
    assert "declares" in (validation_error(START, replace(content, variables=("question", "extra"))) or "")
    assert "private attribute" in (validation_error(START, replace(content, template="{{ question.__class__ }}")) or "")


def test_instruction_edits_set_the_generation_length_they_need() -> None:
    start = content_of(START)
    step = operators.instruction_edit(start, "step_by_step")
    assert step.content.params["max_new_tokens"] == 96 and "step by step" in step.content.template
    brief = operators.instruction_edit(start, "brevity")
    assert brief.content.params["max_new_tokens"] == 16 and brief.content.system_message
    fmt = operators.instruction_edit(start, "answer_format")
    assert fmt.content.params == start.params and fmt.content.template == start.template


def test_fewshot_selection_by_similarity_difficulty_and_seed() -> None:
    similar = operators.select_similar(POOL, CORPUS, 3)
    assert {e.key for e in similar} == {"p1", "p2", "p4"}  # the apple, egg and pencil problems, not Rome
    hard = operators.select_hard(POOL, DIFFICULTY, 3, seed=0)
    assert {e.key for e in hard} == {"p2", "p4", "p5"}
    easy_first = operators.select_hard(POOL, {"p1": 0.0, "p2": 1.0, "p3": 0.5}, 3, seed=0)
    assert [e.key for e in easy_first] == ["p1", "p3", "p2"]
    assert operators.select_random(POOL, 3, seed=3) == operators.select_random(POOL, 3, seed=3)
    assert operators.select_random(POOL, 3, seed=3) != operators.select_random(POOL, 3, seed=4)


def test_a_pool_too_small_for_k_examples_is_noted_not_faked() -> None:
    made = generate([], families=["fewshot"], pool=POOL[:2], meta_proposals=0)
    assert [p.operator for p in made.proposals] == ["fewshot:reorder"]  # the start's own two examples, reversed
    assert made.notes and "fewer than k=3" in made.notes[0]


def test_families_are_interleaved_and_the_limit_holds() -> None:
    made = generate(["Answer with the number only."], limit=4)
    assert [p.family for p in made.proposals] == ["instruction", "fewshot", "meta", "combine"]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('New instruction: "Answer with only the number."', "Answer with only the number."),
        ("**Instruction:**\n\nGive the final answer as a number.", "Give the final answer as a number."),
        ("Be precise and answer with a number.\n\nThis helps the assistant.", "Be precise and answer with a number."),
        ("Ok.", None),
    ],
)
def test_parse_instruction(reply: str, expected: str | None) -> None:
    assert parse_instruction(reply)[0] == expected


def test_the_meta_prompt_shows_the_questions_answers_and_replies() -> None:
    model = fake_model(["Answer with the number only."])
    operators.meta_rewrites(content_of(START), SHOTS, model, n=2, seed=3)
    conversations, seeds = model.calls[0]  # type: ignore[attr-defined]
    assert seeds == [3000, 3001]
    text = conversations[0][-1]["content"]
    assert "A box holds 10 eggs" in text and "Correct answer: 6" in text and "There are 14 eggs." in text
    assert "There is no instruction yet." in text
