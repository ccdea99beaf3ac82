"""Evaluation runs on the tiny test model, in-process: chunking, idempotent writes, pinning, failures, metrics."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError

from registry.models import Dataset, DatasetItem, EvaluationRun, ModelArtifact, Prompt, ScalingConfig, Stack
from workers import evaluation, tasks

pytestmark = pytest.mark.django_db


@pytest.fixture
def dataset() -> Dataset:
    ds = Dataset.objects.create(name="tiny-qa", scorer="exact", content_hash="x" * 64, item_count=5)
    for i in range(5):
        DatasetItem.objects.create(
            dataset=ds,
            index=i,
            key=f"q{i}",
            inputs={"question": f"question {i}"},
            expected="yes" if i % 2 else "no",
        )
    return ds


@pytest.fixture
def prompt() -> Prompt:
    p = Prompt.objects.create(name="tiny")
    v1, _ = p.create_version(template="Q: {{ question }}", variables=["question"], params={"max_new_tokens": 6})
    p.move_label("production", v1)
    return p


def make_stack(prompt: Prompt, artifact: ModelArtifact, *, n: int = 1, name: str = "s") -> Stack:
    scaling, _ = ScalingConfig.objects.get_or_create(
        name=f"n{n}",
        defaults={
            "n_samples": n,
            "temperature": 1.0 if n > 1 else 0.0,
            "aggregation": "majority_vote" if n > 1 else "none",
        },
    )
    return Stack.objects.create(name=name, prompt=prompt, prompt_label="production", scaling=scaling, artifact=artifact)


def test_a_run_evaluates_every_item_once_and_finalises(
    prompt: Prompt, artifact: ModelArtifact, dataset: Dataset, settings
) -> None:  # type: ignore[no-untyped-def]
    settings.FULCRUM_CHUNK_SIZE = 2
    run = evaluation.create_run(make_stack(prompt, artifact), dataset)
    chunks = evaluation.plan_chunks(run.pk)
    assert [len(c) for c in chunks] == [2, 2, 1]
    run.refresh_from_db()
    assert run.status == "running" and run.started_at is not None
    for chunk in chunks:
        evaluation.evaluate_chunk(run.pk, chunk)
    run.refresh_from_db()
    assert run.status == "succeeded"
    assert run.items_done == 5 and run.results.count() == 5
    assert run.provider == "cpu"
    assert run.summary["items"] == 5
    assert run.summary["generated_tokens"] == sum(r.generated_tokens for r in run.results.all())
    scores = [r.score for r in run.results.all()]
    assert run.summary["accuracy"] == pytest.approx(sum(s or 0 for s in scores) / 5, abs=1e-4)


def test_a_redelivered_chunk_does_not_duplicate_results(
    prompt: Prompt, artifact: ModelArtifact, dataset: Dataset, settings
) -> None:  # type: ignore[no-untyped-def]
    settings.FULCRUM_CHUNK_SIZE = 3
    run = evaluation.create_run(make_stack(prompt, artifact), dataset)
    first, second = evaluation.plan_chunks(run.pk)
    evaluation.evaluate_chunk(run.pk, first)
    evaluation.evaluate_chunk(run.pk, first)  # the broker delivered it again
    run.refresh_from_db()
    assert run.results.count() == 3 and run.items_done == 3 and run.status == "running"
    # Planning again (e.g. the planning task was redelivered) only hands out what is not done yet.
    assert evaluation.plan_chunks(run.pk) == [second]
    evaluation.evaluate_chunk(run.pk, second)
    run.refresh_from_db()
    assert run.status == "succeeded" and run.results.count() == 5


def test_samples_are_aggregated_by_majority_vote(prompt: Prompt, artifact: ModelArtifact, dataset: Dataset) -> None:
    run = evaluation.create_run(make_stack(prompt, artifact, n=3), dataset)
    for chunk in evaluation.plan_chunks(run.pk):
        evaluation.evaluate_chunk(run.pk, chunk)
    for result in run.results.all():
        answers = [s["answer"] for s in result.samples]
        assert len(answers) == 3
        assert result.answer in answers
        assert answers.count(result.answer) == max(answers.count(a) for a in answers if a) or result.answer == ""
        assert result.generated_tokens == sum(s["tokens"] for s in result.samples)


def test_a_label_moved_after_creation_does_not_change_the_runs_prompt(
    prompt: Prompt, artifact: ModelArtifact, dataset: Dataset
) -> None:
    run = evaluation.create_run(make_stack(prompt, artifact), dataset)
    v1 = run.prompt_version
    v2, _ = prompt.create_version(template="Question: {{ question }}?", variables=["question"])
    prompt.move_label("production", v2)
    for chunk in evaluation.plan_chunks(run.pk):
        evaluation.evaluate_chunk(run.pk, chunk)
    run.refresh_from_db()
    assert run.prompt_version == v1
    assert all("Q: question" in r.rendered_prompt for r in run.results.all())
    assert evaluation.create_run(run.stack, dataset).prompt_version == v2


def test_a_cancelled_run_skips_its_remaining_chunks(
    prompt: Prompt, artifact: ModelArtifact, dataset: Dataset, settings
) -> None:  # type: ignore[no-untyped-def]
    settings.FULCRUM_CHUNK_SIZE = 2
    run = evaluation.create_run(make_stack(prompt, artifact), dataset)
    chunks = evaluation.plan_chunks(run.pk)
    evaluation.evaluate_chunk(run.pk, chunks[0])
    assert evaluation.cancel_run(run)
    assert evaluation.evaluate_chunk(run.pk, chunks[1]) == 0
    run.refresh_from_db()
    assert run.status == "cancelled" and run.results.count() == 2
    assert not evaluation.cancel_run(run)


def test_it_rejects_a_dataset_that_lacks_a_prompt_variable(prompt: Prompt, artifact: ModelArtifact) -> None:
    ds = Dataset.objects.create(name="other", content_hash="y" * 64, item_count=1)
    DatasetItem.objects.create(dataset=ds, index=0, key="a", inputs={"text": "hi"})
    with pytest.raises(evaluation.RunNotRunnable, match="question"):
        evaluation.create_run(make_stack(prompt, artifact), ds)
    assert not EvaluationRun.objects.exists()


def test_a_missing_model_fails_the_run_with_the_reason(
    prompt: Prompt, artifact: ModelArtifact, dataset: Dataset, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(artifact.path, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    artifact.path = str(broken)
    artifact.save()
    run = evaluation.create_run(make_stack(prompt, artifact), dataset)
    chunks = evaluation.plan_chunks(run.pk)
    with pytest.raises(Exception, match="model.onnx"):
        tasks.evaluate_chunk(run.pk, chunks[0])
    run.refresh_from_db()
    assert run.status == "failed"
    assert "model.onnx" in run.error
    assert run.results.count() == 0


def test_scaling_config_rejects_several_greedy_samples() -> None:
    with pytest.raises(ValidationError, match="temperature"):
        ScalingConfig(name="bad", n_samples=4, temperature=0.0).clean()


def test_metrics_endpoint_shows_evaluation_metrics(
    prompt: Prompt, artifact: ModelArtifact, dataset: Dataset, client
) -> None:  # type: ignore[no-untyped-def]
    run = evaluation.create_run(make_stack(prompt, artifact, name="metrics-stack"), dataset)
    for chunk in evaluation.plan_chunks(run.pk):
        evaluation.evaluate_chunk(run.pk, chunk)
    body = client.get("/metrics").content.decode()
    assert 'fulcrum_evaluation_runs_total{status="succeeded"}' in body
    assert 'fulcrum_evaluation_accuracy_ratio{dataset="tiny-qa",stack="metrics-stack"}' in body
    assert 'fulcrum_generated_tokens_total{provider="cpu"}' in body
    assert "fulcrum_inference_request_seconds_bucket" in body


def test_best_of_n_keeps_the_sample_with_the_highest_mean_logprob(
    prompt: Prompt, artifact: ModelArtifact, dataset: Dataset
) -> None:
    scaling = ScalingConfig.objects.create(name="best3", n_samples=3, temperature=1.0, aggregation="best_of_n")
    stack = Stack.objects.create(
        name="best", prompt=prompt, prompt_label="production", scaling=scaling, artifact=artifact
    )
    run = evaluation.create_run(stack, dataset)
    for chunk in evaluation.plan_chunks(run.pk):
        evaluation.evaluate_chunk(run.pk, chunk)
    for result in run.results.all():
        usable = [s for s in result.samples if s["answer"].strip()]
        if usable:
            best = max(usable, key=lambda s: s["mean_logprob"])
            assert result.answer == best["answer"]


def test_a_prompt_ensemble_pools_samples_from_every_pinned_version(
    prompt: Prompt, artifact: ModelArtifact, dataset: Dataset
) -> None:
    other = Prompt.objects.create(name="tiny-alt")
    alt, _ = other.create_version(template="Please answer: {{ question }}", variables=["question"])
    scaling = ScalingConfig.objects.create(name="ens2", n_samples=2, temperature=1.0, aggregation="prompt_ensemble")
    stack = Stack.objects.create(
        name="ens", prompt=prompt, prompt_label="production", scaling=scaling, artifact=artifact
    )
    stack.ensemble_versions.add(alt)
    run = evaluation.create_run(stack, dataset)
    stack.ensemble_versions.clear()  # later edits of the stack do not change a created run
    assert list(run.ensemble_versions.all()) == [alt]
    for chunk in evaluation.plan_chunks(run.pk):
        evaluation.evaluate_chunk(run.pk, chunk)
    for result in run.results.all():
        assert [s["prompt_version"] for s in result.samples] == ["tiny@v1"] * 2 + ["tiny-alt@v1"] * 2
        assert "Please answer: question" in result.rendered_prompt and "Q: question" in result.rendered_prompt
        answers = [s["answer"] for s in result.samples]
        assert result.answer in answers


@pytest.mark.parametrize(
    ("strategy", "answers", "logprobs", "expected"),
    [
        ("none", ["a", "b", "b"], [-1.0, -0.5, -0.4], 0),
        ("majority_vote", ["a", "b", "b"], [-0.1, -0.5, -0.4], 1),
        ("prompt_ensemble", ["a", "c", "a", "c", "c"], [0, 0, 0, 0, 0], 1),
        ("best_of_n", ["a", "b", "b"], [-1.0, -0.5, -0.4], 2),
        ("best_of_n", ["", "b", "c"], [-0.01, -0.5, -0.9], 1),
    ],
)
def test_choose_sample_follows_the_aggregation(
    strategy: str, answers: list[str], logprobs: list[float], expected: int
) -> None:
    assert evaluation.choose_sample(strategy, answers, logprobs) == expected
