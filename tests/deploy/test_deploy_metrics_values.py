"""What the recording helpers and the web's scrape-time collectors compute."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone
from prometheus_client import CollectorRegistry

from fulcrum import collectors, metrics
from fulcrum.celery import app
from registry.models import Dataset, EvaluationRun, FineTuneJob, ModelArtifact, Prompt, ScalingConfig, Stack
from workers.engine import Generation, Sample


def value(name: str, labels: dict[str, str], registry: CollectorRegistry | None = None) -> float:
    return (registry or metrics.registry()).get_sample_value(name, labels) or 0.0


def sample(tokens: int) -> Sample:
    return Sample(text="", token_ids=[1] * tokens, mean_logprob=0.0, finish_reason="length")


def test_a_generation_records_latency_tokens_samples_and_time_per_output_token() -> None:
    provider = f"test-{uuid.uuid4().hex[:6]}"  # a label value of this test's own
    gen = Generation([sample(5), sample(3)], prompt_tokens=7, latency_s=1.0, ttft_s=0.2)
    metrics.record_generation(provider, gen)
    labels = {"provider": provider}
    assert value("fulcrum_inference_samples_per_request_sum", labels) == 2
    assert value("fulcrum_prompt_tokens_total", labels) == 7
    assert value("fulcrum_generated_tokens_total", labels) == 8
    # (1.0 - 0.2) s over the longest sample's 4 tokens after its first
    assert value("fulcrum_inference_time_per_output_token_seconds_sum", labels) == pytest.approx(0.2)
    assert value("fulcrum_inference_time_to_first_token_seconds_bucket", {**labels, "le": "0.25"}) == 1
    # A one-token answer has no decode time to divide.
    metrics.record_generation(provider, Generation([sample(1)], 3, 0.3, 0.3))
    assert value("fulcrum_inference_time_per_output_token_seconds_count", labels) == 1


def test_usage_charges_worker_seconds_and_money_to_stack_and_artifact() -> None:
    stack = f"s-{uuid.uuid4().hex[:6]}"
    art = ModelArtifact(name="m", sha256="ab" * 32, price_per_1k_tokens=Decimal("0.5"))
    gens = [Generation([sample(10)], 90, 1.0, 0.1), Generation([sample(100)], 800, 2, 1)]
    metrics.record_usage(stack=stack, artifact=art, engine_seconds=1.5, generations=gens)
    labels = {"stack": stack, "artifact": "m@abababab"}
    assert value("fulcrum_inference_worker_seconds_total", labels) == 1.5
    assert value("fulcrum_inference_cost_total", labels) == pytest.approx(1000 / 1000 * 0.5)


@pytest.mark.django_db
def test_the_web_reports_the_latest_finished_run_per_stack_and_dataset() -> None:
    art = ModelArtifact.objects.create(name="m", sha256="c" * 64, path="/x", source_kind="onnx", source_path="/x")
    prompt = Prompt.objects.create(name="p")
    version, _ = prompt.create_version(template="{{ q }}", variables=["q"])
    scaling = ScalingConfig.objects.create(name="g")
    stack = Stack.objects.create(name="web-results", prompt_version=version, scaling=scaling, artifact=art)
    old_ds = Dataset.objects.create(name="safety", content_hash="1" * 64)
    new_ds = Dataset.objects.create(name="safety", content_hash="2" * 64)  # a newer version, same name
    now = timezone.now()

    def run(ds: Dataset, status: str, minutes_ago: int, **summary: Any) -> None:
        EvaluationRun.objects.create(
            stack=stack, dataset=ds, prompt_version=version, artifact=art, status=status, summary=summary,
            finished_at=now - timedelta(minutes=minutes_ago) if status != "running" else None,
        )  # fmt: skip

    run(old_ds, "succeeded", 30, accuracy=0.5, answer_rate_benign=0.9, refusal_rate_harmful=0.4)
    run(new_ds, "succeeded", 10, accuracy=0.8, answer_rate_benign=0.75, refusal_rate_harmful=0.9)
    run(new_ds, "failed", 1, accuracy=0.0)
    run(new_ds, "running", 0)
    registry = CollectorRegistry()
    registry.register(collectors.RunResultsCollector())
    labels = {"stack": "web-results", "dataset": "safety"}
    assert value("fulcrum_evaluation_accuracy_ratio", labels, registry) == 0.8
    assert value("fulcrum_evaluation_refusal_rate_ratio", labels, registry) == 0.9
    assert value("fulcrum_evaluation_alignment_tax_ratio", labels, registry) == pytest.approx(0.25)
    assert value("fulcrum_evaluation_last_finished_timestamp_seconds", labels, registry) == pytest.approx(
        (now - timedelta(minutes=10)).timestamp()
    )
    assert value("fulcrum_evaluation_open_runs", {"status": "running"}, registry) == 1
    job_fields = {"base_artifact": art, "dataset": new_ds, "prompt_version": version}
    FineTuneJob.objects.create(name="a", spec_hash="a" * 64, status="running", **job_fields)
    FineTuneJob.objects.create(name="b", spec_hash="b" * 64, status="succeeded", **job_fields)
    assert value("fulcrum_fine_tune_open_jobs", {"status": "running"}, registry) == 1
    assert value("fulcrum_fine_tune_open_jobs", {"status": "pending"}, registry) == 0
    samples = [s for m in registry.collect() for s in m.samples if s.name == "fulcrum_evaluation_accuracy_ratio"]
    assert len(samples) == 1  # one series per (stack, dataset name)


@pytest.mark.django_db(transaction=True)
def test_a_committed_label_move_is_counted() -> None:
    label = f"l-{uuid.uuid4().hex[:6]}"
    prompt = Prompt.objects.create(name=f"p-{label}")
    version, _ = prompt.create_version(template="{{ q }}", variables=["q"])
    prompt.move_label(label, version)
    assert value("fulcrum_prompt_label_moves_total", {"label": label}) == 1


def test_queue_depth_comes_from_the_broker_and_a_dead_broker_reads_as_down() -> None:
    if not app.conf.broker_url.startswith("redis://"):
        pytest.skip("needs the Redis broker")
    queue = f"depth-{uuid.uuid4().hex[:8]}"
    previous = app.conf.task_default_queue
    app.conf.task_default_queue = queue
    try:
        with app.producer_or_acquire() as producer:
            for _ in range(3):
                producer.publish({"n": 1}, routing_key=queue, exchange="", declare=[])
        registry = CollectorRegistry()
        registry.register(collectors.QueueDepthCollector(ttl_s=0))
        assert value("fulcrum_queue_messages", {"queue": queue}, registry) == 3
        assert value("fulcrum_broker_up", {}, registry) == 1
        # Nothing listens on port 1: the broker reads as down, and no stale depth is reported.
        down = CollectorRegistry()
        down.register(collectors.QueueDepthCollector(ttl_s=0, timeout_s=0.5, url="redis://127.0.0.1:1/0"))
        started = time.monotonic()
        assert value("fulcrum_broker_up", {}, down) == 0
        assert time.monotonic() - started < 10
        assert value("fulcrum_queue_messages", {"queue": queue}, down) == 0
    finally:
        app.conf.task_default_queue = previous
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(queue)
