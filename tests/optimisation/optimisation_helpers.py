"""Helpers of the optimisation tests: a small arithmetic registry and a scripted stand-in for the workers.

`drive` advances a job the way the workers would, in this process: it steps the job, and every run the job
queued is "evaluated" by a script that decides each item's score from the run's prompt version, then finalised
through workers.evaluation.finalise, the same code a worker's last chunk calls.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from registry.models import (
    Dataset,
    DatasetItem,
    EvaluationRun,
    ItemResult,
    ModelArtifact,
    OptimisationJob,
    Prompt,
    PromptVersion,
    ScalingConfig,
    Stack,
)
from registry.optimisation import jobs
from workers import evaluation

# (version, item) -> probability that the item is answered correctly
Script = Callable[[PromptVersion, DatasetItem], float]


def make_registry(n_items: int = 60, *, name: str = "arith") -> dict[str, Any]:
    artifact = ModelArtifact.objects.create(
        name="scripted",
        sha256="e" * 64,
        path="/nonexistent/scripted",
        source_kind=ModelArtifact.SourceKind.ONNX,
        source_path="/nonexistent/scripted",
        source_sha256="f" * 64,
    )
    prompt = Prompt.objects.create(name="qa")
    v1, _ = prompt.create_version(template="{{ question }}", variables=["question"], params={"max_new_tokens": 32})
    prompt.move_label("production", v1)
    scaling = ScalingConfig.objects.create(name="greedy")
    stack = Stack.objects.create(
        name="qa-prod", prompt=prompt, prompt_label="production", scaling=scaling, artifact=artifact
    )
    dataset = make_dataset(name, n_items)
    return {"artifact": artifact, "prompt": prompt, "v1": v1, "scaling": scaling, "stack": stack, "dataset": dataset}


def make_dataset(name: str, n_items: int) -> Dataset:
    dataset = Dataset.objects.create(
        name=name,
        scorer="numeric",
        content_hash=hashlib.sha256(f"{name}:{n_items}".encode()).hexdigest(),
        item_count=n_items,
    )
    for i in range(n_items):
        a, b = i % 7 + 1, i % 5 + 2
        DatasetItem.objects.create(
            dataset=dataset,
            index=i,
            key=f"q{i:03d}",
            inputs={"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?"},
            expected=str(a + b),
        )
    return dataset


def coin(*parts: object) -> float:
    """A fixed number in [0, 1) for the given parts: scripted outcomes are the same on every run."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def scripted(probability: Callable[[PromptVersion], float]) -> Script:
    """Item i is correct when coin(item) < p(version): a better version gets every item a worse one gets, and more."""
    return lambda version, item: 1.0 if coin(item.key) < probability(version) else 0.0


def make_safety_dataset(n_each: int = 10) -> Dataset:
    dataset = Dataset.objects.create(
        name="safety",
        scorer="refusal",
        content_hash=hashlib.sha256(f"safety:{n_each}".encode()).hexdigest(),
        item_count=2 * n_each,
    )
    for i in range(2 * n_each):
        kind = "harmful" if i % 2 else "benign"
        DatasetItem.objects.create(
            dataset=dataset, index=i, key=f"s{i:03d}", inputs={"question": f"{kind} request {i}"}, kind=kind
        )
    return dataset


def evaluate_scripted(
    run: EvaluationRun,
    script: Script,
    tokens: int = 10,
    refuses: Callable[[PromptVersion, DatasetItem], bool] | None = None,
) -> None:
    """Store a result for every item of the run as the script says, then finalise it like a worker does."""
    chunks = evaluation.plan_chunks(run.pk)
    run.refresh_from_db()
    if run.is_finished:
        return
    for chunk in chunks:
        for item in DatasetItem.objects.filter(pk__in=chunk):
            correct = script(run.prompt_version, item)
            ItemResult.objects.create(
                run=run,
                item=item,
                rendered_prompt=item.inputs["question"],
                samples=[{"text": "x"}],
                answer=item.expected if correct else "0",
                score=correct if item.kind == "" else None,
                refused=bool(refuses and refuses(run.prompt_version, item)),
                generated_tokens=tokens,
            )
    EvaluationRun.objects.filter(pk=run.pk).update(items_done=run.items_total)
    evaluation.finalise(run.pk)


def drive(
    job: OptimisationJob,
    script: Script,
    *,
    max_rounds: int = 50,
    refuses: Callable[[PromptVersion, DatasetItem], bool] | None = None,
) -> OptimisationJob:
    """Step the job and evaluate what it queues until it finishes (or nothing is left to evaluate)."""
    for _ in range(max_rounds):
        jobs.step(job.pk)
        job.refresh_from_db()
        if job.is_finished:
            return job
        open_runs = EvaluationRun.objects.filter(
            optimisation_links__candidate__job=job, status__in=["pending", "running"]
        ).distinct()
        if not open_runs:
            raise AssertionError(f"job {job.name} waits in phase {job.phase} with no open run")
        for run in open_runs:
            evaluate_scripted(run, script, refuses=refuses)
    raise AssertionError(f"job {job.name} did not finish in {max_rounds} rounds")
