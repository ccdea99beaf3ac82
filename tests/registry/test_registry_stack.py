"""A stack pins a prompt version, or follows a prompt's label: never both, never neither."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from registry.models import ModelArtifact, Prompt, PromptVersion, ScalingConfig, Stack

pytestmark = pytest.mark.django_db


@pytest.fixture
def parts(
    make_version: Callable[..., PromptVersion], make_artifact: Callable[..., ModelArtifact], prompt: Prompt
) -> dict[str, Any]:
    version = make_version()
    prompt.move_label("prod", version)
    return {
        "version": version,
        "prompt": prompt,
        "scaling": ScalingConfig.objects.create(name="greedy"),
        "artifact": make_artifact(),
    }


def test_a_stack_may_pin_a_version(parts: dict[str, Any]) -> None:
    stack = Stack.objects.create(
        name="pinned", prompt_version=parts["version"], scaling=parts["scaling"], artifact=parts["artifact"]
    )
    assert stack.resolve_prompt_version() == parts["version"]


def test_a_stack_may_follow_a_label(parts: dict[str, Any]) -> None:
    stack = Stack.objects.create(
        name="follow",
        prompt=parts["prompt"],
        prompt_label="prod",
        scaling=parts["scaling"],
        artifact=parts["artifact"],
    )
    assert stack.resolve_prompt_version() == parts["version"]
    assert stack.describe_prompt() == "qa:prod"


@pytest.mark.parametrize(
    "prompt_fields",
    [
        pytest.param({"version": True, "prompt": True, "label": "prod"}, id="version-and-label"),
        pytest.param({"version": False, "prompt": False, "label": ""}, id="neither"),
        pytest.param({"version": False, "prompt": True, "label": ""}, id="prompt-without-label"),
        pytest.param({"version": True, "prompt": False, "label": "prod"}, id="version-with-stray-label"),
    ],
)
def test_the_database_refuses_a_stack_without_exactly_one_way_to_find_its_prompt(
    parts: dict[str, Any], prompt_fields: dict[str, Any]
) -> None:
    stack = Stack(
        name="bad",
        prompt_version=parts["version"] if prompt_fields["version"] else None,
        prompt=parts["prompt"] if prompt_fields["prompt"] else None,
        prompt_label=prompt_fields["label"],
        scaling=parts["scaling"],
        artifact=parts["artifact"],
    )
    with pytest.raises(ValidationError):
        stack.full_clean()
    with pytest.raises(IntegrityError, match="stack_prompt_by_version_xor_label"), transaction.atomic():
        stack.save()
    assert not Stack.objects.filter(name="bad").exists()
