"""Prompts, versions, diffs and serving through the API."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from rest_framework.test import APIClient

from registry.models import AuditEntry, Prompt, PromptVersion

pytestmark = pytest.mark.django_db

VERSIONS = "/api/prompts/qa/versions/"


def test_prompt_crud_tags_and_filters(editor_api: APIClient, admin_api: APIClient) -> None:
    created = editor_api.post(
        "/api/prompts/", {"name": "summarise", "description": "short", "tags": ["team-a", "beta"]}
    )
    assert created.status_code == 201, created.data
    assert created.data["tags"] == ["beta", "team-a"] or sorted(created.data["tags"]) == ["beta", "team-a"]
    editor_api.post("/api/prompts/", {"name": "other", "tags": ["team-b"]})
    names = [p["name"] for p in editor_api.get("/api/prompts/", {"tag": "team-a"}).data["results"]]
    assert names == ["summarise"]
    patched = editor_api.patch("/api/prompts/summarise/", {"description": "longer", "tags": ["team-b"]}, format="json")
    assert patched.status_code == 200
    assert patched.data["description"] == "longer" and patched.data["tags"] == ["team-b"]
    renamed = editor_api.patch("/api/prompts/summarise/", {"name": "x"}, format="json")
    assert renamed.status_code == 400
    assert renamed.data["errors"][0]["field"] == "name"
    assert editor_api.delete("/api/prompts/other/").status_code == 403  # deletion needs admin
    assert admin_api.delete("/api/prompts/other/").status_code == 204
    actions = list(AuditEntry.objects.order_by("id").values_list("action", "object_repr", "username"))
    assert ("prompt.create", "summarise", "editor-user") in actions
    assert ("prompt.update", "summarise", "editor-user") in actions
    assert ("prompt.delete", "other", "admin-user") in actions


def test_filter_prompts_by_label(editor_api: APIClient, qa: Prompt) -> None:
    Prompt.objects.create(name="unlabelled")
    assert [p["name"] for p in editor_api.get("/api/prompts/", {"label": "production"}).data["results"]] == ["qa"]
    detail = editor_api.get("/api/prompts/qa/").data
    assert detail["labels"] == {"production": 1}
    assert detail["latest_version"] == 2 and detail["version_count"] == 2


def test_unicode_names_are_refused_but_unicode_content_round_trips(editor_api: APIClient, qa: Prompt) -> None:
    bad = editor_api.post("/api/prompts/", {"name": "résumé-ü"}, format="json")
    assert bad.status_code == 400
    assert bad.data["errors"][0]["field"] == "name"
    assert editor_api.get("/api/prompts/r%C3%A9sum%C3%A9/").status_code == 404
    ok = editor_api.post(
        "/api/prompts/", {"name": "resume", "description": "Zusammenfassung · 要約 · 🚀"}, format="json"
    )
    assert ok.status_code == 201
    content = {"template": "Résumé : {{ texte }} → 要約", "variables": ["texte"], "system_message": "Sois bref 🚀"}
    made = editor_api.post("/api/prompts/resume/versions/", content, format="json")
    assert made.status_code == 201, made.data
    assert editor_api.get("/api/prompts/resume/versions/1/").data["template"] == content["template"]


def test_version_created_twice_with_identical_content_is_one_row(editor_api: APIClient, qa: Prompt) -> None:
    body = {"template": "New: {{ question }}", "variables": ["question"], "commit_message": "try"}
    first = editor_api.post(VERSIONS, body, format="json")
    second = editor_api.post(VERSIONS, {**body, "commit_message": "again"}, format="json")
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.data["number"] == second.data["number"] == 3
    assert PromptVersion.objects.filter(prompt=qa, template="New: {{ question }}").count() == 1
    assert AuditEntry.objects.filter(action="version.create").count() == 1
    assert first.data["created_by"] == "editor-user"
    assert first.data["parent"] == 2


def test_versions_are_immutable(editor_api: APIClient, admin_api: APIClient, qa: Prompt) -> None:
    for client in (editor_api, admin_api):
        assert client.patch(f"{VERSIONS}1/", {"template": "x"}, format="json").status_code == 405
        assert client.put(f"{VERSIONS}1/", {"template": "x"}, format="json").status_code == 405


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"template": "{{ ''.__class__ }}", "variables": []}, "template"),
        ({"template": "{{ ''.__class__.__mro__[1].__subclasses__() }}", "variables": []}, "template"),
        ({"template": "{{ cycler.__init__.__globals__.os }}", "variables": []}, "template"),
        ({"template": "{{ question|attr('__class__') }}", "variables": ["question"]}, "template"),
        ({"template": "{{ question['__class__'] }}", "variables": ["question"]}, "template"),
        (
            {"template": "ok {{ question }}", "system_message": "{{ x.__class__ }}", "variables": ["question"]},
            "system_message",
        ),
        ({"template": "{{ question }", "variables": ["question"]}, "template"),
        ({"template": "{{ undeclared }}", "variables": []}, "template"),
        ({"template": "   ", "variables": []}, "template"),
        ({"template": "{{ q }}", "variables": ["q"], "params": {"evil": 1}}, "params"),
        ({"template": "{{ q }}", "variables": ["q"], "params": []}, "params"),
        ({"template": "{{ q }}", "variables": ["q"], "examples": [{"inputs": {}}]}, "examples"),
        ({"template": "{{ q }}", "variables": ["not an identifier"]}, "variables"),
        ({"template": "{{ q }}", "variables": ["q"], "examples": {"a": 1}}, "examples"),
        ({"template": "{{ q }}\x00", "variables": ["q"]}, "template"),
        ({"template": "{{ q }}", "variables": ["q"], "params": {"max_new_tokens": "\x00"}}, "params"),
        ({"template": "x" * 100_001, "variables": []}, "template"),
        (
            {"template": "{{ q }}", "variables": ["q"], "examples": [{"inputs": {"q": "x"}, "output": "y"}] * 101},
            "examples",
        ),
        ({"variables": ["q"]}, "template"),
        ({"template": "{{ q }}", "variables": ["q"], "parent": 99}, "parent"),
    ],
)
def test_bad_versions_are_refused_with_a_field_and_a_message(
    editor_api: APIClient, qa: Prompt, payload: dict[str, object], field: str
) -> None:
    response = editor_api.post(VERSIONS, payload, format="json")
    assert response.status_code == 400, response.data
    assert response.data["status"] == 400 and response.data["code"] == "invalid"
    assert response.data["errors"][0]["field"].split(".")[0].split("[")[0] == field, response.data
    assert response.data["errors"][0]["message"]
    assert qa.versions.count() == 2


def test_oversized_request_body_is_a_client_error(editor_api: APIClient, qa: Prompt) -> None:
    huge = {"template": "{{ q }}", "variables": ["q"], "commit_message": "x" * 3_000_000}
    response = editor_api.post(VERSIONS, huge, format="json")
    assert 400 <= response.status_code < 500


def test_delete_version_in_use_is_refused_and_a_deleted_version_is_gone(admin_api: APIClient, qa: Prompt) -> None:
    in_use = admin_api.delete(f"{VERSIONS}1/")
    assert in_use.status_code == 409 and in_use.data["code"] == "in_use"
    assert admin_api.delete(f"{VERSIONS}2/").status_code == 204
    assert admin_api.get(f"{VERSIONS}2/").status_code == 410
    assert admin_api.get("/api/serve/qa/", {"version": 2}).status_code == 410
    assert admin_api.get("/api/serve/qa/", {"version": 3}).status_code == 404
    # The number of a deleted version is never given to other content.
    again = admin_api.post(VERSIONS, {"template": "other {{ q }}", "variables": ["q"]}, format="json")
    assert again.data["number"] == 3


def test_diff_between_versions(editor_api: APIClient, qa: Prompt) -> None:
    diff = editor_api.get("/api/prompts/qa/diff/", {"from_version": 1, "to_version": 2}).data
    assert diff["template"]["changed"] and "+Answer briefly." in diff["template"]["unified"]
    assert not diff["system_message"]["changed"]
    assert diff["examples"]["added"] == [{"index": 0, "example": {"inputs": {"question": "1+1?"}, "output": "2"}}]
    assert diff["params"]["added"] == {"max_new_tokens": 16}
    assert not diff["identical"]
    same = editor_api.get("/api/prompts/qa/diff/", {"from_version": 2, "to_version": 2}).data
    assert same["identical"]
    missing = editor_api.get("/api/prompts/qa/diff/", {"from_version": 1, "to_version": 9})
    assert missing.status_code == 400 and missing.data["errors"][0]["field"] == "to_version"
    assert editor_api.get("/api/prompts/qa/diff/", {"from_version": "x", "to_version": 1}).status_code == 400


# --- serving ---------------------------------------------------------------------------------------------------


def test_serve_by_label_with_etag_and_not_modified(client_for: Callable[..., APIClient], qa: Prompt) -> None:
    reader = client_for("viewer", scope="read")
    first = reader.get("/api/serve/qa/")
    assert first.status_code == 200
    assert first.data["version"] == 1 and first.data["label"] == "production"
    v1 = qa.versions.get(number=1)
    assert first["ETag"] == f'"{v1.content_hash}"'
    again = reader.get("/api/serve/qa/", HTTP_IF_NONE_MATCH=first["ETag"])
    assert again.status_code == 304
    assert reader.get("/api/serve/qa/", HTTP_IF_NONE_MATCH='W/"nope", ' + first["ETag"]).status_code == 304
    assert reader.get("/api/serve/qa/", HTTP_IF_NONE_MATCH='"other"').status_code == 200


def test_a_label_move_is_visible_on_the_very_next_request(client_for: Callable[..., APIClient], qa: Prompt) -> None:
    reader, deployer = client_for("viewer", scope="read"), client_for("deployer")
    etag = reader.get("/api/serve/qa/")["ETag"]
    moved = deployer.post("/api/prompts/qa/labels/production/move/", {"version": 2, "reason": "better"}, format="json")
    assert moved.status_code == 200, moved.data
    after = reader.get("/api/serve/qa/", HTTP_IF_NONE_MATCH=etag)
    assert after.status_code == 200 and after.data["version"] == 2


def test_serve_rendered_and_by_version(editor_api: APIClient, qa: Prompt) -> None:
    rendered = editor_api.get("/api/serve/qa/", {"version": 2, "inputs": '{"question": "5+5?"}'})
    assert rendered.status_code == 200
    assert rendered.data["label"] is None and rendered.data["version"] == 2
    assert rendered.data["messages"][-1] == {"role": "user", "content": "Answer briefly.\nQ: 5+5?\nA:"}
    assert rendered["ETag"] != f'"{qa.versions.get(number=2).content_hash}"'
    for params in (
        {"inputs": '{"wrong": 1}'},
        {"inputs": "not json"},
        {"inputs": "[1]"},
        {"label": "production", "version": 1},
        {"label": "Bad Label"},
        {"version": 0},
        {"version": "99999999999999999999"},
    ):
        response = editor_api.get("/api/serve/qa/", params)
        assert response.status_code == 400, (params, response.data)
    assert editor_api.get("/api/serve/qa/", {"label": "staging"}).status_code == 404
    assert editor_api.get("/api/serve/nope/").status_code == 404


def test_a_deleted_label_is_gone_on_the_next_request(client_for: Callable[..., APIClient], qa: Prompt) -> None:
    deployer = client_for("deployer")
    assert deployer.get("/api/serve/qa/").status_code == 200
    assert deployer.delete("/api/prompts/qa/labels/production/").status_code == 204
    assert deployer.get("/api/serve/qa/").status_code == 404


def test_a_computed_dunder_lookup_is_stopped_by_the_sandbox_when_rendering(editor_api: APIClient, qa: Prompt) -> None:
    body = {"template": "{{ question[key] }}", "variables": ["question", "key"]}
    made = editor_api.post(VERSIONS, body, format="json")
    assert made.status_code == 201  # the parser cannot see a computed name; the sandbox stops it at render time
    number = made.data["number"]
    params = {"version": number, "inputs": '{"question": "x", "key": "__class__"}'}
    response = editor_api.get("/api/serve/qa/", params)
    assert response.status_code == 400 and "unsafe" in response.data["message"], response.data
    ok = editor_api.get("/api/serve/qa/", {"version": number, "inputs": '{"question": {"a": "b"}, "key": "a"}'})
    assert ok.status_code == 200 and ok.data["messages"][-1]["content"] == "b"
