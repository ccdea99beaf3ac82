"""Label moves, history, rollback, the production role and the promotion gate."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from rest_framework.test import APIClient

from registry.models import AuditEntry, LabelMove, LabelPolicy, Prompt, PromptLabel

LABELS = "/api/prompts/qa/labels/"


@pytest.mark.django_db
def test_move_history_and_rollback(client_for: Callable[..., APIClient], qa: Prompt) -> None:
    deployer = client_for("deployer")
    moved = deployer.post(f"{LABELS}production/move/", {"version": 2, "reason": "v2 is better"}, format="json")
    assert moved.status_code == 200, moved.data
    assert (moved.data["from_version"], moved.data["to_version"], moved.data["moved_by"]) == (1, 2, "deployer-user")
    history = deployer.get(f"{LABELS}production/history/").data["results"]
    assert [(h["from_version"], h["to_version"], h["reason"]) for h in history] == [
        (1, 2, "v2 is better"),
        (None, 1, "first"),
    ]
    rolled = deployer.post(f"{LABELS}production/rollback/", {"reason": "v2 regressed"}, format="json")
    assert rolled.status_code == 200, rolled.data
    assert (rolled.data["from_version"], rolled.data["to_version"]) == (2, 1)
    assert deployer.get("/api/serve/qa/").data["version"] == 1
    entries = AuditEntry.objects.filter(object_type="promptlabel").order_by("id")
    assert [(e.action, e.details["from_version"], e.details["to_version"], e.username) for e in entries] == [
        ("label.move", 1, 2, "deployer-user"),
        ("label.rollback", 2, 1, "deployer-user"),
    ]
    # Rolling back to a version the label never held is refused; so is a rollback with nothing before.
    never = deployer.post(f"{LABELS}production/rollback/", {"to_version": 2}, format="json")
    assert never.status_code == 200  # v2 was held before
    qa.create_version(template="v3 {{ question }}", variables=["question"])
    refused = deployer.post(f"{LABELS}production/rollback/", {"to_version": 3}, format="json")
    assert refused.status_code == 400
    deployer.post(f"{LABELS}staging/move/", {"version": 3}, format="json")
    assert deployer.post(f"{LABELS}staging/rollback/", {}, format="json").status_code == 400


@pytest.mark.django_db
def test_new_label_and_listing(editor_api: APIClient, qa: Prompt) -> None:
    made = editor_api.post(f"{LABELS}staging/move/", {"version": 2}, format="json")
    assert made.status_code == 200 and made.data["from_version"] is None
    labels = editor_api.get(LABELS).data["results"]
    assert [(label["name"], label["version"]) for label in labels] == [("production", 1), ("staging", 2)]
    assert editor_api.get("/api/label-moves/", {"label": "staging"}).data["count"] == 1
    assert editor_api.post(f"{LABELS}staging/move/", {"version": 9}, format="json").status_code == 400
    assert editor_api.post(f"{LABELS}BAD/move/", {"version": 1}, format="json").status_code == 404
    assert editor_api.post("/api/prompts/nope/labels/x/move/", {"version": 1}, format="json").status_code == 404


@pytest.mark.django_db
@pytest.mark.parametrize(("role", "expected"), [("viewer", 403), ("editor", 403), ("deployer", 200), ("admin", 200)])
def test_moving_production_needs_the_deployer_role(
    client_for: Callable[..., APIClient], qa: Prompt, role: str, expected: int
) -> None:
    response = client_for(role).post(f"{LABELS}production/move/", {"version": 2}, format="json")
    assert response.status_code == expected, response.data
    if expected == 403:
        assert PromptLabel.objects.get(prompt=qa, name="production").version.number == 1
        assert ("deployer" if role == "editor" else "editor") in response.data["message"]


@pytest.mark.django_db
def test_a_read_token_never_writes_even_for_an_admin(client_for: Callable[..., APIClient], qa: Prompt) -> None:
    reader = client_for("admin", scope="read")
    response = reader.post(f"{LABELS}production/move/", {"version": 2}, format="json")
    assert response.status_code == 403 and "read-only" in response.data["message"]
    assert reader.get(LABELS).status_code == 200


@pytest.mark.django_db
def test_a_policy_can_restrict_any_label_to_a_role(
    client_for: Callable[..., APIClient], admin_api: APIClient, qa: Prompt
) -> None:
    made = admin_api.post(
        "/api/label-policies/", {"prompt": "qa", "label": "canary", "required_role": "admin"}, format="json"
    )
    assert made.status_code == 201, made.data
    assert client_for("deployer").post(f"{LABELS}canary/move/", {"version": 2}, format="json").status_code == 403
    assert admin_api.post(f"{LABELS}canary/move/", {"version": 2}, format="json").status_code == 200
    # Only admins write policies.
    assert client_for("deployer").post("/api/label-policies/", {"label": "x"}, format="json").status_code == 403
    duplicate = admin_api.post("/api/label-policies/", {"prompt": "qa", "label": "canary"}, format="json")
    assert duplicate.status_code == 400


@pytest.mark.django_db
def test_promotion_gate_needs_an_evaluation_not_worse_than_the_current_one(
    client_for: Callable[..., APIClient], evaluated: dict[str, Any], qa: Prompt
) -> None:
    LabelPolicy.objects.filter(prompt=None, label="production").update(gate_dataset="arith", gate_metric="accuracy")
    deployer = client_for("deployer")
    v3, _ = qa.create_version(template="v3 {{ question }}", variables=["question"])
    unevaluated = deployer.post(f"{LABELS}production/move/", {"version": 3}, format="json")
    assert unevaluated.status_code == 409 and unevaluated.data["code"] == "gate_failed"
    assert "no succeeded evaluation" in unevaluated.data["message"]

    better = deployer.post(f"{LABELS}production/move/", {"version": 2}, format="json")  # v2 accuracy 1.0 >= 0.67
    assert better.status_code == 200, better.data
    gate = AuditEntry.objects.filter(action="label.move").latest("id").details["gate"]
    assert gate["passed"] and gate["target_value"] == 1.0

    worse = deployer.post(f"{LABELS}production/move/", {"version": 1}, format="json")  # v1 is worse than v2
    assert worse.status_code == 409 and worse.data["gate"]["current_value"] == 1.0
    assert PromptLabel.objects.get(prompt=qa, name="production").version.number == 2
    # A rollback is not gated: v1 was in production before.
    assert deployer.post(f"{LABELS}production/rollback/", {}, format="json").status_code == 200
    # Within the tolerance, a slightly worse version passes.
    LabelPolicy.objects.filter(prompt=None, label="production").update(tolerance=0.5)
    assert deployer.post(f"{LABELS}production/move/", {"version": 2}, format="json").status_code == 200
    assert deployer.post(f"{LABELS}production/move/", {"version": 1}, format="json").status_code == 200


@pytest.mark.django_db
def test_conditional_move_conflicts_when_the_label_moved(editor_api: APIClient, qa: Prompt) -> None:
    body = {"version": 2, "expected_version": 1}
    assert (
        editor_api.post(f"{LABELS}staging/move/", {**body, "expected_version": None}, format="json").status_code == 200
    )
    stale = editor_api.post(f"{LABELS}staging/move/", {"version": 1, "expected_version": None}, format="json")
    assert stale.status_code == 409 and stale.data["code"] == "label_moved"


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_moves_of_one_label_one_wins_and_history_stays_consistent(
    client_for: Callable[..., APIClient], qa: Prompt
) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("row locks need PostgreSQL")
    qa.create_version(template="v3 {{ question }}", variables=["question"])
    clients = [client_for("deployer", username=f"deployer-{i}") for i in range(2)]
    barrier = threading.Barrier(2)
    codes: dict[int, int] = {}

    def move(index: int, target: int) -> None:
        try:
            barrier.wait()
            body = {"version": target, "expected_version": 1, "reason": f"mover {index}"}
            codes[index] = clients[index].post(f"{LABELS}production/move/", body, format="json").status_code
        finally:
            connection.close()

    threads = [threading.Thread(target=move, args=(i, i + 2)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(codes.values()) == [200, 409]
    winner = 2 if codes[0] == 200 else 3
    label = PromptLabel.objects.get(prompt=qa, name="production")
    assert label.version.number == winner
    moves = list(LabelMove.objects.filter(label=label).order_by("moved_at", "id"))
    assert len(moves) == 2
    # An unbroken chain: each move starts where the previous one ended, and the last ends at the label.
    for before, after in zip(moves, moves[1:], strict=False):
        assert after.from_version_id == before.to_version_id
    assert moves[-1].to_version_id == label.version_id


@pytest.mark.django_db(transaction=True)
def test_unconditional_concurrent_moves_serialise(client_for: Callable[..., APIClient], qa: Prompt) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("row locks need PostgreSQL")
    clients = [client_for("deployer", username=f"deployer-{i}") for i in range(4)]
    barrier = threading.Barrier(4)
    codes: list[int] = []

    def move(index: int) -> None:
        try:
            barrier.wait()
            response = clients[index].post(f"{LABELS}fresh/move/", {"version": 1 + index % 2}, format="json")
            codes.append(response.status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=move, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert codes == [200] * 4
    label = PromptLabel.objects.get(prompt=qa, name="fresh")
    moves = list(LabelMove.objects.filter(label=label).order_by("moved_at", "id"))
    assert len(moves) == 4 and moves[0].from_version is None
    for before, after in zip(moves, moves[1:], strict=False):
        assert after.from_version_id == before.to_version_id
    assert moves[-1].to_version_id == label.version_id
