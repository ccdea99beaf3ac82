"""Fixtures for the API tests: a user per role, token-authenticated clients, a prompt with versions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from registry import access
from registry.models import (
    ApiToken,
    Dataset,
    DatasetItem,
    EvaluationRun,
    ItemResult,
    ModelArtifact,
    Prompt,
    PromptVersion,
    ScalingConfig,
    Stack,
)

ROLES = ("viewer", "editor", "deployer", "admin")


@pytest.fixture
def make_user(db: None) -> Callable[..., User]:
    def make(role: str | None, username: str | None = None) -> User:
        user = User.objects.create_user(username or f"{role or 'nobody'}-user", password="pw-123456-long")
        if role:
            access.grant_role(user, role)
        return user

    return make


@pytest.fixture
def client_for(make_user: Callable[..., User]) -> Callable[..., APIClient]:
    """client_for("editor") -> an APIClient sending a fresh write token of a new editor user."""

    made: dict[str, User] = {}

    def make(role: str | None, scope: str = ApiToken.Scope.WRITE, username: str | None = None) -> APIClient:
        key = username or f"{role or 'nobody'}-user"
        user = made.get(key) or make_user(role, key)
        made[key] = user
        _, raw = access.create_token(user, f"test {scope}", scope)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
        client.user = user  # type: ignore[attr-defined]
        return client

    return make


@pytest.fixture
def admin_api(client_for: Callable[..., APIClient]) -> APIClient:
    return client_for("admin")


@pytest.fixture
def editor_api(client_for: Callable[..., APIClient]) -> APIClient:
    return client_for("editor")


@pytest.fixture
def qa(db: None) -> Prompt:
    """Prompt `qa` with v1 and v2; production -> v1."""
    prompt = Prompt.objects.create(name="qa", description="question answering")
    v1, _ = prompt.create_version(template="Q: {{ question }}\nA:", variables=["question"], commit_message="v1")
    prompt.create_version(
        template="Answer briefly.\nQ: {{ question }}\nA:",
        variables=["question"],
        examples=[{"inputs": {"question": "1+1?"}, "output": "2"}],
        params={"max_new_tokens": 16},
        commit_message="v2",
    )
    prompt.move_label("production", v1, reason="first")
    return prompt


def version(prompt: Prompt, number: int) -> PromptVersion:
    return prompt.versions.get(number=number)


@pytest.fixture
def evaluated(qa: Prompt) -> dict[str, Any]:
    """Stacks for qa v1 and v2, a 3-item dataset `arith`, and a succeeded run of each (v2 fixes item q2)."""
    artifact = ModelArtifact.objects.create(
        name="tiny",
        sha256="a" * 64,
        path="/nonexistent/tiny",
        source_kind=ModelArtifact.SourceKind.ONNX,
        source_path="/nonexistent/tiny",
        source_sha256="b" * 64,
    )
    scaling = ScalingConfig.objects.create(name="greedy")
    dataset = Dataset.objects.create(name="arith", content_hash="c" * 64, item_count=3)
    items = [
        DatasetItem.objects.create(dataset=dataset, index=i, key=f"q{i + 1}", inputs={"question": q}, expected=e)
        for i, (q, e) in enumerate([("2+2?", "4"), ("3+3?", "6"), ("4+4?", "8")])
    ]
    runs = {}
    for number, answers in ((1, ["4", "5", "8"]), (2, ["4", "6", "8"])):
        v = version(qa, number)
        stack = Stack.objects.create(name=f"qa-v{number}", prompt_version=v, scaling=scaling, artifact=artifact)
        scores = [float(a == item.expected) for a, item in zip(answers, items, strict=True)]
        run = EvaluationRun.objects.create(
            stack=stack,
            dataset=dataset,
            prompt_version=v,
            artifact=artifact,
            status=EvaluationRun.Status.SUCCEEDED,
            items_total=3,
            items_done=3,
            summary={"accuracy": sum(scores) / 3, "latency_p50_s": 0.1 * number},
        )
        for item, answer, score in zip(items, answers, scores, strict=True):
            ItemResult.objects.create(
                run=run, item=item, rendered_prompt=f"Q: {item.inputs['question']}", answer=answer, score=score
            )
        runs[number] = run
    return {"artifact": artifact, "scaling": scaling, "dataset": dataset, "runs": runs, "items": items}
