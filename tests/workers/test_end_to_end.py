"""The real model, end to end: import SmolLM2 from its GGUF, evaluate through a separate Celery worker process
talking to the real broker and PostgreSQL, and check what landed in the registry."""

from __future__ import annotations

import io
import json
import os
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from registry.artifacts import import_model
from registry.datasets import import_dataset
from registry.models import EvaluationRun, Prompt, ScalingConfig, Stack
from workers import convert, evaluation

pytestmark = [pytest.mark.realmodel, pytest.mark.django_db(transaction=True)]

DATA = Path(settings.BASE_DIR) / "data" / "demo"


def test_a_run_on_the_real_model_is_evaluated_by_a_worker_process(worker_process, free_port) -> None:  # type: ignore[no-untyped-def]
    artifact, _ = import_model(convert.find_smollm2_gguf(), name="SmolLM2-135M-Instruct", progress=lambda _: None)
    assert artifact.parameter_count > 100_000_000
    lines = (DATA / "arithmetic.jsonl").read_text().splitlines()[:4]
    dataset, _ = import_dataset(io.StringIO("\n".join(lines)), name="arith-e2e", scorer="numeric", fmt="jsonl")
    prompt = Prompt.objects.create(name="e2e")
    version, _ = prompt.create_version(
        template="{{ question }}",
        variables=["question"],
        system_message="Reply with only the final number.",
        params={"max_new_tokens": 12},
    )
    scaling = ScalingConfig.objects.create(
        name="vote3", n_samples=3, temperature=0.7, top_p=0.95, aggregation="majority_vote", seed=3
    )
    # A fresh stack name: metric files of earlier runs may share the multiprocess folder.
    stack_name = f"e2e-{uuid.uuid4().hex[:6]}"
    stack = Stack.objects.create(name=stack_name, prompt_version=version, scaling=scaling, artifact=artifact)
    run = evaluation.create_run(stack, dataset)

    port = free_port
    with worker_process(FULCRUM_WORKER_METRICS_PORT=str(port)) as worker:
        evaluation.start_run(run)  # outside a transaction: queued at once
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            run.refresh_from_db()
            if run.is_finished:
                break
            assert worker.poll() is None, "worker process died"
            time.sleep(0.5)
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()

    assert run.status == EvaluationRun.Status.SUCCEEDED, run.error
    assert run.items_done == run.items_total == 4
    assert run.provider in {"cpu", "cuda"}
    results = list(run.results.select_related("item"))
    assert len(results) == 4
    for result in results:
        assert len(result.samples) == 3
        assert all(s["text"].strip() for s in result.samples)
        assert result.generated_tokens == sum(s["tokens"] for s in result.samples)
        assert 0 < result.generated_tokens <= 3 * 12
        # Evaluated in the worker's child process, not in this one.
        assert not result.worker.endswith(f":{os.getpid()}")
        assert result.rendered_prompt.startswith("<|im_start|>system\nReply with only the final number.")
    scores = [r.score for r in results]
    assert run.summary["accuracy"] == pytest.approx(sum(s for s in scores if s is not None) / 4)
    assert run.summary["generated_tokens"] == sum(r.generated_tokens for r in results)
    # The worker's own /metrics endpoint shows what its child process recorded.
    assert f'fulcrum_evaluation_items_total{{stack="{stack_name}"}} 4.0' in scrape
    assert 'fulcrum_evaluation_runs_total{status="succeeded"}' in scrape
    assert "fulcrum_inference_time_to_first_token_seconds_bucket" in scrape
    # The stored run records are plain JSON all the way down.
    json.dumps(run.summary)
