"""The ways in: the API (roles, bad input, audit), the admin pages with their charts, `manage.py optimise`."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse
from optimisation_helpers import drive, scripted
from rest_framework.test import APIClient
from test_optimisation_jobs import create, fewshot_is_best

from registry import access, charts
from registry.models import AuditEntry, OptimisationJob
from registry.optimisation import jobs

pytestmark = pytest.mark.django_db
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Jobs whose first step would have gone to the broker."""
    calls: list[int] = []
    monkeypatch.setattr(jobs, "_queue_step", calls.append)
    return calls


def body(reg: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": "api-opt", "base_stack": "qa-prod", "dataset": reg["dataset"].pk, "budget_items": 500, **extra}


# --- API ------------------------------------------------------------------------------------------------------------


def test_an_editor_creates_a_job_and_it_is_queued_and_audited(
    reg: dict[str, Any],
    api_for: Callable[[str | None], APIClient],
    queued: list[int],
    django_capture_on_commit_callbacks: Any,
) -> None:
    api = api_for("editor")
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/optimisations/", body(reg, operators=["instruction"], eta=3), format="json")
    assert response.status_code == 201, response.json()
    data = response.json()
    job = OptimisationJob.objects.get(name="api-opt")
    assert queued == [job.pk]
    assert data["prompt"] == "qa" and data["start_version"] == 1 and data["status"] == "pending"
    assert data["operators"] == ["instruction"] and data["eta"] == 3
    assert data["split_sizes"]["holdout"] == len(job.split["holdout"]) > 0
    assert data["candidates"][0]["operator"] == "start"
    entry = AuditEntry.objects.get(action="optimisation.create")
    assert entry.via == "api" and entry.user == api.user and entry.token is not None  # type: ignore[attr-defined]
    assert job.created_by == api.user  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"budget_items": None}, "budget_items"),
        ({"operators": ["telepathy"]}, "operators.0"),
        ({"holdout_fraction": 1.5}, "holdout_fraction"),
        ({"start_version": 9}, "start_version"),
        ({"base_stack": "nope"}, "base_stack"),
        ({"move_label": "Not A Label"}, "move_label"),
        ({"budget_items": 10}, "budget_items"),
        ({"name": "bad name!"}, "name"),
        ({"safety_dataset": None, "min_refusal_rate": 0.5}, "safety_dataset"),
    ],
)
def test_bad_input_is_a_400_that_names_the_problem_and_stores_nothing(
    reg: dict[str, Any], api_for: Callable[[str | None], APIClient], extra: dict[str, Any], field: str
) -> None:
    response = api_for("editor").post("/api/optimisations/", body(reg, **extra), format="json")
    assert response.status_code == 400, response.json()
    assert field in {e["field"] for e in response.json()["errors"]}
    assert not OptimisationJob.objects.exists()


def test_roles_decide_who_creates_and_who_moves_production(
    reg: dict[str, Any], api_for: Callable[[str | None], APIClient], queued: list[int]
) -> None:
    assert api_for("viewer").post("/api/optimisations/", body(reg), format="json").status_code == 403
    response = api_for("editor").post("/api/optimisations/", body(reg, move_label="production"), format="json")
    assert response.status_code == 403 and "deployer" in response.json()["message"]
    assert not OptimisationJob.objects.exists()
    response = api_for("deployer").post("/api/optimisations/", body(reg, move_label="production"), format="json")
    assert response.status_code == 201
    assert api_for("editor").post("/api/optimisations/", body(reg), format="json").status_code == 400  # name taken


def test_list_read_report_and_cancel(
    reg: dict[str, Any], api_for: Callable[[str | None], APIClient], operator: access.Actor
) -> None:
    done = drive(create(reg, operator, name="done"), scripted(fewshot_is_best))
    running = create(reg, operator, name="running", split_seed=1)  # another split: nothing to reuse, it waits
    jobs.step(running.pk)
    viewer, editor = api_for("viewer"), api_for("editor")
    listed = viewer.get("/api/optimisations/?status=succeeded").json()
    assert [j["name"] for j in listed["results"]] == ["done"]
    detail = viewer.get("/api/optimisations/done/").json()
    assert detail["winner"] == done.winner.number  # type: ignore[union-attr]
    assert len(detail["candidates"]) == done.candidates.count()
    assert detail["progress"]["spent"]["items"] == done.report["spent"]["items"]
    report = viewer.get("/api/optimisations/done/report/").json()
    assert report["report"]["holdout"]["gain"] and "held-out accuracy" in report["text"]
    live = viewer.get("/api/optimisations/running/report/").json()
    assert live["status"] == "running" and live["report"]["phase"] == "probe"
    assert viewer.post("/api/optimisations/running/cancel/").status_code == 403
    cancelled = editor.post("/api/optimisations/running/cancel/")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = editor.post("/api/optimisations/running/cancel/")
    assert again.status_code == 409 and again.json()["code"] == "finished"
    assert AuditEntry.objects.filter(action="optimisation.cancel", via="api").count() == 1
    assert viewer.get("/api/optimisations/nope/").status_code == 404


