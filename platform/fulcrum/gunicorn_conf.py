"""gunicorn settings for the web image: `gunicorn -c python:fulcrum.gunicorn_conf fulcrum.wsgi:application`.

Everything can be overridden on the command line or with GUNICORN_CMD_ARGS; the worker count with WEB_CONCURRENCY.
"""

from __future__ import annotations

import os
from typing import Any

bind = os.environ.get("FULCRUM_WEB_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("FULCRUM_WEB_THREADS", "4"))
timeout = 60
graceful_timeout = 30
accesslog = "-"
errorlog = "-"
# Workers import the application after the fork: each opens its own database connections.
preload_app = False


def on_starting(server: Any) -> None:
    # Claim the web group's metrics directory in the master, before any worker exists.
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fulcrum.settings")
    import django

    django.setup()
    from fulcrum import multiproc

    multiproc.claim("web")


def child_exit(server: Any, worker: Any) -> None:
    # The exited worker's live gauges leave the sums; its counters stay.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
