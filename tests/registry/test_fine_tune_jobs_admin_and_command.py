"""Fine-tune jobs from the admin and from `manage.py fine_tune`: start (with the API's checks), show, cancel, list."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from registry.models import AuditEntry, Dataset, FineTuneJob, ModelArtifact, Prompt, PromptVersion
from workers import tasks

pytestmark = pytest.mark.django_db


@pytest.fixture
def version(prompt: Prompt) -> PromptVersion:
    v, _ = prompt.create_version(template="{{ question }}", variables=["question"])
    prompt.move_label("production", v)
    return v


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sent: list[int] = []
    monkeypatch.setattr(tasks.run_fine_tune, "delay", lambda job_id: sent.append(job_id))
    return sent


def run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("fine_tune", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


# --- admin ---------------------------------------------------------------------------------------------------------


def add_form(trainable: ModelArtifact, pairs: Dataset, version: PromptVersion, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "admin-tuned",
        "base_artifact": trainable.pk,
        "dataset": pairs.pk,
        "prompt_version": version.pk,
        "method": "lora",
        "hyperparameters": json.dumps({"steps": 10, "batch_size": 2}),
        "seed": 0,
    }
    data.update(overrides)
    return data


def test_the_admin_add_form_starts_a_job_and_queues_it(
    admin_client: Client,
    trainable: ModelArtifact,
    pairs: Dataset,
    version: PromptVersion,
    queued: list[int],
    django_capture_on_commit_callbacks: Any,
) -> None:
    url = reverse("admin:registry_finetunejob_add")
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(url, add_form(trainable, pairs, version))
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else ""
    job = FineTuneJob.objects.get()
    assert job.status == "pending" and job.hyperparameters["lora_r"] == 8 and len(job.spec_hash) == 64
    assert job.created_by is not None and queued == [job.pk]
    assert AuditEntry.objects.filter(action="finetunejob.create", via="admin").exists()
    # The same request again joins that job instead of creating a second one.
    again = admin_client.post(url, add_form(trainable, pairs, version, name="another"), follow=True)
    assert again.status_code == 200 and FineTuneJob.objects.count() == 1
    assert "it is reused, not trained again" in again.content.decode()


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"hyperparameters": json.dumps({"lora_rank": 4})}, "hyperparameters", "unknown hyperparameter(s) lora_rank"),
        ({"hyperparameters": "[1, 2]"}, "hyperparameters", "must be a JSON object"),
        ({"method": "full", "hyperparameters": json.dumps({"lora_r": 4})}, "hyperparameters", "apply to LoRA only"),
    ],
)
def test_the_admin_add_form_shows_bad_requests_as_form_errors(
    admin_client: Client,
    trainable: ModelArtifact,
    pairs: Dataset,
    version: PromptVersion,
    overrides: dict[str, Any],
    field: str,
    message: str,
) -> None:
    response = admin_client.post(
        reverse("admin:registry_finetunejob_add"), add_form(trainable, pairs, version, **overrides)
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert message in " ".join(errors[field]), errors
    assert not FineTuneJob.objects.exists()


def test_the_admin_refuses_an_onnx_only_base(
    admin_client: Client, pairs: Dataset, version: PromptVersion, artifact: ModelArtifact
) -> None:
    onnx_only = artifact  # imported from ONNX files: nothing to train
    response = admin_client.post(
        reverse("admin:registry_finetunejob_add"), add_form(onnx_only, pairs, version, base_artifact=onnx_only.pk)
    )
    errors = response.context["adminform"].form.errors
    assert "was imported from ONNX: no trainable weights" in " ".join(errors["base_artifact"])
    assert not FineTuneJob.objects.exists()


def test_a_running_jobs_page_draws_its_loss_curve_and_its_cancel_button_asks_it_to_stop(
    admin_client: Client, trainable: ModelArtifact, pairs: Dataset, version: PromptVersion
) -> None:
    job = FineTuneJob.objects.create(
        name="watched",
        base_artifact=trainable,
        dataset=pairs,
        prompt_version=version,
        spec_hash="6" * 64,
        status="running",
        steps_done=2,
        steps_total=10,
        loss_curve=[[1, 4.5], [2, 3.25]],
        initial_loss=4.75,
        heartbeat_at=timezone.now(),
    )
    page = admin_client.get(reverse("admin:registry_finetunejob_change", args=[job.pk])).content.decode()
    assert 'class="fulcrum-chart fulcrum-loss"' in page and "loss-line" in page
    assert "2 / 10 steps" in page and 'http-equiv="refresh"' in page
    cancel_url = reverse("admin:registry_finetunejob_cancel", args=[job.pk])
    assert cancel_url in page
    assert admin_client.get(cancel_url).status_code == 405  # a write needs a POST
    assert admin_client.post(cancel_url).status_code == 302
    job.refresh_from_db()
    assert job.cancel_requested and job.status == "running"  # its worker stops it within a step
    assert AuditEntry.objects.filter(action="finetunejob.cancel", via="admin").count() == 1


def test_the_cancel_action_cancels_pending_jobs(
    admin_client: Client, trainable: ModelArtifact, pairs: Dataset, version: PromptVersion
) -> None:
    job = FineTuneJob.objects.create(
        name="queued", base_artifact=trainable, dataset=pairs, prompt_version=version, spec_hash="7" * 64
    )
    response = admin_client.post(
        reverse("admin:registry_finetunejob_changelist"),
        {"action": "cancel_selected", "_selected_action": [job.pk]},
        follow=True,
    )
    assert response.status_code == 200
    job.refresh_from_db()
    assert job.status == "cancelled"


# --- manage.py fine_tune ----------------------------------------------------------------------------------------------


def test_the_command_starts_shows_lists_and_cancels_a_job(
    trainable: ModelArtifact, pairs: Dataset, version: PromptVersion, prompt: Prompt
) -> None:
    start = ("start", "cli-tuned", "--base", str(trainable.pk), "--dataset", "pairs", "--prompt", prompt.name)
    out, err = run(
        *start, "--label", "production", "--set", "steps=12", "--set", 'target_modules=["q_proj"]', "--no-start"
    )
    job = FineTuneJob.objects.get()
    assert f"created job {job.pk}" in err and "queued" not in err
    assert job.hyperparameters["steps"] == 12 and job.hyperparameters["target_modules"] == ["q_proj"]
    assert job.prompt_version == version and "cli-tuned: pending" in out
    assert AuditEntry.objects.filter(action="finetunejob.create", via="cli").count() == 1

    _, err = run(
        *start,
        "--version",
        str(version.number),
        "--hyperparameters",
        '{"steps": 12, "target_modules": ["q_proj"]}',
        "--no-start",
    )
    assert f"is pending as job {job.pk}: reused" in err and FineTuneJob.objects.count() == 1

    out, _ = run("status", str(job.pk))
    assert out.startswith(f"job {job.pk} cli-tuned: pending")
    data = json.loads(run("status", str(job.pk), "--json")[0])
    assert data["id"] == job.pk and data["hyperparameters"]["steps"] == 12
    assert "cli-tuned" in run("list")[0] and "cli-tuned" not in run("list", "--status", "running")[0]

    out, _ = run("cancel", str(job.pk))
    assert out.strip() == f"job {job.pk} cancelled"
    with pytest.raises(CommandError, match="already cancelled"):
        run("cancel", str(job.pk))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--set", "learning_rate=-1"), "hyperparameters: learning_rate must be > 0"),
        (("--set", "nonsense"), "--set takes KEY=VALUE"),
        (("--hyperparameters", "[1]"), "--hyperparameters must be a JSON object"),
    ],
)
def test_the_command_reports_bad_requests_clearly(
    trainable: ModelArtifact,
    pairs: Dataset,
    version: PromptVersion,
    prompt: Prompt,
    extra: tuple[str, ...],
    message: str,
) -> None:
    with pytest.raises(CommandError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(
            "start",
            "x",
            "--base",
            str(trainable.pk),
            "--dataset",
            "pairs",
            "--prompt",
            prompt.name,
            "--version",
            "1",
            *extra,
        )
    assert not FineTuneJob.objects.exists()


def test_the_command_names_a_missing_artifact_dataset_or_job(pairs: Dataset, prompt: Prompt) -> None:
    with pytest.raises(CommandError, match="no artifact with id 999"):
        run("start", "x", "--base", "999", "--dataset", "pairs", "--prompt", prompt.name, "--version", "1")
    with pytest.raises(CommandError, match="no fine-tune job 42"):
        run("status", "42")


def test_the_command_refuses_a_name_that_cannot_name_a_fine_tune(
    trainable: ModelArtifact, pairs: Dataset, version: PromptVersion, prompt: Prompt
) -> None:
    with pytest.raises(CommandError, match="name: the name must be 1 to 200 letters"):
        run(
            "start",
            "has spaces",
            "--base",
            str(trainable.pk),
            "--dataset",
            "pairs",
            "--prompt",
            prompt.name,
            "--version",
            "1",
        )
