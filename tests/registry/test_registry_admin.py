"""The registry admin: every page renders, and the pages that write go through the registry's rules."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from registry.models import (
    Dataset,
    DatasetItem,
    EvaluationRun,
    ItemResult,
    LabelMove,
    Prompt,
    PromptLabel,
    PromptVersion,
)

pytestmark = pytest.mark.django_db

MODELS = [
    "prompt",
    "promptversion",
    "promptlabel",
    "labelmove",
    "modelartifact",
    "finetune",
    "finetunejob",
    "scalingconfig",
    "stack",
    "dataset",
    "datasetitem",
    "evaluationrun",
    "itemresult",
]
ADDABLE = ["prompt", "promptversion", "promptlabel", "finetune", "finetunejob", "scalingconfig", "stack", "dataset"]
NOT_ADDABLE = ["labelmove", "modelartifact", "datasetitem", "evaluationrun", "itemresult"]


def inline_management_data(client: Client, url: str) -> dict[str, Any]:
    """The inline management-form fields a browser would send back with the change form at `url`."""
    data: dict[str, Any] = {}
    for inline in client.get(url).context["inline_admin_formsets"]:
        form = inline.formset.management_form
        data.update({form.add_prefix(name): value for name, value in form.initial.items()})
    return data


@pytest.mark.parametrize("model", MODELS)
def test_changelist_renders_and_searches(admin_client: Client, registry_objects: dict[str, Any], model: str) -> None:
    url = reverse(f"admin:registry_{model}_changelist")
    response = admin_client.get(url)
    assert response.status_code == 200
    assert response.context["cl"].result_count >= 1
    assert admin_client.get(url, {"q": "qa"}).status_code == 200


@pytest.mark.parametrize("model", MODELS)
def test_change_page_renders(admin_client: Client, registry_objects: dict[str, Any], model: str) -> None:
    obj = registry_objects[model]
    response = admin_client.get(reverse(f"admin:registry_{model}_change", args=[obj.pk]))
    assert response.status_code == 200


@pytest.mark.parametrize("model", ADDABLE)
def test_add_page_renders(admin_client: Client, registry_objects: dict[str, Any], model: str) -> None:
    assert admin_client.get(reverse(f"admin:registry_{model}_add")).status_code == 200


@pytest.mark.parametrize("model", NOT_ADDABLE)
def test_records_written_elsewhere_cannot_be_added_by_hand(admin_client: Client, model: str) -> None:
    assert admin_client.get(reverse(f"admin:registry_{model}_add")).status_code == 403


def test_run_page_shows_status_progress_provider_summary_and_results(
    admin_client: Client, registry_objects: dict[str, Any]
) -> None:
    run = registry_objects["evaluationrun"]
    response = admin_client.get(reverse("admin:registry_evaluationrun_change", args=[run.pk]))
    html = response.content.decode()
    assert "succeeded" in html.lower()
    assert '<progress value="1" max="1"></progress> 1 / 1 (100%)' in html
    assert "CPUExecutionProvider" in html
    assert "&quot;accuracy&quot;: 1.0" in html
    assert "Item results (first 100)" in html
    assert reverse("admin:registry_itemresult_change", args=[registry_objects["itemresult"].pk]) in html


def test_artifact_page_shows_checksum_size_provenance_and_parent(
    admin_client: Client, registry_objects: dict[str, Any]
) -> None:
    artifact = registry_objects["modelartifact"]
    html = admin_client.get(reverse("admin:registry_modelartifact_change", args=[artifact.pk])).content.decode()
    assert artifact.sha256 in html
    assert "515.0 MiB (540,000,000 bytes)" in html
    assert "/tmp/tiny-int8.gguf" in html
    assert reverse("admin:registry_modelartifact_change", args=[artifact.parent.pk]) in html


def test_prompt_page_lists_versions_and_labels(admin_client: Client, registry_objects: dict[str, Any]) -> None:
    prompt = registry_objects["prompt"]
    html = admin_client.get(reverse("admin:registry_prompt_change", args=[prompt.pk])).content.decode()
    assert "first cut" in html
    assert "prod" in html
    assert "Add a version based on v1" in html


def test_a_version_is_added_through_create_version(admin_client: Client, registry_objects: dict[str, Any]) -> None:
    prompt = registry_objects["prompt"]
    data = {
        "prompt": prompt.pk,
        "parent": "",
        "template": "Question: {{ question }}",
        "system_message": "",
        "variables": "question",
        "examples": "[]",
        "params": '{"temperature": 0.5}',
        "commit_message": "reworded",
    }
    response = admin_client.post(reverse("admin:registry_promptversion_add"), data)
    assert response.status_code == 302
    version = prompt.versions.get(number=2)
    assert version.parent == registry_objects["promptversion"]
    assert version.created_by is not None and version.created_by.username == "admin"
    assert version.params == {"temperature": 0.5}

    # Identical content again: no new version.
    again = admin_client.post(reverse("admin:registry_promptversion_add"), data, follow=True)
    assert again.status_code == 200
    assert "already stored as qa@v2" in again.content.decode()
    assert prompt.versions.count() == 2


@pytest.mark.parametrize(
    ("template", "variables", "problem"),
    [
        ("{{ question }} {{ context }}", "question", "undeclared variable(s): context"),
        ("{{ ''.__class__.__mro__ }}", "", "private attribute"),
        ("{% if %}", "", "syntax error"),
    ],
)
def test_a_bad_version_is_refused_with_a_form_error(
    admin_client: Client, registry_objects: dict[str, Any], template: str, variables: str, problem: str
) -> None:
    prompt = registry_objects["prompt"]
    data = {
        "prompt": prompt.pk,
        "template": template,
        "variables": variables,
        "examples": "[]",
        "params": "{}",
    }
    response = admin_client.post(reverse("admin:registry_promptversion_add"), data)
    assert response.status_code == 200
    assert problem in response.content.decode().replace("&#x27;", "'")
    assert prompt.versions.count() == 1


def test_a_stored_version_cannot_be_changed_through_the_admin(
    admin_client: Client, registry_objects: dict[str, Any]
) -> None:
    version = registry_objects["promptversion"]
    url = reverse("admin:registry_promptversion_change", args=[version.pk])
    assert 'name="_save"' not in admin_client.get(url).content.decode()
    response = admin_client.post(url, {"template": "changed"})
    assert response.status_code == 403
    version.refresh_from_db()
    assert version.template == "Q: {{ question }}\nA:"


def test_new_version_form_starts_from_an_existing_version(
    admin_client: Client, registry_objects: dict[str, Any]
) -> None:
    version = registry_objects["promptversion"]
    response = admin_client.get(reverse("admin:registry_promptversion_add"), {"from_version": version.pk})
    form = response.context["adminform"].form
    assert form.initial["template"] == version.template
    assert form.initial["variables"] == "question"
    assert form.initial["parent"] == version.pk


def test_moving_a_label_in_the_admin_records_the_move(admin_client: Client, registry_objects: dict[str, Any]) -> None:
    prompt: Prompt = registry_objects["prompt"]
    label: PromptLabel = registry_objects["promptlabel"]
    v2, _ = prompt.create_version(template="Question: {{ question }}", variables=["question"])
    url = reverse("admin:registry_promptlabel_change", args=[label.pk])
    response = admin_client.post(
        url, {**inline_management_data(admin_client, url), "version": v2.pk, "reason": "promote"}
    )
    assert response.status_code == 302
    assert prompt.version_for_label("prod") == v2
    move = LabelMove.objects.first()
    assert move is not None
    assert (move.from_version, move.to_version, move.reason) == (
        registry_objects["promptversion"],
        v2,
        "promote",
    )
    assert move.moved_by is not None and move.moved_by.username == "admin"


def test_a_label_cannot_point_at_another_prompts_version(
    admin_client: Client, registry_objects: dict[str, Any]
) -> None:
    other = Prompt.objects.create(name="other")
    foreign, _ = other.create_version(template="{{ x }}", variables=["x"])
    data = {"prompt": registry_objects["prompt"].pk, "name": "staging", "version": foreign.pk}
    response = admin_client.post(reverse("admin:registry_promptlabel_add"), data)
    assert response.status_code == 200
    assert "is not a version of prompt qa" in response.content.decode()
    assert not PromptLabel.objects.filter(name="staging").exists()


def test_uploading_a_dataset_imports_it(admin_client: Client, db: None) -> None:
    upload = SimpleUploadedFile("mini.jsonl", b'{"id": "a", "question": "1+1?", "expected": "2"}\n')
    data = {"file": upload, "format": "", "name": "mini", "scorer": "numeric", "description": "tiny"}
    response = admin_client.post(reverse("admin:registry_dataset_add"), data)
    assert response.status_code == 302
    dataset = Dataset.objects.get(name="mini")
    assert (dataset.item_count, dataset.scorer, dataset.description) == (1, "numeric", "tiny")
    assert dataset.items.get().inputs == {"question": "1+1?"}


def test_uploading_a_bad_dataset_shows_the_line_and_stores_nothing(admin_client: Client, db: None) -> None:
    upload = SimpleUploadedFile("mini.jsonl", b'{"id": "a", "question": "1+1?"}\n{"id": "a", "question": "2"}\n')
    data = {"file": upload, "format": "", "name": "mini", "scorer": "exact"}
    response = admin_client.post(reverse("admin:registry_dataset_add"), data)
    assert response.status_code == 200
    assert "mini.jsonl, line 2: duplicate id" in response.content.decode().replace("&#x27;", "'")
    assert (Dataset.objects.count(), DatasetItem.objects.count()) == (0, 0)


def test_deleting_a_run_takes_its_read_only_results_with_it(
    admin_client: Client, registry_objects: dict[str, Any]
) -> None:
    run = registry_objects["evaluationrun"]
    url = reverse("admin:registry_evaluationrun_delete", args=[run.pk])
    response = admin_client.post(url, {"post": "yes"})
    assert response.status_code == 302
    assert not EvaluationRun.objects.exists()
    assert not ItemResult.objects.exists()


def test_versions_and_results_have_no_edit_form(admin_client: Client, registry_objects: dict[str, Any]) -> None:
    for model in ("promptversion", "labelmove", "datasetitem", "evaluationrun", "itemresult"):
        obj = registry_objects[model]
        html = admin_client.get(reverse(f"admin:registry_{model}_change", args=[obj.pk])).content.decode()
        assert 'name="_save"' not in html, model
    assert PromptVersion.objects.count() == 1


def test_label_history_cannot_be_deleted_on_its_own_but_goes_with_its_label(
    admin_client: Client, registry_objects: dict[str, Any]
) -> None:
    move = registry_objects["labelmove"]
    assert (
        admin_client.post(reverse("admin:registry_labelmove_delete", args=[move.pk]), {"post": "yes"}).status_code
        == 403
    )
    assert LabelMove.objects.filter(pk=move.pk).exists()

    label = registry_objects["promptlabel"]
    response = admin_client.post(reverse("admin:registry_promptlabel_delete", args=[label.pk]), {"post": "yes"})
    assert response.status_code == 302
    assert not LabelMove.objects.exists()


def test_big_inlines_show_the_first_rows_and_link_to_the_rest(admin_client: Client, db: None) -> None:
    dataset = Dataset.objects.create(name="big", content_hash="e" * 64, item_count=150)
    DatasetItem.objects.bulk_create(
        DatasetItem(dataset=dataset, index=i, key=f"k{i}", inputs={"q": str(i)}) for i in range(150)
    )
    response = admin_client.get(reverse("admin:registry_dataset_change", args=[dataset.pk]))
    (inline,) = response.context["inline_admin_formsets"]
    keys = [form.instance.key for form in inline.formset.forms]
    assert keys == [f"k{i}" for i in range(100)]
    assert "all 150 items" in response.content.decode()


def test_a_dataset_description_can_be_edited_but_not_its_name_or_scorer(
    admin_client: Client, registry_objects: dict[str, Any]
) -> None:
    dataset = registry_objects["dataset"]
    url = reverse("admin:registry_dataset_change", args=[dataset.pk])
    data = {
        **inline_management_data(admin_client, url),
        "description": "sums",
        "name": "renamed",
        "scorer": "regex",
    }
    assert admin_client.post(url, data).status_code == 302
    dataset.refresh_from_db()
    assert (dataset.name, dataset.scorer, dataset.description) == ("arith", "exact", "sums")


def test_uploading_a_regex_dataset_needs_a_valid_pattern(admin_client: Client, db: None) -> None:
    url = reverse("admin:registry_dataset_add")
    content = b'{"id": "a", "question": "1+1?", "expected": "2"}\n'

    def post(pattern: str) -> Any:
        upload = SimpleUploadedFile("mini.jsonl", content)
        data = {"file": upload, "name": "mini", "scorer": "regex", "scorer_pattern": pattern}
        return admin_client.post(url, data)

    assert "needs a pattern" in post("").content.decode()
    assert "not a valid regex" in post("(oops").content.decode()
    assert not Dataset.objects.exists()
    assert post(r"(\d+)").status_code == 302
    assert Dataset.objects.get().scorer_pattern == r"(\d+)"
