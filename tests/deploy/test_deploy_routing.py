"""workers/routing.py: a run's tasks land on the GPU or the CPU queue by its artifact; fine-tune jobs on the
training queue."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from deploy_helpers import ROOT

from fulcrum.celery import app
from registry.models import Dataset, DatasetItem, ModelArtifact, Prompt, ScalingConfig, Stack
from workers import evaluation, routing, tasks

pytestmark = pytest.mark.django_db


def artifact(**fields: Any) -> ModelArtifact:
    return ModelArtifact(name="a", sha256="0" * 64, path="/x", source_kind="onnx", source_path="/x", **fields)


@pytest.mark.parametrize(
    ("fields", "default", "expected"),
    [
        ({"dtype": "float16"}, "cpu", "gpu"),
        ({"dtype": "bfloat16"}, "cpu", "gpu"),
        ({"dtype": "float32", "quantisation": "int8-dynamic"}, "gpu", "cpu"),
        ({"dtype": "float32"}, "cpu", "cpu"),
        ({"dtype": "float32"}, "gpu", "gpu"),
        ({"dtype": "float16", "metadata": {"provider": "cpu"}}, "gpu", "cpu"),
        ({"dtype": "float32", "quantisation": "int8", "metadata": {"provider": "cuda"}}, "cpu", "gpu"),
    ],
)
def test_device_class_follows_provider_then_dtype_then_quantisation(
    fields: dict[str, Any], default: str, expected: str, settings: Any
) -> None:
    settings.FULCRUM_DEFAULT_DEVICE = default
    assert routing.device_class(artifact(**fields)) == expected


@pytest.fixture
def queue_name() -> Iterator[str]:
    """A default queue of the test's own, restored afterwards."""
    previous = app.conf.task_default_queue
    name = f"route-{uuid.uuid4().hex[:8]}"
    app.conf.task_default_queue = name
    routing._device_class_of_run.cache_clear()
    try:
        yield name
    finally:
        app.conf.task_default_queue = previous
        routing._device_class_of_run.cache_clear()


def make_run(dtype: str) -> Any:
    art = ModelArtifact.objects.create(
        name=f"m-{dtype}", sha256=uuid.uuid4().hex * 2, path="/x", source_kind="onnx", source_path="/x", dtype=dtype
    )
    ds = Dataset.objects.create(name=f"d-{dtype}", content_hash=uuid.uuid4().hex * 2, item_count=1)
    DatasetItem.objects.create(dataset=ds, index=0, key="a", inputs={"q": "1"})
    prompt = Prompt.objects.create(name=f"p-{dtype}")
    version, _ = prompt.create_version(template="{{ q }}", variables=["q"])
    scaling, _ = ScalingConfig.objects.get_or_create(name="greedy")
    stack = Stack.objects.create(name=f"s-{dtype}", prompt_version=version, scaling=scaling, artifact=art)
    return evaluation.create_run(stack, ds)


def test_routing_off_sends_everything_to_the_default_queue(queue_name: str, settings: Any) -> None:
    settings.FULCRUM_QUEUE_ROUTING = "off"
    run = make_run("float16")
    assert routing.route_task("fulcrum.evaluate_chunk", [run.pk, [1]], {}, {}) is None
    assert routing.known_queues() == [queue_name, f"{queue_name}.train"]
    assert routing.worker_queues() == [queue_name]


def test_device_routing_picks_the_queue_from_the_runs_artifact(queue_name: str, settings: Any) -> None:
    settings.FULCRUM_QUEUE_ROUTING = "device"
    settings.FULCRUM_DEFAULT_DEVICE = "cpu"
    gpu_run, cpu_run = make_run("float16"), make_run("float32")
    assert routing.route_task("fulcrum.run_evaluation", [gpu_run.pk], {}, {}) == {"queue": f"{queue_name}.gpu"}
    assert routing.route_task("fulcrum.evaluate_chunk", [cpu_run.pk, [1]], {}, {}) == {"queue": f"{queue_name}.cpu"}
    assert routing.route_task("celery.backend_cleanup", [], {}, {}) is None
    assert routing.known_queues() == [queue_name, f"{queue_name}.gpu", f"{queue_name}.cpu", f"{queue_name}.train"]
    assert routing.worker_queues("cuda") == [f"{queue_name}.gpu", queue_name]
    assert routing.worker_queues("cpu") == [f"{queue_name}.cpu", queue_name]
    settings.FULCRUM_WORKER_QUEUES = ["only-this"]
    assert routing.worker_queues("cuda") == ["only-this"]


@pytest.mark.parametrize("routing_mode", ["off", "device"])
def test_fine_tune_jobs_always_go_to_the_training_queue(queue_name: str, settings: Any, routing_mode: str) -> None:
    settings.FULCRUM_QUEUE_ROUTING = routing_mode
    assert routing.route_task("fulcrum.run_fine_tune", [1], {}, {}) == {"queue": f"{queue_name}.train"}
    settings.FULCRUM_TRAIN_QUEUE = "gpu-training"
    assert routing.route_task("fulcrum.run_fine_tune", [1], {}, {}) == {"queue": "gpu-training"}
    assert routing.known_queues()[-1] == "gpu-training"


def test_published_tasks_land_in_the_device_queue_on_the_broker(queue_name: str, settings: Any) -> None:
    if not app.conf.broker_url.startswith("redis://"):
        pytest.skip("reads the queue lists from Redis")
    settings.FULCRUM_QUEUE_ROUTING = "device"
    run = make_run("float16")
    client = redis.Redis.from_url(app.conf.broker_url)
    try:
        tasks.evaluate_chunk.delay(run.pk, [1, 2])
        tasks.run_evaluation.apply_async((run.pk,), queue="explicit-" + queue_name)  # an explicit queue wins
        assert client.llen(f"{queue_name}.gpu") == 1
        assert client.llen(f"explicit-{queue_name}") == 1
        assert client.llen(queue_name) == 0 and client.llen(f"{queue_name}.cpu") == 0
    finally:
        client.delete(f"{queue_name}.gpu", f"explicit-{queue_name}")


def test_a_bad_routing_setting_stops_the_process_at_start() -> None:
    env = {**os.environ, "FULCRUM_QUEUE_ROUTING": "by-moon-phase"}
    proc = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "FULCRUM_QUEUE_ROUTING" in proc.stderr