# --- admin ------------------------------------------------------------------------------------------------------------


def test_the_halving_chart_draws_a_line_per_candidate_and_marks_the_winner(
    reg: dict[str, Any], operator: access.Actor
) -> None:
    job = drive(create(reg, operator), scripted(fewshot_is_best))
    report = job.report
    svg = ET.fromstring(charts.halving_chart(report["candidates"], report["search"]["rungs"], winner=report["winner"]))
    lines = svg.findall(f"{SVG}polyline")
    assert len(lines) == len(report["candidates"])
    assert len([ln for ln in lines if "winner" in ln.get("class", "")]) == 1
    assert len([ln for ln in lines if "start" in ln.get("class", "")]) == 1
    assert "no rung has finished yet" in charts.halving_chart([], [])
    assert "no rung has finished yet" in charts.halving_chart(
        [{"position": 0, "scores": [{"rung": 0}]}], [{"index": 0}]
    )


def test_the_admin_pages_show_jobs_their_candidates_and_the_report(
    admin_client: Client, reg: dict[str, Any], operator: access.Actor
) -> None:
    job = drive(create(reg, operator), scripted(fewshot_is_best))
    changelist = admin_client.get(reverse("admin:registry_optimisationjob_changelist"))
    assert changelist.status_code == 200 and b"report and charts" in changelist.content
    change = admin_client.get(reverse("admin:registry_optimisationjob_change", args=[job.pk]))
    assert change.status_code == 200 and b"Score per rung" in change.content and b"r0: " in change.content
    page = admin_client.get(reverse("admin:registry_optimisationjob_report", args=[job.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="holdout"' in html and "fulcrum-halving" in html and "fulcrum-levers" in html
    assert html.count('id="candidate-') == job.candidates.count()
    assert "fulcrum-winner" in html and "a significant gain" in html
    run = admin_client.get(reverse("admin:registry_evaluationrun_change", args=[job.report["holdout"]["winner_run"]]))
    assert b"of the dataset&#x27;s items (an optimisation split)" in run.content


def test_the_report_page_of_a_running_job_and_the_cancel_action(
    admin_client: Client, reg: dict[str, Any], operator: access.Actor
) -> None:
    job = create(reg, operator)
    jobs.step(job.pk)
    page = admin_client.get(reverse("admin:registry_optimisationjob_report", args=[job.pk]))
    assert (
        page.status_code == 200 and b'id="no-holdout"' in page.content and b"no rung has finished yet" in page.content
    )
    response = admin_client.post(
        reverse("admin:registry_optimisationjob_changelist"),
        {"action": "cancel_jobs", "_selected_action": [job.pk]},
        follow=True,
    )
    assert b"Cancelled: opt." in response.content
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert AuditEntry.objects.filter(action="optimisation.cancel", via="admin").exists()


# --- manage.py optimise -----------------------------------------------------------------------------------------------


def test_the_command_starts_reports_and_cancels(reg: dict[str, Any], queued: list[int]) -> None:
    err = io.StringIO()
    call_command(
        "optimise", "start", "cli-opt", "--stack", "qa-prod", "--dataset", "arith", "--budget-items", "500",
        "--operators", "instruction,fewshot", stderr=err,
    )  # fmt: skip
    job = OptimisationJob.objects.get(name="cli-opt")
    assert job.created_via == "cli" and job.operators == ["instruction", "fewshot"]
    assert "queued for the workers" in err.getvalue()
    out = io.StringIO()
    call_command("optimise", "status", stdout=out)
    assert "cli-opt" in out.getvalue() and "pending" in out.getvalue()
    out = io.StringIO()
    call_command("optimise", "report", "cli-opt", "--json", stdout=out)
    assert json.loads(out.getvalue())["job"] == "cli-opt"
    out = io.StringIO()
    call_command("optimise", "cancel", "cli-opt", stdout=out)
    assert "cancelled" in out.getvalue()
    with pytest.raises(CommandError, match="already cancelled"):
        call_command("optimise", "cancel", "cli-opt")
    with pytest.raises(CommandError, match="no stack named"):
        call_command("optimise", "start", "x", "--stack", "nope", "--dataset", "arith", "--budget-items", "500")
    with pytest.raises(CommandError, match="needs a budget"):
        call_command("optimise", "start", "x", "--stack", "qa-prod", "--dataset", "arith")
    with pytest.raises(CommandError, match="no user named"):
        call_command(
            "optimise", "start", "x", "--stack", "qa-prod", "--dataset", "arith", "--budget-items", "500",
            "--as", "ghost",
        )  # fmt: skip
