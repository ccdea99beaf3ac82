"""The admin pages added for teams: diffs, label history with rollback, stack layers, run comparison, tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from registry import access
from registry.models import ApiToken, AuditEntry, EvaluationRun, LabelPolicy, Prompt, PromptLabel, Stack

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(make_user: Callable[..., User]) -> Callable[[str], Client]:
    def login(role: str) -> Client:
        user = make_user(role, f"staff-{role}")
        user.is_staff = True
        user.save()
        client = Client()
        client.force_login(user)
        return client

    return login


def test_prompt_page_shows_history_and_the_diff_is_side_by_side(admin_client: Client, qa: Prompt) -> None:
    page = admin_client.get(reverse("admin:registry_prompt_change", args=[qa.pk])).content.decode()
    assert "version history" in page.lower() and "v1 → v2" in page and "side-by-side diff" in page
    diff = admin_client.get(reverse("admin:registry_prompt_diff", args=[qa.pk]), {"a": 1, "b": 2})
    assert diff.status_code == 200
    html = diff.content.decode()
    assert 'class="insert"' in html or 'class="replace"' in html
    assert "Answer briefly." in html and "max_new_tokens" in html
    assert (
        admin_client.get(reverse("admin:registry_prompt_diff", args=[qa.pk]), {"a": "x", "b": "99"}).status_code == 200
    )


def test_label_history_with_one_click_rollback(admin_client: Client, qa: Prompt) -> None:
    qa.move_label("production", qa.versions.get(number=2), reason="v2")
    label = PromptLabel.objects.get(prompt=qa, name="production")
    url = reverse("admin:registry_promptlabel_history", args=[label.pk])
    page = admin_client.get(url).content.decode()
    assert "Roll back to v1" in page and "needs the <strong>deployer</strong> role" in page
    response = admin_client.post(url, {"to_version": "1", "reason": "bad"})
    assert response.status_code == 302
    label.refresh_from_db()
    assert label.version.number == 1
    entry = AuditEntry.objects.get(action="label.rollback")
    assert (entry.via, entry.details["from_version"], entry.details["to_version"]) == ("admin", 2, 1)


def test_rollback_refused_without_the_role(staff: Callable[[str], Client], qa: Prompt) -> None:
    qa.move_label("production", qa.versions.get(number=2))
    label = PromptLabel.objects.get(prompt=qa, name="production")
    editor = staff("editor")
    url = reverse("admin:registry_promptlabel_history", args=[label.pk])
    page = editor.get(url).content.decode()
    assert "Roll back to" not in page and "which you do not have" in page
    response = editor.post(url, {"to_version": "1"}, follow=True)
    assert "Rollback refused" in response.content.decode()
    label.refresh_from_db()
    assert label.version.number == 2


def test_label_form_applies_the_role_and_the_gate(
    staff: Callable[[str], Client], admin_client: Client, evaluated: dict[str, Any], qa: Prompt
) -> None:
    label = PromptLabel.objects.get(prompt=qa, name="production")
    url = reverse("admin:registry_promptlabel_change", args=[label.pk])
    v2 = qa.versions.get(number=2)
    form = {"version": v2.pk, "reason": "try", "moves-TOTAL_FORMS": "0", "moves-INITIAL_FORMS": "0"}
    refused = staff("editor").post(url, form)
    assert refused.status_code == 200 and "you need the deployer role" in refused.content.decode()
    LabelPolicy.objects.filter(label="production", prompt=None).update(gate_dataset="arith")
    v3, _ = qa.create_version(template="v3 {{ question }}", variables=["question"])
    gated = admin_client.post(url, {**form, "version": v3.pk})
    assert gated.status_code == 200 and "promotion gate" in gated.content.decode()
    assert admin_client.post(url, form).status_code == 302
    label.refresh_from_db()
    assert label.version == v2


def test_stack_page_shows_four_layers(admin_client: Client, evaluated: dict[str, Any]) -> None:
    stack = Stack.objects.get(name="qa-v2")
    html = admin_client.get(reverse("admin:registry_stack_change", args=[stack.pk])).content.decode()
    assert html.count('class="fulcrum-layer"') == 4
    for layer in ("prompt", "inference scaling", "fine-tune", "architecture"):
        assert layer in html


def test_run_page_and_comparison(admin_client: Client, evaluated: dict[str, Any]) -> None:
    run1, run2 = evaluated["runs"][1], evaluated["runs"][2]
    page = admin_client.get(reverse("admin:registry_evaluationrun_change", args=[run2.pk])).content.decode()
    assert 'class="fulcrum-metrics"' in page and "accuracy" in page and "<progress" in page
    assert 'http-equiv="refresh"' not in page
    EvaluationRun.objects.filter(pk=run2.pk).update(status="running")
    running = admin_client.get(reverse("admin:registry_evaluationrun_change", args=[run2.pk])).content.decode()
    assert 'http-equiv="refresh"' in running
    url = reverse("admin:registry_evaluationrun_compare")
    compare = admin_client.get(url, {"a": run1.pk, "b": run2.pk}).content.decode()
    assert '<strong id="disagreement-count">1</strong>' in compare
    assert "fulcrum-fixed" in compare and "<svg" in compare and "metric-deltas" in compare
    action = admin_client.post(
        reverse("admin:registry_evaluationrun_changelist"),
        {"action": "compare_selected", "_selected_action": [run1.pk, run2.pk]},
    )
    assert action.status_code == 302 and "compare" in action["Location"]
    assert admin_client.get(url, {"a": "zz", "b": "-1"}).status_code == 200


def test_token_admin_shows_the_secret_once(admin_client: Client, make_user: Callable[..., User]) -> None:
    owner = make_user("editor", "owner")
    response = admin_client.post(
        reverse("admin:registry_apitoken_add"),
        {"user": owner.pk, "name": "ci", "scope": "write"},
        follow=True,
    )
    assert response.status_code == 200
    text = response.content.decode()
    token = ApiToken.objects.get(name="ci")
    assert f"flc_{token.prefix}_" in text and "not shown again" in text
    assert access.authenticate_token(text.split("Token ci: ")[1].split(" ")[0]) == token
    admin_client.post(
        reverse("admin:registry_apitoken_changelist"), {"action": "revoke", "_selected_action": [token.pk]}
    )
    token.refresh_from_db()
    assert token.revoked_at is not None
    audit = admin_client.get(reverse("admin:registry_auditentry_changelist")).content.decode()
    assert "token.revoke" in audit and "apitoken.create" in audit


def test_bulk_admin_deletions_are_audited(admin_client: Client, db: None) -> None:
    Prompt.objects.create(name="p1")
    Prompt.objects.create(name="p2")
    response = admin_client.post(
        reverse("admin:registry_prompt_changelist"),
        {
            "action": "delete_selected",
            "_selected_action": list(Prompt.objects.values_list("pk", flat=True)),
            "post": "yes",
        },
    )
    assert response.status_code == 302
    assert sorted(AuditEntry.objects.filter(action="prompt.delete").values_list("object_repr", flat=True)) == [
        "p1",
        "p2",
    ]


@pytest.mark.parametrize("model", ["apitoken", "auditentry", "labelpolicy", "tag"])
def test_new_admin_pages_render(admin_client: Client, qa: Prompt, model: str) -> None:
    assert admin_client.get(reverse(f"admin:registry_{model}_changelist")).status_code == 200
