from __future__ import annotations

from typing import Any

from celery.signals import beat_init, before_task_publish
from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from fulcrum import metrics, metrics_http, multiproc
from fulcrum.celery import app


class Command(BaseCommand):
    help = (
        "Start Celery beat with the database scheduler (django-celery-beat: periodic tasks are edited in the admin), "
        "with /metrics, /healthz and /readyz on FULCRUM_BEAT_METRICS_PORT. Run exactly one."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--loglevel", "-l", default="INFO")
        parser.add_argument("--metrics-port", type=int, default=settings.FULCRUM_BEAT_METRICS_PORT)
        parser.add_argument("--max-interval", type=int, default=None, help="seconds between schedule checks")

    def handle(self, *args: Any, **options: Any) -> None:
        multiproc.claim("beat")
        health = metrics_http.Health()

        def ready(**_: Any) -> None:
            health.set(True, "scheduling")

        def sent(sender: Any = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
            # Only this process publishes through beat's scheduler; the task name is a bounded label.
            task = (headers or {}).get("task") or str(sender or "unknown")
            metrics.BEAT_TASKS_SENT.labels(task=task).inc()

        beat_init.connect(ready, weak=False)
        before_task_publish.connect(sent, weak=False)
        if options["metrics_port"]:
            metrics_http.serve(options["metrics_port"], health)
        argv = [
            "beat",
            f"--loglevel={options['loglevel']}",
            f"--scheduler={settings.CELERY_BEAT_SCHEDULER}",
        ]
        if options["max_interval"]:
            argv.append(f"--max-interval={options['max_interval']}")
        app.start(argv)
