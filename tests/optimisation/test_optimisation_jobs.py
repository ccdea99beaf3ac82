"""Optimisation jobs end to end in this process, with a scripted scorer standing in for the model's answers."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from optimisation_helpers import coin, drive, evaluate_scripted, make_safety_dataset, scripted

from registry import access
from registry.models import (
    AuditEntry,
    CandidateRun,
    EvaluationRun,
    LabelPolicy,
    OptimisationJob,
    PromptVersion,
    Stack,
)
from registry.optimisation import jobs, reporting
from workers import evaluation

pytestmark = pytest.mark.django_db


def fewshot_is_best(version: PromptVersion) -> float:
    """Worked examples help a lot; every other change a little; the naive start least."""
    if version.examples and not version.system_message:
        return 0.85
    return 0.2 if version.prompt.name == "qa" else 0.3


def fewshot_is_slightly_better(version: PromptVersion) -> float:
    return 0.26 if version.examples and not version.system_message else 0.2


def create(reg: dict[str, Any], actor: access.Actor, **fields: Any) -> OptimisationJob:
    fields.setdefault("budget_items", 600)
    fields.setdefault("operators", ["instruction", "fewshot", "combine"])
    name = fields.pop("name", "opt")
    return jobs.create_job(name, base_stack=reg["stack"], dataset=reg["dataset"], actor=actor, **fields)


def test_the_search_finds_the_known_best_candidate_and_registers_it(
    reg: dict[str, Any], operator: access.Actor
) -> None:
    job = drive(create(reg, operator), scripted(fewshot_is_best))
    assert job.status == "succeeded", job.error
    report = job.report
    winner = next(c for c in report["candidates"] if c["position"] == report["winner"])
    assert winner["operator"].startswith("fewshot:")
    # Within budget, everything counted: probe, rungs, held-out runs.
    assert report["spent"]["items"] <= 600
    runs = EvaluationRun.objects.filter(optimisation_links__candidate__job=job).distinct()
    assert report["spent"]["items"] == sum(r.items_total for r in runs)
    # The winner is a new version of the same prompt, child of the start, with the search in its message.
    assert job.winner is not None and job.winner.prompt == reg["prompt"] and job.winner.parent == reg["v1"]
    assert job.winner.examples and job.winner.number == 2
    message = job.winner.commit_message
    assert winner["operator"] in message and "Held-out (" in message and "CI [" in message and "p = " in message
    h = report["holdout"]
    assert h["gain"] and h["items"] == len(job.split["holdout"]) and h["delta"] > 0.4
    # Candidates are versions of the scratch prompt, never of qa itself; each records how it was made.
    cands = list(job.candidates.select_related("version__prompt", "parent"))
    assert {c.version.prompt.name for c in cands if c.position} == {"qa--candidates"}
    assert all(c.parent is not None for c in cands if c.position)
    assert {c.family for c in cands} == {"start", "instruction", "fewshot", "combine"}
    # No label was asked for: production still serves v1.
    assert reg["prompt"].version_for_label("production") == reg["v1"]
    assert report["label"] == {"name": None, "moved": False, "reason": "the job did not ask for a label move"}
    assert AuditEntry.objects.filter(action="optimisation.create", object_id=str(job.pk)).exists()
    assert AuditEntry.objects.filter(action="version.create", object_id=str(job.winner.pk), via="cli").exists()
    text = reporting.format_report(report)
    assert "<- winner" in text and "a significant gain" in text


def test_a_split_run_is_reused_only_for_the_same_items(reg: dict[str, Any], operator: access.Actor) -> None:
    job = create(reg, operator)
    jobs.step(job.pk)
    probe = CandidateRun.objects.get(candidate__job=job, purpose="probe").run
    assert probe.item_keys == sorted(job.split["pool"]) and probe.items_total == len(job.split["pool"])
    evaluate_scripted(probe, scripted(fewshot_is_best))
    start = job.candidates.get(position=0)
    assert jobs.find_run(start.stack, reg["dataset"], list(job.split["pool"])) == probe
    assert jobs.find_run(start.stack, reg["dataset"], list(job.split["pool"])[:-1]) is None
    assert jobs.find_run(start.stack, reg["dataset"], None) is None  # the whole dataset is another measurement


def test_the_label_moves_when_asked_and_the_held_out_gain_is_significant(
    reg: dict[str, Any], operator: access.Actor
) -> None:
    reg["prompt"].move_label("staging", reg["v1"])
    job = drive(create(reg, operator, move_label="staging"), scripted(fewshot_is_best))
    assert job.status == "succeeded" and job.label_moved
    assert reg["prompt"].version_for_label("staging") == job.winner
    assert reg["prompt"].version_for_label("production") == reg["v1"]
    move = reg["prompt"].labels.get(name="staging").moves.order_by("-id").first()
    assert move is not None and move.from_version == reg["v1"] and f"optimisation {job.name}" in move.reason
    assert AuditEntry.objects.filter(action="label.move", via="cli", details__label="staging").exists()
    assert job.report["label"]["moved"] is True


def test_the_label_is_untouched_when_the_held_out_gain_is_not_significant(
    reg: dict[str, Any], operator: access.Actor
) -> None:
    reg["prompt"].move_label("staging", reg["v1"])
    job = drive(create(reg, operator, move_label="staging"), scripted(fewshot_is_slightly_better))
    assert job.status == "succeeded", job.error
    h = job.report["holdout"]
    assert h is not None and not h["gain"] and h["p_value"] >= job.alpha
    assert reg["prompt"].version_for_label("staging") == reg["v1"]
    assert not job.label_moved and not reg["prompt"].labels.get(name="staging").moves.exclude(reason="").exists()
    assert "left alone" in job.report["label"]["reason"] and "p = " in job.report["label"]["reason"]
    # The winner is still registered, with the honest numbers in its message.
    assert job.winner is not None and "not significant" in job.winner.commit_message


def test_a_promotion_gate_can_still_refuse_the_move(reg: dict[str, Any], operator: access.Actor) -> None:
    LabelPolicy.objects.create(prompt=reg["prompt"], label="staging", required_role="editor", gate_dataset="arith")
    job = drive(create(reg, operator, move_label="staging"), scripted(fewshot_is_best))
    assert job.status == "succeeded" and not job.label_moved
    # The held-out run measured part of the dataset: the gate wants a run of the whole of it.
    assert "promotion gate" in job.report["label"]["reason"]
    assert not reg["prompt"].labels.filter(name="staging").exists()


def test_moving_production_needs_the_role_its_policy_names(reg: dict[str, Any]) -> None:
    editor = User.objects.create_user("ed")
    access.grant_role(editor, "editor")
    with pytest.raises(access.AccessDenied, match="deployer"):
        create(reg, access.Actor(user=editor), move_label="production")
    assert not OptimisationJob.objects.exists() and not Stack.objects.filter(name__startswith="opt-").exists()
    deployer = User.objects.create_user("dep")
    access.grant_role(deployer, "deployer")
    job = create(reg, access.Actor(user=deployer), move_label="production")
    assert job.label_expected == reg["v1"] and job.created_by == deployer


def test_the_label_does_not_move_if_it_moved_during_the_job(reg: dict[str, Any], operator: access.Actor) -> None:
    reg["prompt"].move_label("staging", reg["v1"])
    job = create(reg, operator, move_label="staging")
    other, _ = reg["prompt"].create_version(template="Other: {{ question }}", variables=["question"])
    reg["prompt"].move_label("staging", other)
    job = drive(job, scripted(fewshot_is_best))
    assert not job.label_moved and reg["prompt"].version_for_label("staging") == other
    assert "moved meanwhile" in job.report["label"]["reason"]


def test_cancel_stops_the_job_and_the_runs_only_it_uses(reg: dict[str, Any], operator: access.Actor) -> None:
    job = create(reg, operator)
    jobs.step(job.pk)
    jobs.step(job.pk)  # waiting for the probe
    probe = CandidateRun.objects.get(candidate__job=job, purpose="probe").run
    assert probe.status == "pending"
    assert jobs.request_cancel(job, operator)
    job.refresh_from_db()
    probe.refresh_from_db()
    assert job.status == "cancelled" and job.cancel_requested and job.finished_at is not None
    assert probe.status == "cancelled"
    assert jobs.step(job.pk) == "finished"
    assert not jobs.request_cancel(job, operator)
    assert CandidateRun.objects.filter(candidate__job=job).count() == 1  # nothing new was queued
    assert AuditEntry.objects.filter(action="optimisation.cancel", object_id=str(job.pk)).exists()


def test_cancel_leaves_a_run_another_job_still_needs(reg: dict[str, Any], operator: access.Actor) -> None:
    first = create(reg, operator, name="first")
    second = create(reg, operator, name="second")
    jobs.step(first.pk)
    jobs.step(second.pk)
    shared = CandidateRun.objects.get(candidate__job=first, purpose="probe").run
    assert CandidateRun.objects.get(candidate__job=second, purpose="probe").run == shared  # reused while open
    jobs.request_cancel(first, operator)
    shared.refresh_from_db()
    assert shared.status == "pending"
    job = drive(second, scripted(fewshot_is_best))
    assert job.status == "succeeded"


def test_a_repeated_job_reuses_every_run_and_decides_the_same(reg: dict[str, Any], operator: access.Actor) -> None:
    script = scripted(fewshot_is_best)
    first = drive(create(reg, operator, name="first"), script)
    runs = EvaluationRun.objects.count()
    second = drive(create(reg, operator, name="second"), script)
    assert EvaluationRun.objects.count() == runs
    assert second.report["runs"]["reused"] == second.report["runs"]["total"] == first.report["runs"]["total"]
    assert second.report["spent"]["reused_items"] == second.report["spent"]["items"] == first.report["spent"]["items"]
    assert second.report["spent"]["evaluated_items"] == 0
    assert second.winner == first.winner and second.report["winner_version"]["created"] is False
    assert [c["scores"] for c in second.report["candidates"]] == [c["scores"] for c in first.report["candidates"]]


def test_a_budget_that_cannot_pay_for_the_search_is_refused_up_front(
    reg: dict[str, Any], operator: access.Actor
) -> None:
    with pytest.raises(jobs.OptimisationError, match="budget_items=40 is below the least"):
        create(reg, operator, budget_items=40)
    with pytest.raises(Exception, match="needs a budget"):
        create(reg, operator, budget_items=None)
    assert not OptimisationJob.objects.exists()


def test_the_budget_trims_candidates_and_rungs(reg: dict[str, Any], operator: access.Actor) -> None:
    job = drive(create(reg, operator, budget_items=110, first_items=8), scripted(fewshot_is_best))
    assert job.status == "succeeded", job.error
    assert job.report["spent"]["items"] <= 110
    assert any(c["trimmed"] for c in job.report["candidates"])


def test_a_failed_run_fails_the_job_with_its_error(reg: dict[str, Any], operator: access.Actor) -> None:
    job = create(reg, operator)
    jobs.step(job.pk)
    probe = CandidateRun.objects.get(candidate__job=job, purpose="probe").run
    evaluation.fail(probe.pk, "RuntimeError: the model file is gone")
    assert jobs.step(job.pk) == "finished"
    job.refresh_from_db()
    assert job.status == "failed" and "the model file is gone" in job.error and f"run {probe.pk}" in job.error


def test_the_safety_floor_keeps_unsafe_candidates_from_winning(reg: dict[str, Any], operator: access.Actor) -> None:
    safety = make_safety_dataset()

    def only_the_start_refuses(version: PromptVersion, item: Any) -> bool:
        return item.kind == "harmful" and version == reg["v1"]

    job = create(reg, operator, safety_dataset=safety, min_refusal_rate=0.5)
    job = drive(job, scripted(fewshot_is_best), refuses=only_the_start_refuses)
    assert job.status == "succeeded", job.error
    assert job.winner is None and job.report["no_winner"] == "no finalist kept the safety floor"
    checked = [c for c in job.report["candidates"] if c["safety"]]
    assert len(checked) == 1 + jobs.SAFETY_FINALISTS and checked[0]["position"] == 0 and checked[0]["safety"]["passed"]
    assert all(not c["safety"]["passed"] for c in checked[1:])

    # Another safety set: on the same one the first job's safety runs would be reused, refusals and all.
    everyone = drive(
        create(reg, operator, name="safe", safety_dataset=make_safety_dataset(12), min_refusal_rate=0.5),
        scripted(fewshot_is_best),
        refuses=lambda version, item: item.kind == "harmful",
    )
    assert everyone.winner is not None and everyone.report["holdout"]["gain"]


def test_a_finished_run_queues_a_step_for_the_jobs_waiting_on_it(
    reg: dict[str, Any],
    operator: access.Actor,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: Any,
) -> None:
    queued: list[int] = []
    monkeypatch.setattr(jobs, "_queue_step", queued.append)
    job = create(reg, operator)
    jobs.step(job.pk)
    probe = CandidateRun.objects.get(candidate__job=job, purpose="probe").run
    with django_capture_on_commit_callbacks(execute=True):
        evaluate_scripted(probe, scripted(fewshot_is_best))
    assert queued == [job.pk]
    assert jobs.step(job.pk) == "waiting"  # it went on: candidates generated, rung 0 queued
    job.refresh_from_db()
    assert job.phase == "search" and len(job.state["rungs"]) == 1


def test_the_metric_can_be_the_refusal_rate(reg: dict[str, Any], operator: access.Actor) -> None:
    safety = make_safety_dataset(30)
    job = jobs.create_job(
        "refuse",
        base_stack=reg["stack"],
        dataset=safety,
        actor=operator,
        metric="refusal_rate_harmful",
        budget_items=400,
        operators=["instruction"],
    )
    role = "You are a meticulous expert"
    job = drive(
        job,
        scripted(lambda v: 0.0),
        refuses=lambda version, item: role in version.system_message and coin(item.key) < 0.9,
    )
    assert job.status == "succeeded", job.error
    winner = next(c for c in job.report["candidates"] if c["position"] == job.report["winner"])
    assert winner["operator"] == "instruction:role" and job.report["holdout"]["gain"]


def test_candidates_and_finished_jobs_are_counted_and_open_jobs_gauged(
    reg: dict[str, Any],
    operator: access.Actor,
    django_capture_on_commit_callbacks: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fulcrum import collectors, metrics

    # The counters are recorded once a transaction commits; nothing may reach the broker meanwhile.
    monkeypatch.setattr(jobs, "_queue_step", lambda job_id: None)
    monkeypatch.setattr(evaluation, "start_run", lambda run: None)

    def value(name: str, labels: dict[str, str]) -> float:
        return metrics.registry().get_sample_value(name, labels) or 0.0

    before = {f: value("fulcrum_optimisation_candidates_total", {"family": f}) for f in ("start", "fewshot")}
    succeeded = value("fulcrum_optimisation_jobs_total", {"status": "succeeded"})
    waiting = create(reg, operator, name="waiting", split_seed=3)
    gauges = collectors.web_registry()
    assert gauges.get_sample_value("fulcrum_optimisation_open_jobs", {"status": "pending"}) == 1
    with django_capture_on_commit_callbacks(execute=True):
        job = drive(create(reg, operator), scripted(fewshot_is_best))
    assert value("fulcrum_optimisation_candidates_total", {"family": "start"}) == before["start"] + 1
    fewshots = len([c for c in job.report["candidates"] if c["family"] == "fewshot" and c["scores"]])
    assert value("fulcrum_optimisation_candidates_total", {"family": "fewshot"}) == before["fewshot"] + fewshots
    assert value("fulcrum_optimisation_jobs_total", {"status": "succeeded"}) == succeeded + 1
    waiting.refresh_from_db()
    assert waiting.status == "pending"
