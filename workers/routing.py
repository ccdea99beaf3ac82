"""Which Celery queue a run's tasks go to: one queue per device class when FULCRUM_QUEUE_ROUTING=device.

With routing off (the default) every task goes to FULCRUM_QUEUE. With `device`, a run's planning and chunk tasks
go to `<FULCRUM_QUEUE>.gpu` or `<FULCRUM_QUEUE>.cpu`, chosen by the run's pinned artifact:

1. `artifact.metadata["provider"]` = "cuda" or "cpu", when the importer set it;
2. else half precision (float16, bfloat16) -> gpu: ONNX Runtime's CPU kernels for it are slow or missing;
3. else a quantised artifact (int8, int4, ...) -> cpu: dynamic quantisation targets the CPU kernels;
4. else (float32) FULCRUM_DEFAULT_DEVICE (cpu unless set).

A GPU worker consumes `<queue>.gpu` (and the plain queue), a CPU worker `<queue>.cpu` (and the plain queue);
`manage.py worker` picks them from its FULCRUM_PROVIDER unless FULCRUM_WORKER_QUEUES or -Q says otherwise.

Fine-tune jobs always go to the training queue (FULCRUM_TRAIN_QUEUE, default `<FULCRUM_QUEUE>.train`), whatever
the routing: a job holds its worker for minutes to hours, and only machines with the training libraries should
take it. `manage.py worker --train` consumes that queue.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from django.conf import settings

ROUTED_TASKS = {"fulcrum.run_evaluation", "fulcrum.evaluate_chunk"}
TRAINING_TASKS = {"fulcrum.run_fine_tune"}
HALF_PRECISION = {"float16", "fp16", "half", "bfloat16", "bf16"}
DEVICE_CLASSES = ("gpu", "cpu")


def default_queue() -> str:
    from fulcrum.celery import app

    return str(app.conf.task_default_queue)


def queue_for(device_class: str) -> str:
    return f"{default_queue()}.{device_class}"


def train_queue() -> str:
    """The queue fine-tune jobs go to."""
    return str(settings.FULCRUM_TRAIN_QUEUE or f"{default_queue()}.train")


def known_queues() -> list[str]:
    """The queues Fulcrum publishes to (what the queue-depth metric reports)."""
    queues = [default_queue()]
    if settings.FULCRUM_QUEUE_ROUTING == "device":
        queues += [queue_for(d) for d in DEVICE_CLASSES]
    return [*queues, train_queue()]


def device_class(artifact: Any) -> str:
    provider = str((artifact.metadata or {}).get("provider", "")).lower()
    if provider in {"cuda", "gpu"}:
        return "gpu"
    if provider == "cpu":
        return "cpu"
    if str(artifact.dtype).lower() in HALF_PRECISION:
        return "gpu"
    if artifact.quantisation:
        return "cpu"
    return str(settings.FULCRUM_DEFAULT_DEVICE)


@lru_cache(maxsize=4096)
def _device_class_of_run(run_id: int) -> str | None:
    # A run's artifact is pinned when it is created, so the answer never changes for a run id.
    from registry.models import EvaluationRun

    run = EvaluationRun.objects.select_related("artifact").filter(pk=run_id).first()
    return device_class(run.artifact) if run is not None else None


def worker_queues(provider: str | None = None) -> list[str]:
    """The queues a `manage.py worker` consumes unless told otherwise."""
    if settings.FULCRUM_WORKER_QUEUES:
        return list(settings.FULCRUM_WORKER_QUEUES)
    if settings.FULCRUM_QUEUE_ROUTING != "device":
        return [default_queue()]
    provider = provider or settings.FULCRUM_PROVIDER
    classes = {"cuda": ["gpu"], "cpu": ["cpu"]}.get(provider, ["gpu", "cpu"])
    return [queue_for(d) for d in classes] + [default_queue()]


def route_task(
    name: str, args: Any, kwargs: Any, options: dict[str, Any], task: Any = None, **_: Any
) -> dict[str, str] | None:
    """Celery router (CELERY_TASK_ROUTES): an explicit queue given to apply_async still wins."""
    if name in TRAINING_TASKS:
        return {"queue": train_queue()}
    if settings.FULCRUM_QUEUE_ROUTING != "device" or name not in ROUTED_TASKS:
        return None
    run_id = args[0] if args else (kwargs or {}).get("run_id")
    if run_id is None:
        return None
    cls = _device_class_of_run(int(run_id))
    return {"queue": queue_for(cls)} if cls else None
