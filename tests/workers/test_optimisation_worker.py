"""A small optimisation job on the tiny model, advanced and evaluated by a real `manage.py worker` process."""

from __future__ import annotations

import os

import pytest

from registry import access
from registry.models import Dataset, DatasetItem, ItemResult, ModelArtifact, Prompt, ScalingConfig, Stack
from registry.optimisation import jobs

pytestmark = pytest.mark.django_db(transaction=True)

QUESTIONS = [
    ("What is two plus two?", "four"),
    ("What is the capital of France?", "Paris"),
    ("How many legs does a spider have?", "eight"),
    ("Name a primary colour.", "red|blue|yellow"),
    ("Translate the word house into French.", "maison"),
    ("Translate the word water into Spanish.", "agua"),
    ("When does the library open?", "nine"),
    ("When does the library close?", "five"),
]


def test_a_small_job_runs_end_to_end_on_a_worker_process(artifact: ModelArtifact, worker_process) -> None:  # type: ignore[no-untyped-def]
    dataset = Dataset.objects.create(name="tiny-qa", scorer="exact", content_hash="9" * 64, item_count=16)
    for i in range(16):
        question, answer = QUESTIONS[i % len(QUESTIONS)]
        DatasetItem.objects.create(
            dataset=dataset, index=i, key=f"t{i:02d}", inputs={"question": f"{question} ({i})"}, expected=answer
        )
    prompt = Prompt.objects.create(name="tiny")
    version, _ = prompt.create_version(
        template="Q: {{ question }}", variables=["question"], params={"max_new_tokens": 6}
    )
    stack = Stack.objects.create(
        name="tiny-greedy",
        prompt_version=version,
        scaling=ScalingConfig.objects.create(name="greedy"),
        artifact=artifact,
    )
    job = jobs.create_job(
        "tiny-e2e",
        base_stack=stack,
        dataset=dataset,
        actor=access.OperatorActor(),
        budget_items=150,
        operators=["instruction", "fewshot", "meta"],
        max_candidates=4,
        first_items=3,
        pool_size=3,
        examples_k=2,
        meta_proposals=2,
        holdout_fraction=0.4,
    )
    with worker_process() as worker:
        jobs.start_job(job)  # outside a transaction: queued at once
        job = jobs.wait_for(job, timeout=600, poll=0.5, alive=lambda: worker.poll() is None)

    assert job.status == "succeeded", job.error
    report = job.report
    assert report["spent"]["items"] <= 150
    assert len(report["candidates"]) == 5 and all(c["scores"] for c in report["candidates"])  # all in rung 0
    assert report["search"]["rungs"][0]["stop"] == 3
    # The model itself was asked for two rewrites, on the worker: each was kept, dropped or left over, none lost.
    generation = report["generation"]
    meta_kept = [c for c in report["candidates"] if c["family"] == "meta"]
    meta_dropped = [d for d in generation["dropped"] if d["operator"] == "meta"]
    meta_unused = [o for o in generation["unused"] if o == "meta"]
    assert generation["meta_tokens"] > 0 and len(meta_kept) + len(meta_dropped) + len(meta_unused) == 2
    # Every item was evaluated in the worker's child process, not in this one.
    results = ItemResult.objects.filter(run__optimisation_links__candidate__job=job)
    assert results.exists() and not results.filter(worker__endswith=f":{os.getpid()}").exists()
    assert all(r["runs"] for r in report["candidates"])
    if report["winner"]:  # a random model may or may not prefer a candidate; either way the report says so
        assert report["holdout"]["items"] == len(job.split["holdout"])
    else:
        assert report["holdout"] is None and job.winner is None
