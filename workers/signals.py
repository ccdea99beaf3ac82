"""Worker process hooks: metrics files of exited children, and an optional /metrics endpoint per worker."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_process_shutdown, worker_ready
from django.conf import settings

log = logging.getLogger(__name__)


@worker_process_shutdown.connect
def _mark_child_dead(pid: int | None = None, **_: Any) -> None:
    # A dead child's live-gauge files must not keep being summed into every scrape.
    from prometheus_client import multiprocess

    if pid is not None:
        multiprocess.mark_process_dead(pid)


@worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    port = settings.FULCRUM_WORKER_METRICS_PORT
    if not port:
        return
    from prometheus_client import start_http_server

    from fulcrum.metrics import registry

    start_http_server(port, registry=registry())
    log.info("worker metrics on :%d/metrics", port)
