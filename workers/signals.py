"""Worker process hooks: the metrics directory, /metrics, /healthz and /readyz, and task and pool metrics.

`worker_init` runs in a worker's main process before its pool forks: it claims the worker's metrics directory
(fulcrum/multiproc.py), so the children inherit it, and starts the HTTP endpoint when FULCRUM_WORKER_METRICS_PORT
is set. The other hooks record what the children do.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.signals import (
    task_failure,
    task_postrun,
    task_prerun,
    task_retry,
    task_success,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutting_down,
)
from django.conf import settings

from fulcrum import metrics

log = logging.getLogger(__name__)

HEALTH: Any = None  # fulcrum.metrics_http.Health of this worker, once its main process started
_task_started: dict[str, float] = {}


def _task_name(sender: Any) -> str:
    return str(getattr(sender, "name", None) or "unknown")


@worker_init.connect
def _claim_metrics_dir(sender: Any = None, **_: Any) -> None:
    global HEALTH
    from fulcrum import metrics_http, multiproc

    multiproc.claim("worker")
    HEALTH = metrics_http.Health()
    port = settings.FULCRUM_WORKER_METRICS_PORT
    if port:
        metrics_http.serve(port, HEALTH)
        log.info("worker metrics on :%d/metrics (health: /healthz, /readyz)", port)


@worker_ready.connect
def _ready(sender: Any = None, **_: Any) -> None:
    queues = ",".join(sorted(q.name for q in sender.task_consumer.queues)) if sender is not None else ""
    metrics.WORKER_INFO.labels(queues=queues, provider=settings.FULCRUM_PROVIDER).set(1)
    if HEALTH is not None:
        HEALTH.set(True, f"consuming {queues}")


@worker_shutting_down.connect
def _shutting_down(**_: Any) -> None:
    if HEALTH is not None:
        HEALTH.set(False, "shutting down")


@worker_process_init.connect
def _child_started(**_: Any) -> None:
    metrics.WORKER_PROCESSES.labels(state="idle").set(1)
    metrics.WORKER_PROCESSES.labels(state="busy").set(0)


@worker_process_shutdown.connect
def _mark_child_dead(pid: int | None = None, **_: Any) -> None:
    # A dead child's live-gauge files must not keep being summed into every scrape.
    from prometheus_client import multiprocess

    if pid is not None:
        multiprocess.mark_process_dead(pid)


@task_prerun.connect
def _task_started_hook(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _task_started[task_id] = time.perf_counter()
    metrics.WORKER_PROCESSES.labels(state="busy").set(1)
    metrics.WORKER_PROCESSES.labels(state="idle").set(0)


@task_postrun.connect
def _task_finished_hook(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    started = _task_started.pop(task_id, None) if task_id else None
    if started is not None:
        metrics.TASK_SECONDS.labels(task=_task_name(sender)).observe(time.perf_counter() - started)
    metrics.WORKER_PROCESSES.labels(state="busy").set(0)
    metrics.WORKER_PROCESSES.labels(state="idle").set(1)


@task_success.connect
def _task_succeeded(sender: Any = None, **_: Any) -> None:
    metrics.TASKS.labels(task=_task_name(sender), state="succeeded").inc()


@task_failure.connect
def _task_failed(sender: Any = None, **_: Any) -> None:
    metrics.TASKS.labels(task=_task_name(sender), state="failed").inc()


@task_retry.connect
def _task_retried(sender: Any = None, **_: Any) -> None:
    metrics.TASKS.labels(task=_task_name(sender), state="retried").inc()
