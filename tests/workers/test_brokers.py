"""The same evaluation through a real worker process over each supported broker (Redis and RabbitMQ)."""

from __future__ import annotations

import socket
import time

import pytest

from fulcrum.celery import app
from registry.models import Dataset, DatasetItem, ModelArtifact, Prompt, ScalingConfig, Stack
from workers import evaluation
from workers.tasks import run_evaluation

pytestmark = pytest.mark.django_db(transaction=True)

BROKERS = {
    "redis": ("redis://127.0.0.1:6379/15", 6379),
    "rabbitmq": ("amqp://guest:guest@127.0.0.1:5672//", 5672),
}


def reachable(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("broker", sorted(BROKERS))
def test_a_worker_evaluates_a_run_over_the_broker(broker: str, artifact: ModelArtifact, worker_process) -> None:  # type: ignore[no-untyped-def]
    url, port = BROKERS[broker]
    if not reachable(port):
        pytest.fail(f"{broker} is not running on 127.0.0.1:{port}; `make test` starts the local services")
    dataset = Dataset.objects.create(name=f"tiny-{broker}", content_hash=broker * 4, item_count=3)
    for i in range(3):
        DatasetItem.objects.create(dataset=dataset, index=i, key=str(i), inputs={"question": f"q{i}"}, expected="a")
    prompt = Prompt.objects.create(name=f"p-{broker}")
    version, _ = prompt.create_version(template="{{ question }}", variables=["question"], params={"max_new_tokens": 4})
    scaling = ScalingConfig.objects.create(name=f"g-{broker}")
    stack = Stack.objects.create(name=f"s-{broker}", prompt_version=version, scaling=scaling, artifact=artifact)
    run = evaluation.create_run(stack, dataset)

    with worker_process(CELERY_BROKER_URL=url) as worker, app.connection_for_write(url) as connection:
        run_evaluation.apply_async((run.pk,), connection=connection, queue=app.conf.task_default_queue)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not run.is_finished:
            assert worker.poll() is None, "worker process died"
            time.sleep(0.3)
            run.refresh_from_db()

    assert run.status == "succeeded", run.error
    assert run.results.count() == 3
    assert all(0 < r.generated_tokens <= 4 for r in run.results.all())
    assert run.provider == "cpu"
