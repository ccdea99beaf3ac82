"""Artifacts, fine-tunes, scaling configs, stacks, datasets and evaluation runs through the API."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from registry.models import AuditEntry, Dataset, DatasetItem, EvaluationRun, Prompt, Stack

pytestmark = pytest.mark.django_db

GOOD_JSONL = '{"id": "a", "question": "2+2?", "expected": "4"}\n{"id": "b", "question": "3+3?", "expected": 6}\n'


def artifact_body(**overrides: Any) -> dict[str, Any]:
    body = {
        "name": "tiny",
        "sha256": "1" * 64,
        "path": "/models/tiny",
        "source_kind": "onnx",
        "source_path": "/models/tiny",
        "source_sha256": "2" * 64,
        "tags": ["small"],
    }
    body.update(overrides)
    return body


def test_artifacts_fine_tunes_scaling_and_stacks(
    client_for: Callable[..., APIClient], admin_api: APIClient, editor_api: APIClient, qa: Prompt
) -> None:
    assert editor_api.post("/api/artifacts/", artifact_body(), format="json").status_code == 403  # admins register
    base = admin_api.post("/api/artifacts/", artifact_body(), format="json")
    assert base.status_code == 201, base.data
    tuned = admin_api.post(
        "/api/artifacts/", artifact_body(name="tuned", sha256="3" * 64, parent=base.data["id"]), format="json"
    )
    assert tuned.status_code == 201
    assert editor_api.get("/api/artifacts/", {"tag": "small"}).data["count"] == 2
    assert editor_api.get("/api/artifacts/", {"parent": base.data["id"]}).data["count"] == 1
    frozen = editor_api.patch(f"/api/artifacts/{base.data['id']}/", {"sha256": "9" * 64}, format="json")
    assert frozen.status_code == 400 and frozen.data["errors"][0]["field"] == "sha256"
    priced = editor_api.patch(f"/api/artifacts/{base.data['id']}/", {"price_per_1k_tokens": "0.002"}, format="json")
    assert priced.status_code == 200

    ft_body = {
        "name": "tiny-lora",
        "base_artifact": base.data["id"],
        "result_artifact": base.data["id"],
        "training_dataset_hash": "4" * 64,
        "method": "lora",
    }
    same = editor_api.post("/api/fine-tunes/", ft_body, format="json")
    assert same.status_code == 400 and "different artifact" in same.data["message"]
    ft = editor_api.post("/api/fine-tunes/", {**ft_body, "result_artifact": tuned.data["id"]}, format="json")
    assert ft.status_code == 201, ft.data

    greedy_many = editor_api.post(
        "/api/scaling-configs/", {"name": "bad", "n_samples": 5, "temperature": 0}, format="json"
    )
    assert greedy_many.status_code == 400 and "temperature" in greedy_many.data["message"]
    vote = editor_api.post(
        "/api/scaling-configs/",
        {"name": "vote5", "n_samples": 5, "temperature": 0.7, "aggregation": "majority_vote"},
        format="json",
    )
    assert vote.status_code == 201, vote.data

    both = {"name": "s", "prompt": "qa", "prompt_version": 1, "prompt_label": "production", "scaling": "vote5"}
    refused = editor_api.post("/api/stacks/", {**both, "artifact": base.data["id"]}, format="json")
    assert refused.status_code == 400 and refused.data["errors"][0]["field"] == "prompt_version"
    follow = {"name": "follow", "prompt": "qa", "prompt_label": "production", "scaling": "vote5"}
    made = editor_api.post(
        "/api/stacks/", {**follow, "artifact": base.data["id"], "fine_tune": "tiny-lora"}, format="json"
    )
    assert made.status_code == 201, made.data
    assert (made.data["prompt"], made.data["prompt_label"], made.data["resolved_version"]) == ("qa", "production", 1)
    pinned = editor_api.post(
        "/api/stacks/",
        {"name": "pinned", "prompt": "qa", "prompt_version": 2, "scaling": "vote5", "artifact": base.data["id"]},
        format="json",
    )
    assert pinned.status_code == 201 and pinned.data["prompt_version"] == 2
    assert editor_api.get("/api/stacks/", {"prompt": "qa"}).data["count"] == 2
    assert editor_api.get("/api/stacks/", {"artifact": base.data["id"]}).data["count"] == 2
    repinned = editor_api.patch(f"/api/stacks/{pinned.data['id']}/", {"prompt_version": 1}, format="json")
    assert repinned.status_code == 200 and repinned.data["prompt_version"] == 1
    # An artifact a stack uses cannot be deleted.
    in_use = admin_api.delete(f"/api/artifacts/{base.data['id']}/")
    assert in_use.status_code == 409 and in_use.data["code"] == "in_use"
    assert Stack.objects.count() == 2


def test_dataset_upload_jsonl_csv_and_dedup(editor_api: APIClient) -> None:
    upload = SimpleUploadedFile("arith.jsonl", GOOD_JSONL.encode(), content_type="application/x-ndjson")
    made = editor_api.post("/api/datasets/", {"file": upload, "name": "arith", "scorer": "numeric", "tags": ["math"]})
    assert made.status_code == 201, made.data
    assert made.data["item_count"] == 2 and made.data["tags"] == ["math"]
    again = editor_api.post(
        "/api/datasets/",
        {"content": GOOD_JSONL, "format": "jsonl", "name": "arith", "scorer": "numeric"},
        format="json",
    )
    assert again.status_code == 200 and again.data["id"] == made.data["id"]
    csv_text = 'id,question,expected\nx,"Hello, world",hi\n'
    made_csv = editor_api.post("/api/datasets/", {"content": csv_text, "format": "csv", "name": "greet"}, format="json")
    assert made_csv.status_code == 201
    items = editor_api.get(f"/api/datasets/{made_csv.data['id']}/items/").data["results"]
    assert items[0]["inputs"] == {"question": "Hello, world"}
    assert editor_api.get("/api/datasets/", {"tag": "math"}).data["count"] == 1
    assert AuditEntry.objects.filter(action="dataset.create").count() == 2


@pytest.mark.parametrize(
    ("content", "fmt", "message"),
    [
        ('{"id": "a", "question": "x"}\n{"id": "b", "question": \n', "jsonl", "line 2: malformed JSON"),
        ('{"id": "a", "question": "x"}\n{"id": "a", "question": "y"}\n', "jsonl", "duplicate id"),
        ('{"id": "a", "question": "x"}\n[1, 2]\n', "jsonl", "line 2: expected a JSON object"),
        ('{"id": "a", "question": "x", "kind": "evil"}\n', "jsonl", "unknown kind"),
        ("id,question\na,x\nb,y,z\n", "csv", "line 3: row has 3 columns"),
        ('id,question\na,"unterminated\n', "csv", "malformed CSV"),
        ("", "jsonl", "may not be blank"),
        ("\n \n", "jsonl", "empty"),
        ('{"id": "a", "question": "x\\u0000"}\n', "jsonl", "NUL"),
    ],
)
def test_upload_with_broken_rows_imports_nothing(editor_api: APIClient, content: str, fmt: str, message: str) -> None:
    response = editor_api.post("/api/datasets/", {"content": content, "format": fmt, "name": "broken"}, format="json")
    assert response.status_code == 400, response.data
    assert message in response.data["message"], response.data
    assert response.data["errors"][0]["field"] in ("file", "content")
    assert Dataset.objects.count() == 0 and DatasetItem.objects.count() == 0


def test_upload_problems_are_client_errors(editor_api: APIClient, settings: Any) -> None:
    bad_bytes = SimpleUploadedFile("x.jsonl", b'{"q": "\xff"}\n')
    assert editor_api.post("/api/datasets/", {"file": bad_bytes, "name": "x"}).status_code == 400
    unknown = SimpleUploadedFile("x.txt", b'{"q": 1}\n')
    assert editor_api.post("/api/datasets/", {"file": unknown, "name": "x"}).status_code == 400
    assert editor_api.post("/api/datasets/", {"name": "x"}, format="json").status_code == 400
    both = {"content": "a", "format": "csv", "name": "x", "file": SimpleUploadedFile("a.csv", b"q\n1\n")}
    assert editor_api.post("/api/datasets/", both).status_code == 400
    regex = {"content": GOOD_JSONL, "format": "jsonl", "name": "x", "scorer": "regex", "scorer_pattern": "("}
    assert editor_api.post("/api/datasets/", regex, format="json").status_code == 400
    from registry.api import views

    big = SimpleUploadedFile("big.jsonl", b'{"q": "x"}\n' * 200)
    original = views.MAX_UPLOAD_BYTES
    views.MAX_UPLOAD_BYTES = 1000
    try:
        assert editor_api.post("/api/datasets/", {"file": big, "name": "big"}).status_code == 413
    finally:
        views.MAX_UPLOAD_BYTES = original
    assert Dataset.objects.count() == 0


def test_runs_create_cancel_results_export_and_compare(
    editor_api: APIClient, admin_api: APIClient, evaluated: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers import evaluation

    queued: list[int] = []
    monkeypatch.setattr(evaluation, "start_run", lambda run: queued.append(run.pk))
    dataset = evaluated["dataset"]
    made = editor_api.post("/api/runs/", {"stack": "qa-v2", "dataset": dataset.pk}, format="json")
    assert made.status_code == 201, made.data
    assert made.data["status"] == "pending" and made.data["prompt_version"] == 2 and queued == [made.data["id"]]
    progress = editor_api.get(f"/api/runs/{made.data['id']}/").data
    assert (progress["items_done"], progress["items_total"], progress["progress"]) == (0, 3, 0.0)
    cancelled = editor_api.post(f"/api/runs/{made.data['id']}/cancel/")
    assert cancelled.status_code == 200 and cancelled.data["status"] == "cancelled"
    assert editor_api.post(f"/api/runs/{made.data['id']}/cancel/").status_code == 409
    assert editor_api.get("/api/runs/", {"status": "succeeded"}).data["count"] == 2
    assert editor_api.get("/api/runs/", {"prompt": "qa", "prompt_version": 2}).data["count"] == 2
    assert editor_api.get("/api/runs/", {"status": "bogus"}).status_code == 400

    run1, run2 = evaluated["runs"][1], evaluated["runs"][2]
    results = editor_api.get(f"/api/runs/{run1.pk}/results/").data
    assert [r["answer"] for r in results["results"]] == ["4", "5", "8"]
    assert editor_api.get(f"/api/runs/{run1.pk}/results/", {"correct": "false"}).data["count"] == 1

    exported = editor_api.get(f"/api/runs/{run1.pk}/export/", {"format": "csv"})
    assert exported.status_code == 200 and exported["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(b"".join(exported.streaming_content).decode())))
    assert [(r["item"], r["answer"], r["score"]) for r in rows] == [
        ("q1", "4", "1.0"),
        ("q2", "5", "0.0"),
        ("q3", "8", "1.0"),
    ]
    as_json = editor_api.get(f"/api/runs/{run1.pk}/export/", {"format": "json"})
    assert json.loads(as_json.content)["results"][1]["answer"] == "5"
    assert editor_api.get(f"/api/runs/{run1.pk}/export/", {"format": "xml"}).status_code == 400

    compared = editor_api.get("/api/runs/compare/", {"a": run1.pk, "b": run2.pk}).data
    assert compared["disagreement_count"] == 1 and compared["fixed"] == 1 and compared["broken"] == 0
    assert compared["disagreements"][0]["item"] == "q2"
    accuracy = next(m for m in compared["metrics"] if m["metric"] == "accuracy")
    assert accuracy["delta"] == pytest.approx(1 / 3)
    assert editor_api.get("/api/runs/compare/", {"a": run1.pk, "b": 10**12}).status_code == 400
    assert editor_api.delete(f"/api/runs/{run1.pk}/").status_code == 403
    assert admin_api.delete(f"/api/runs/{run1.pk}/").status_code == 204
    assert not EvaluationRun.objects.filter(pk=run1.pk).exists()


def test_a_run_whose_label_is_missing_is_a_client_error(editor_api: APIClient, evaluated: dict[str, Any]) -> None:
    stack = Stack.objects.create(
        name="follow-missing",
        prompt=Prompt.objects.get(name="qa"),
        prompt_label="nope",
        scaling=evaluated["scaling"],
        artifact=evaluated["artifact"],
    )
    response = editor_api.post(
        "/api/runs/", {"stack": stack.name, "dataset": evaluated["dataset"].pk, "start": False}, format="json"
    )
    assert response.status_code == 400 and "no label 'nope'" in response.data["message"]
