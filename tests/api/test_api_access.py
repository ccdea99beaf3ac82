"""Authentication, tokens, roles, the audit log, error bodies and the committed OpenAPI schema."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from django.contrib.auth.models import User
from django.test import Client
from rest_framework.test import APIClient

from registry import access
from registry.models import ApiToken, AuditEntry, Prompt

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parents[2]


def test_unauthenticated_and_bad_tokens_get_401_with_the_error_body(qa: Prompt) -> None:
    anonymous = APIClient()
    response = anonymous.get("/api/prompts/")
    assert response.status_code == 401
    assert response.data == {
        "status": 401,
        "code": "not_authenticated",
        "message": response.data["message"],
        "errors": [{"field": None, "message": response.data["message"]}],
    }
    assert response["WWW-Authenticate"].startswith("Bearer")
    for header in ("Bearer nope", "Bearer flc_0000_secret", "Bearer", "Bearer a b", "Token flc_ü"):
        anonymous.credentials(HTTP_AUTHORIZATION=header)
        assert anonymous.get("/api/serve/qa/").status_code == 401, header


def test_a_user_without_a_role_can_do_nothing(client_for: Callable[..., APIClient], qa: Prompt) -> None:
    nobody = client_for(None)
    response = nobody.get("/api/prompts/")
    assert response.status_code == 403 and "no role" in response.data["message"]


def test_token_is_shown_once_stored_hashed_and_revocable(client_for: Callable[..., APIClient], qa: Prompt) -> None:
    editor = client_for("editor")
    made = editor.post("/api/tokens/", {"name": "search-service", "scope": "read"}, format="json")
    assert made.status_code == 201
    secret = made.data["token"]
    assert secret.startswith("flc_") and made.data["prefix"] in secret
    stored = ApiToken.objects.get(pk=made.data["id"])
    assert secret not in (stored.digest, stored.prefix) and len(stored.digest) == 64
    listed = editor.get("/api/tokens/").data["results"]
    assert all("token" not in t for t in listed)
    assert editor.get(f"/api/tokens/{made.data['id']}/").data.get("token") is None

    service = APIClient()
    service.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert service.get("/api/serve/qa/").status_code == 200
    assert service.get("/api/me/").data == {"username": "editor-user", "role": "viewer", "token_scope": "read"}
    assert service.post("/api/tokens/", {"name": "escalate", "scope": "write"}, format="json").status_code == 403

    assert editor.delete(f"/api/tokens/{made.data['id']}/").status_code == 204
    assert service.get("/api/serve/qa/").status_code == 401
    actions = list(AuditEntry.objects.filter(object_type="apitoken").values_list("action", flat=True).order_by("id"))
    assert actions == ["token.create", "token.revoke"]


def test_tokens_of_others_are_private_and_write_tokens_need_an_editor(
    client_for: Callable[..., APIClient], make_user: Callable[..., User]
) -> None:
    viewer = client_for("viewer")
    assert viewer.post("/api/tokens/", {"name": "w", "scope": "write"}, format="json").status_code == 403
    assert viewer.post("/api/tokens/", {"name": "r", "scope": "read"}, format="json").status_code == 201
    other = make_user("editor", "someone")
    token, _ = access.create_token(other, "theirs")
    assert viewer.get(f"/api/tokens/{token.pk}/").status_code == 404
    assert viewer.delete(f"/api/tokens/{token.pk}/").status_code == 404
    admin = client_for("admin")
    assert admin.get("/api/tokens/", {"all": "true"}).data["count"] >= 3
    assert admin.delete(f"/api/tokens/{token.pk}/").status_code == 204


def test_expired_token_is_refused(make_user: Callable[..., User], qa: Prompt) -> None:
    from datetime import timedelta

    from django.utils import timezone

    _, raw = access.create_token(make_user("viewer"), "old", expires_at=timezone.now() - timedelta(seconds=1))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert client.get("/api/serve/qa/").status_code == 401


def test_audit_log_lists_every_write_with_user_and_token(client_for: Callable[..., APIClient], qa: Prompt) -> None:
    editor = client_for("editor")
    editor.post("/api/prompts/", {"name": "p1"}, format="json")
    editor.post("/api/prompts/p1/versions/", {"template": "hi", "variables": []}, format="json")
    editor.post("/api/prompts/p1/labels/staging/move/", {"version": 1}, format="json")
    log = editor.get("/api/audit/", {"user": "editor-user"}).data["results"]
    assert [e["action"] for e in log] == ["label.move", "version.create", "prompt.create"]
    assert all(e["via"] == "api" and e["token"] for e in log)
    assert editor.get("/api/audit/", {"action": "label.move"}).data["count"] == 1
    assert editor.get("/api/audit/", {"since": "not a date"}).status_code == 400


def test_admin_writes_are_audited_too(admin_client: Client, qa: Prompt) -> None:
    response = admin_client.post(
        "/admin/registry/prompt/add/", {"name": "from-admin", "description": "x", **_inline_data()}
    )
    assert response.status_code == 302, response.content[:2000]
    entry = AuditEntry.objects.get(action="prompt.create")
    assert (entry.via, entry.object_repr, entry.username) == ("admin", "from-admin", "admin")


def _inline_data() -> dict[str, str]:
    data = {}
    for prefix in ("labels", "versions"):
        data.update({f"{prefix}-TOTAL_FORMS": "0", f"{prefix}-INITIAL_FORMS": "0", f"{prefix}-MAX_NUM_FORMS": "1000"})
    return data


def test_pagination_and_bad_pages(editor_api: APIClient) -> None:
    for i in range(7):
        Prompt.objects.create(name=f"p{i}")
    page = editor_api.get("/api/prompts/", {"page_size": 3, "page": 2}).data
    assert page["count"] == 7 and len(page["results"]) == 3 and page["next"] and page["previous"]
    assert editor_api.get("/api/prompts/", {"page": 99}).status_code == 404
    assert editor_api.get("/api/prompts/", {"page": "x"}).status_code == 404
    assert len(editor_api.get("/api/prompts/", {"page_size": 10_000}).data["results"]) == 7


def test_nul_in_query_is_a_client_error(editor_api: APIClient) -> None:
    assert editor_api.get("/api/prompts/", {"tag": "a\x00b"}).status_code == 400


def test_committed_schema_matches_the_served_schema(editor_api: APIClient) -> None:
    served = editor_api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi")
    assert served.status_code == 200
    committed = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text(encoding="utf-8"))
    assert yaml.safe_load(served.content) == committed, (
        "docs/openapi.yaml is out of date: run `DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres "
        "python manage.py spectacular --file docs/openapi.yaml`"
    )
