"""Helpers of the experiment tests: small datasets, stacks, in-process evaluation."""

from __future__ import annotations

from registry.models import Dataset, DatasetItem, EvaluationRun, ModelArtifact, Prompt, ScalingConfig, Stack
from workers import evaluation


def make_dataset(name: str, n: int = 12, *, kinds: bool = False, scorer: str = "exact") -> Dataset:
    ds = Dataset.objects.create(name=name, scorer=scorer, content_hash=(name * 64)[:64], item_count=n)
    for i in range(n):
        kind = ("harmful" if i % 2 else "benign") if kinds else ""
        DatasetItem.objects.create(
            dataset=ds,
            index=i,
            key=f"q{i}",
            inputs={"question": f"question number {i}"},
            expected="" if kinds else ("yes" if i % 2 else "no"),
            kind=kind,
        )
    return ds


def scaling(n: int) -> ScalingConfig:
    config, _ = ScalingConfig.objects.get_or_create(
        name=f"n{n}",
        defaults={
            "n_samples": n,
            "temperature": 1.0 if n > 1 else 0.0,
            "aggregation": "majority_vote" if n > 1 else "none",
            "seed": 1,
        },
    )
    return config


def make_stack(name: str, artifact: ModelArtifact, prompt: Prompt, *, n: int = 1, version: int | None = None) -> Stack:
    if version is None:
        return Stack.objects.create(
            name=name, prompt=prompt, prompt_label="production", scaling=scaling(n), artifact=artifact
        )
    return Stack.objects.create(
        name=name, prompt_version=prompt.versions.get(number=version), scaling=scaling(n), artifact=artifact
    )


def evaluate_here(run: EvaluationRun) -> EvaluationRun:
    """Evaluate a run in this process (the worker's code path without the broker)."""
    for chunk in evaluation.plan_chunks(run.pk):
        evaluation.evaluate_chunk(run.pk, chunk)
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    return run
