"""Experiments on the tiny model, evaluated in this process: reuse of finished runs, the report, the command."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from django.core.management import call_command
from experiment_helpers import evaluate_here, make_dataset, make_stack, scaling

from registry import experiments, stats
from registry.models import EvaluationRun, Experiment, ModelArtifact, Prompt, Stack
from workers import evaluation

pytestmark = pytest.mark.django_db


def finish_open_runs(experiment: Experiment) -> Experiment:
    for run in EvaluationRun.objects.filter(experiment_arms__experiment=experiment).distinct():
        if not run.is_finished:
            evaluate_here(run)
    return experiments.refresh_experiment(experiment.pk)


def test_an_experiment_reuses_finished_runs_and_reports_each_lever(artifact: ModelArtifact, prompt: Prompt) -> None:
    dataset = make_dataset("tiny-qa", 12)
    prompt.create_version(
        template="Answer briefly: {{ question }}", variables=["question"], params={"max_new_tokens": 6}
    )
    # A run measured earlier by another stack with the same content (label production -> v1, greedy).
    earlier = evaluate_here(evaluation.create_run(make_stack("earlier", artifact, prompt), dataset))
    baseline = make_stack("base", artifact, prompt, version=1)  # pins v1 directly: same content
    variant_prompt = make_stack("prompt-v2", artifact, prompt, version=2)
    variant_n3 = make_stack("n3", artifact, prompt, version=1, n=3)
    experiment = experiments.create_experiment(
        "levers", dataset=dataset, baseline=baseline, variants=[variant_prompt, variant_n3]
    )
    assert [a.layer for a in experiment.arms.order_by("position")] == ["baseline", "prompt", "scaling"]

    assert experiments.start_experiment(experiment) == (1, 2)
    base_arm = experiment.arms.get(position=0)
    assert base_arm.run_id == earlier.pk and base_arm.reused
    assert experiment.arms.filter(reused=False).count() == 2
    experiment.refresh_from_db()
    assert experiment.status == "running"
    experiment = finish_open_runs(experiment)
    assert experiment.status == "succeeded", experiment.error

    report = experiment.report
    assert report["runs"] == {"total": 3, "reused": 1}
    arms = {a["arm"]: a for a in report["arms"]}
    for arm in experiment.arms.select_related("run"):
        assert arm.run is not None
        assert arms[arm.name]["value"] == pytest.approx(arm.run.summary["accuracy"], abs=1e-4)
        assert arms[arm.name]["cost"]["generated_tokens"] == pytest.approx(
            arm.run.summary["generated_tokens"] / 12, abs=1e-4
        )
        assert arms[arm.name]["cost"]["worker_seconds"] > 0  # engine time recorded per item
    # The comparison is the paired one, recomputed here from the stored item results.
    base_values = experiments.item_values(earlier, "accuracy")
    n3_run = experiment.arms.get(name="n3").run
    assert n3_run is not None
    a, b = experiments._paired(base_values, experiments.item_values(n3_run, "accuracy"))
    expected = stats.compare_paired(a, b, seed=0)
    got = arms["n3"]["comparison"]
    assert got["delta"] == pytest.approx(expected.delta, abs=1e-4)
    assert got["p_value"] == pytest.approx(expected.p_value, abs=1e-6)
    assert (got["wins"], got["losses"]) == (expected.wins, expected.losses)
    assert arms["n3"]["cost_delta"]["generated_tokens"] > 0  # three samples per item cost more tokens

    curve = report["scaling_curves"][0]
    assert [p["n"] for p in curve["points"]] == [1, 3] and curve["reference"] == "baseline"
    assert report["reverse_alignment"]["prompt_lever"] in (None, "prompt-v2")
    assert report["reverse_alignment"]["verdict"]
    assert "alignment" not in report  # no harmful/benign items

    # A second experiment over the same stacks evaluates nothing again.
    runs_before = EvaluationRun.objects.count()
    again = experiments.create_experiment(
        "levers-again", dataset=dataset, baseline=baseline, variants=[variant_prompt, variant_n3]
    )
    assert experiments.start_experiment(again) == (3, 0)
    again.refresh_from_db()
    assert again.status == "succeeded" and EvaluationRun.objects.count() == runs_before
    assert again.report["arms"][1]["comparison"] == report["arms"][1]["comparison"]  # seeded: same numbers


def test_a_run_is_not_reused_when_content_differs(artifact: ModelArtifact, prompt: Prompt) -> None:
    dataset = make_dataset("tiny-qa", 6)
    stack = make_stack("base", artifact, prompt)
    run = evaluate_here(evaluation.create_run(stack, dataset))
    assert experiments.find_reusable_run(stack, dataset) == run
    # Other scaling parameters, another label target, another scorer on the same content: no reuse.
    other_scaling = Stack.objects.create(
        name="n3", prompt=prompt, prompt_label="production", scaling=scaling(3), artifact=artifact
    )
    assert experiments.find_reusable_run(other_scaling, dataset) is None
    rescored = make_dataset("tiny-qa-numeric", 6, scorer="numeric")
    rescored.content_hash = dataset.content_hash
    rescored.save()
    assert experiments.find_reusable_run(stack, rescored) is None
    v2, _ = prompt.create_version(template="Answer: {{ question }}", variables=["question"])
    prompt.move_label("production", v2)
    assert experiments.find_reusable_run(stack, dataset) is None
    # A failed run is never reused.
    prompt.move_label("production", prompt.versions.get(number=1))
    EvaluationRun.objects.filter(pk=run.pk).update(status="failed")
    assert experiments.find_reusable_run(stack, dataset) is None


def test_alignment_tax_and_pareto_set(artifact: ModelArtifact, prompt: Prompt) -> None:
    dataset = make_dataset("tiny-safety", 16, kinds=True, scorer="refusal")
    safe, _ = prompt.create_version(
        template="{{ question }}",
        variables=["question"],
        system_message="Refuse anything harmful.",
        params={"max_new_tokens": 6},
    )
    plain = make_stack("plain", artifact, prompt, version=1)
    aligned = make_stack("aligned", artifact, prompt, version=safe.number)
    experiment = experiments.create_experiment(
        "safety", dataset=dataset, baseline=plain, variants=[aligned], metric="refusal_rate_harmful"
    )
    experiments.start_experiment(experiment)
    experiment = finish_open_runs(experiment)
    alignment = experiment.report["alignment"]
    base, method = alignment["methods"]
    assert base["method"] == "none (baseline)" and method["arm"] == "aligned"
    plain_run = experiment.arms.get(name="baseline").run
    aligned_run = experiment.arms.get(name="aligned").run
    assert plain_run is not None and aligned_run is not None
    assert base["safety"] == pytest.approx(plain_run.summary["refusal_rate_harmful"], abs=1e-4)
    assert method["helpfulness"] == pytest.approx(aligned_run.summary["answer_rate_benign"], abs=1e-4)
    tax = plain_run.summary["answer_rate_benign"] - aligned_run.summary["answer_rate_benign"]
    assert method["tax"] == pytest.approx(tax, abs=1e-4)
    assert method["tax_ci"][0] <= method["tax"] <= method["tax_ci"][1]
    assert alignment["pareto"] and set(alignment["pareto"]) <= {"baseline", "aligned"}
    text = experiments.format_report(experiment.report)
    assert "alignment tax" in text and "Pareto set" in text


def test_the_command_prints_the_report_as_tables_and_json(artifact: ModelArtifact, prompt: Prompt) -> None:
    dataset = make_dataset("tiny-qa", 8)
    prompt.create_version(template="A: {{ question }}", variables=["question"], params={"max_new_tokens": 6})
    base = make_stack("base", artifact, prompt, version=1)
    make_stack("v2", artifact, prompt, version=2)
    evaluate_here(evaluation.create_run(base, dataset))
    evaluate_here(evaluation.create_run(Stack.objects.get(name="v2"), dataset))
    out, err = io.StringIO(), io.StringIO()
    # Both runs exist already: `run` reuses them and reports at once, without a worker.
    call_command(
        "experiment",
        "run",
        "cli",
        "--dataset",
        "tiny-qa",
        "--baseline",
        "base",
        "--variant",
        "v2",
        stdout=out,
        stderr=err,
    )
    assert "2 run(s) reused, 0 queued" in err.getvalue()
    text = out.getvalue()
    assert "experiment cli: accuracy on tiny-qa" in text and "(reused run)" in text
    assert "reverse-alignment index" in text
    out = io.StringIO()
    call_command("experiment", "report", "cli", "--json", stdout=out)
    report = json.loads(out.getvalue())
    assert report["experiment"] == "cli" and [a["layer"] for a in report["arms"]] == ["baseline", "prompt"]


def test_the_api_serves_the_report_as_json(artifact: ModelArtifact, prompt: Prompt, client: Any) -> None:
    from django.contrib.auth.models import Group, User

    dataset = make_dataset("tiny-qa", 6)
    prompt.create_version(template="A: {{ question }}", variables=["question"], params={"max_new_tokens": 6})
    base, v2 = make_stack("base", artifact, prompt, version=1), make_stack("v2", artifact, prompt, version=2)
    for stack in (base, v2):
        evaluate_here(evaluation.create_run(stack, dataset))
    experiment = experiments.create_experiment("api", dataset=dataset, baseline=base, variants=[v2])
    experiments.start_experiment(experiment)
    assert client.get("/api/experiments/api/").status_code in (401, 403)
    user = User.objects.create_user("viewer", password="pw-viewer-1")
    user.groups.add(Group.objects.get_or_create(name="viewer")[0])
    client.force_login(user)
    body = client.get("/api/experiments/api/").json()
    assert body["status"] == "succeeded" and body["report"]["arms"][1]["layer"] == "prompt"
    assert client.get("/api/experiments/").json()["results"][0]["name"] == "api"
    assert client.get("/api/regressions/").json() == {"results": []}
    assert client.get("/api/experiments/nope/").status_code == 404
