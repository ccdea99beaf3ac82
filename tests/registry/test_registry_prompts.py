"""Prompt versions, labels and the template sandbox."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.core.exceptions import ValidationError

from registry import prompting
from registry.models import ImmutableError, LabelMove, Prompt, PromptLabel, PromptVersion

pytestmark = pytest.mark.django_db

MakeVersion = Callable[..., PromptVersion]


def test_identical_content_returns_the_stored_version(prompt: Prompt) -> None:
    first, created_first = prompt.create_version(
        template="{{ question }} {{ context }}",
        variables=["question", "context"],
        params={"max_new_tokens": 8},
    )
    again, created_again = prompt.create_version(
        template="{{ question }} {{ context }}",
        variables=["context", "question"],
        params={"max_new_tokens": 8},
    )
    assert (created_first, created_again) == (True, False)
    assert again.pk == first.pk
    assert prompt.versions.count() == 1


def test_changed_content_is_a_new_version(make_version: MakeVersion, prompt: Prompt) -> None:
    first = make_version()
    second = make_version(params={"temperature": 0.7})
    assert second.pk != first.pk
    assert second.content_hash != first.content_hash
    assert prompt.versions.count() == 2


def test_version_numbers_increase_and_parent_defaults_to_the_previous_version(
    make_version: MakeVersion,
) -> None:
    v1 = make_version()
    v2 = make_version(template="Question: {{ question }}")
    v3 = make_version(template="Q: {{ question }}\nThink, then answer.", parent=v1)
    v4 = make_version(template="{{ question }}")
    assert [v.number for v in (v1, v2, v3, v4)] == [1, 2, 3, 4]
    assert v1.parent is None
    assert v2.parent == v1
    assert v3.parent == v1
    assert v4.parent == v3


def test_it_rejects_a_parent_from_another_prompt(make_version: MakeVersion) -> None:
    foreign = make_version()
    other = Prompt.objects.create(name="other")
    with pytest.raises(ValidationError, match="does not belong to prompt 'other'"):
        other.create_version(template="{{ x }}", variables=["x"], parent=foreign)
    assert not other.versions.exists()


def test_stored_versions_are_immutable(make_version: MakeVersion) -> None:
    version = make_version()
    version.template = "changed {{ question }}"
    with pytest.raises(ImmutableError):
        version.save()
    version.refresh_from_db()
    assert version.template == "Q: {{ question }}\nA:"


def test_moving_a_label_records_each_move_and_a_rollback_is_a_move(make_version: MakeVersion, prompt: Prompt) -> None:
    v1 = make_version()
    v2 = make_version(template="Question: {{ question }}")

    created = prompt.move_label("prod", v1)
    promoted = prompt.move_label("prod", v2, reason="better on arith")
    rolled_back = prompt.move_label("prod", v1, reason="rollback")

    assert (created.from_version, created.to_version) == (None, v1)
    assert (promoted.from_version, promoted.to_version) == (v1, v2)
    assert (rolled_back.from_version, rolled_back.to_version) == (v2, v1)
    assert rolled_back.reason == "rollback"
    assert prompt.version_for_label("prod") == v1
    assert PromptLabel.objects.filter(prompt=prompt).count() == 1
    assert LabelMove.objects.filter(label__prompt=prompt).count() == 3
    # Newest first.
    assert list(LabelMove.objects.filter(label__prompt=prompt)) == [rolled_back, promoted, created]


def test_it_rejects_unknown_label_naming_the_prompt_and_known_labels(make_version: MakeVersion, prompt: Prompt) -> None:
    version = make_version()
    prompt.move_label("prod", version)
    prompt.move_label("staging", version)
    with pytest.raises(PromptLabel.DoesNotExist) as excinfo:
        prompt.version_for_label("canary")
    message = str(excinfo.value)
    assert "'qa'" in message
    assert "'canary'" in message
    assert "prod, staging" in message


def test_it_rejects_a_label_name_that_is_not_a_slug(make_version: MakeVersion, prompt: Prompt) -> None:
    version = make_version()
    with pytest.raises(ValidationError, match="lower-case"):
        prompt.move_label("Prod Label", version)
    assert not PromptLabel.objects.exists()


def test_it_rejects_moving_a_label_to_another_prompts_version(make_version: MakeVersion) -> None:
    version = make_version()
    other = Prompt.objects.create(name="other")
    with pytest.raises(ValidationError, match="does not belong"):
        other.move_label("prod", version)
    assert not PromptLabel.objects.exists()


def test_it_rejects_an_undeclared_template_variable(prompt: Prompt) -> None:
    with pytest.raises(ValidationError, match="undeclared variable.*context"):
        prompt.create_version(template="{{ question }} {{ context }}", variables=["question"])
    with pytest.raises(ValidationError, match="system message uses undeclared variable.*persona"):
        prompt.create_version(template="{{ question }}", system_message="You are {{ persona }}", variables=["question"])
    assert not PromptVersion.objects.exists()


@pytest.mark.parametrize(
    ("template", "system_message"),
    [
        ("{{ ''.__class__.__mro__ }}", ""),
        ("{{ cycler.__init__.__globals__ }}", ""),
        ("{{ question|attr('__class__') }}", ""),
        ("{{ question['__class__'] }}", ""),
        ("{{ question }}", "{{ ().__class__.__base__.__subclasses__() }}"),
    ],
)
def test_a_sandbox_escape_is_refused_and_nothing_is_stored(prompt: Prompt, template: str, system_message: str) -> None:
    with pytest.raises(ValidationError, match="private attribute '__"):
        prompt.create_version(template=template, system_message=system_message, variables=["question"])
    assert not PromptVersion.objects.exists()
    # Rendered directly, the sandbox stops it too.
    with pytest.raises(prompting.PromptTemplateError, match="unsafe"):
        prompting.render(template + system_message, {"question": "hi"})


def test_the_sandbox_stops_an_escape_the_parser_cannot_see() -> None:
    with pytest.raises(prompting.PromptTemplateError, match="unsafe operation"):
        prompting.render("{{ question|attr(name) }}", {"question": "hi", "name": "__class__"})


def test_ordinary_attribute_and_key_lookups_are_allowed(prompt: Prompt) -> None:
    version, created = prompt.create_version(
        template="{{ question.upper() }} {{ row['_id'] }} {{ row.title }}", variables=["question", "row"]
    )
    assert created
    messages = version.render_messages({"question": "hi", "row": {"_id": 7, "title": "t"}})
    assert messages[-1] == {"role": "user", "content": "HI 7 t"}


def test_render_messages_puts_system_then_examples_then_the_question(make_version: MakeVersion) -> None:
    version = make_version(
        system_message="Answer with a number.",
        examples=[{"inputs": {"question": "1+1?"}, "output": "2"}],
    )
    assert version.render_messages({"question": "2+2?"}) == [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "Q: 1+1?\nA:"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "Q: 2+2?\nA:"},
    ]


def test_it_rejects_an_example_missing_a_declared_variable(prompt: Prompt) -> None:
    with pytest.raises(ValidationError, match="example 1 lacks variable"):
        prompt.create_version(
            template="{{ question }}", variables=["question"], examples=[{"inputs": {}, "output": "x"}]
        )
    assert not PromptVersion.objects.exists()


def test_it_rejects_an_unknown_model_parameter(prompt: Prompt) -> None:
    with pytest.raises(ValidationError, match="unknown parameter"):
        prompt.create_version(template="{{ question }}", variables=["question"], params={"beam_width": 4})
    assert not PromptVersion.objects.exists()
