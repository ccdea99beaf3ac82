"""Fine-tune jobs through the API: start, join an identical job, refuse bad requests clearly, cancel, permissions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from registry.models import AuditEntry, Dataset, FineTune, FineTuneJob, ModelArtifact, Prompt
from workers import tasks

pytestmark = pytest.mark.django_db


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sent: list[int] = []
    monkeypatch.setattr(tasks.run_fine_tune, "delay", lambda job_id: sent.append(job_id))
    return sent


def body(trainable: ModelArtifact, pairs: Dataset, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "tiny-pairs",
        "base_artifact": trainable.pk,
        "dataset": pairs.pk,
        "prompt": "qa",
        "prompt_version": 1,
        "method": "lora",
        "hyperparameters": {"steps": 20, "batch_size": 2, "learning_rate": 0.001, "lora_r": 4},
        "seed": 7,
    }
    data.update(overrides)
    return data


def test_an_editor_starts_a_job_and_an_identical_request_returns_that_job(
    editor_api: APIClient,
    qa: Prompt,
    trainable: ModelArtifact,
    pairs: Dataset,
    queued: list[int],
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        made = editor_api.post("/api/fine-tune-jobs/", body(trainable, pairs), format="json")
    assert made.status_code == 201, made.data
    job = made.data
    assert job["status"] == "pending" and job["prompt"] == "qa" and job["prompt_version"] == 1
    assert job["hyperparameters"]["lora_r"] == 4 and job["hyperparameters"]["target_modules"] == ["q_proj", "v_proj"]
    assert len(job["spec_hash"]) == 64 and job["created_by"] == "editor-user" and job["fine_tune"] is None
    assert queued == [job["id"]]  # queued for a training worker once the request committed
    entry = AuditEntry.objects.get(action="finetunejob.create")
    assert entry.object_id == str(job["id"]) and entry.details["spec_hash"] == job["spec_hash"]

    # Same spec under another name (hyperparameters spelled with their defaults): the same job, 200, no new audit.
    same = body(trainable, pairs, name="other-name")
    same["hyperparameters"] = {**same["hyperparameters"], "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"]}
    again = editor_api.post("/api/fine-tune-jobs/", same, format="json")
    assert again.status_code == 200 and again.data["id"] == job["id"]
    assert FineTuneJob.objects.count() == 1 and AuditEntry.objects.filter(action="finetunejob.create").count() == 1

    by_label = editor_api.post(
        "/api/fine-tune-jobs/",
        body(trainable, pairs, name="by-label", prompt_version=None, prompt_label="production", seed=8)
        | {"prompt_version": None},
        format="json",
    )
    assert by_label.status_code == 400  # null is not a version number
    data = body(trainable, pairs, name="by-label", seed=8)
    del data["prompt_version"]
    data["prompt_label"] = "production"
    labelled = editor_api.post("/api/fine-tune-jobs/", {**data, "start": False}, format="json")
    assert labelled.status_code == 201 and labelled.data["prompt_version"] == 1
    assert editor_api.get("/api/fine-tune-jobs/", {"status": "pending"}).data["count"] == 2
    assert editor_api.get("/api/fine-tune-jobs/", {"name": "by-label"}).data["count"] == 1
    fetched = editor_api.get(f"/api/fine-tune-jobs/{job['id']}/")
    assert fetched.status_code == 200 and fetched.data["loss_curve"] == []


@pytest.mark.parametrize(
    ("hyperparameters", "method", "message"),
    [
        ({"lora_rank": 8}, "lora", "unknown hyperparameter(s) lora_rank"),
        ({"learning_rate": -0.1}, "lora", "learning_rate must be > 0"),
        ({"learning_rate": 0}, "lora", "learning_rate must be > 0"),
        ({"steps": 10, "epochs": 1}, "lora", "give steps or epochs, not both"),
        ({"batch_size": "8"}, "lora", "batch_size must be a number, not str"),
        ({"steps": True}, "lora", "steps must be a number, not bool"),
        ({"steps": 2.5}, "lora", "steps must be a whole number"),
        ({"steps": 0}, "lora", "steps must be >= 1"),
        ({"lora_dropout": 1}, "lora", "lora_dropout must be < 1"),
        ({"target_modules": []}, "lora", "target_modules must be a list of 1 to 64 module names"),
        ({"target_modules": ["q_proj", "../x"]}, "lora", "'../x' is not a module name"),
        ({"lora_r": 8}, "full", "lora_r apply to LoRA only"),
        ({"steps": 10, "warmup_steps": 10}, "lora", "warmup_steps (10) must be fewer than steps (10)"),
    ],
)
def test_bad_hyperparameters_are_refused_naming_the_key_and_nothing_is_stored(
    editor_api: APIClient,
    qa: Prompt,
    trainable: ModelArtifact,
    pairs: Dataset,
    hyperparameters: dict[str, Any],
    method: str,
    message: str,
) -> None:
    response = editor_api.post(
        "/api/fine-tune-jobs/",
        body(trainable, pairs, hyperparameters=hyperparameters, method=method),
        format="json",
    )
    assert response.status_code == 400, response.data
    assert response.data["errors"][0]["field"] == "hyperparameters"
    assert message in response.data["message"]
    assert not FineTuneJob.objects.exists()


def test_a_base_without_trainable_weights_is_refused_saying_why(
    editor_api: APIClient, qa: Prompt, pairs: Dataset, artifact: ModelArtifact
) -> None:
    onnx_only = artifact  # imported from ONNX files: nothing to train
    response = editor_api.post(
        "/api/fine-tune-jobs/", body(onnx_only, pairs, base_artifact=onnx_only.pk), format="json"
    )
    assert response.status_code == 400
    assert response.data["errors"][0]["field"] == "base_artifact"
    assert "was imported from ONNX: no trainable weights" in response.data["message"]
    assert not FineTuneJob.objects.exists()


def test_a_request_must_pin_one_prompt_version_that_exists(
    editor_api: APIClient, qa: Prompt, trainable: ModelArtifact, pairs: Dataset
) -> None:
    both = editor_api.post("/api/fine-tune-jobs/", body(trainable, pairs, prompt_label="production"), format="json")
    assert both.status_code == 400 and both.data["errors"][0]["field"] == "prompt_version"
    missing = editor_api.post("/api/fine-tune-jobs/", body(trainable, pairs, prompt_version=9), format="json")
    assert missing.status_code == 400 and "has no version 9" in missing.data["message"]


def test_cancel_finishes_a_pending_job_once_and_is_audited(
    editor_api: APIClient, qa: Prompt, trainable: ModelArtifact, pairs: Dataset, queued: list[int]
) -> None:
    job = editor_api.post("/api/fine-tune-jobs/", body(trainable, pairs), format="json").data
    cancelled = editor_api.post(f"/api/fine-tune-jobs/{job['id']}/cancel/")
    assert cancelled.status_code == 200 and cancelled.data["status"] == "cancelled"
    assert cancelled.data["cancel_requested"] is True
    again = editor_api.post(f"/api/fine-tune-jobs/{job['id']}/cancel/")
    assert again.status_code == 409 and again.data["code"] == "finished"
    assert editor_api.post(f"/api/fine-tune-jobs/{job['id']}/start/").status_code == 409
    assert AuditEntry.objects.filter(action="finetunejob.cancel", object_id=str(job["id"])).count() == 1
    # A cancelled spec may be asked for again: a new job.
    fresh = editor_api.post("/api/fine-tune-jobs/", body(trainable, pairs), format="json")
    assert fresh.status_code == 201 and fresh.data["id"] != job["id"]


def test_viewers_and_read_tokens_cannot_start_or_cancel_jobs(
    client_for: Callable[..., APIClient], qa: Prompt, trainable: ModelArtifact, pairs: Dataset, queued: list[int]
) -> None:
    viewer = client_for("viewer")
    assert viewer.post("/api/fine-tune-jobs/", body(trainable, pairs), format="json").status_code == 403
    reader = client_for("editor", scope="read", username="reader")
    assert reader.post("/api/fine-tune-jobs/", body(trainable, pairs), format="json").status_code == 403
    job = client_for("editor").post("/api/fine-tune-jobs/", body(trainable, pairs), format="json").data
    assert viewer.get(f"/api/fine-tune-jobs/{job['id']}/").status_code == 200
    assert viewer.post(f"/api/fine-tune-jobs/{job['id']}/cancel/").status_code == 403
    assert FineTuneJob.objects.get(pk=job["id"]).status == "pending"


def test_a_fine_tune_registered_by_its_job_keeps_its_lineage(
    editor_api: APIClient, qa: Prompt, trainable: ModelArtifact, pairs: Dataset
) -> None:
    job = FineTuneJob.objects.create(
        name="done",
        base_artifact=trainable,
        dataset=pairs,
        prompt_version=qa.versions.get(number=1),
        status="succeeded",
    )
    result = ModelArtifact.objects.create(
        name="done", sha256="d" * 64, path="/x", source_kind="hf", source_path="/x/hf", source_sha256="e" * 64
    )
    fine_tune = FineTune.objects.create(
        name="done",
        base_artifact=trainable,
        result_artifact=result,
        job=job,
        training_dataset_hash=pairs.content_hash,
        method="lora",
        training_seconds=12.5,
        device="cpu",
    )
    shown = editor_api.get(f"/api/fine-tune-jobs/{job.pk}/").data
    assert shown["fine_tune"] == "done" and shown["result_artifact"] == result.pk
    listed = editor_api.get(f"/api/fine-tunes/{fine_tune.pk}/").data
    assert listed["job"] == job.pk and listed["device"] == "cpu" and listed["training_seconds"] == 12.5
    changed = editor_api.patch(f"/api/fine-tunes/{fine_tune.pk}/", {"method": "full"}, format="json")
    assert changed.status_code == 400 and "lineage cannot change" in changed.data["message"]
    frozen = editor_api.patch(f"/api/fine-tunes/{fine_tune.pk}/", {"training_seconds": 1}, format="json")
    assert frozen.status_code == 200 and FineTune.objects.get(pk=fine_tune.pk).training_seconds == 12.5
    renamed = editor_api.patch(f"/api/fine-tunes/{fine_tune.pk}/", {"name": "done-v1"}, format="json")
    assert renamed.status_code == 200 and renamed.data["name"] == "done-v1"
