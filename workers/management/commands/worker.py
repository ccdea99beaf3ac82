from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from fulcrum.celery import app
from workers.routing import worker_queues


class Command(BaseCommand):
    help = "Start a Celery worker for evaluation jobs (same as `celery -A fulcrum worker`, with the path set)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--concurrency", "-c", type=int, default=settings.CELERY_WORKER_CONCURRENCY)
        parser.add_argument(
            "--queues",
            "-Q",
            default=None,
            help="comma-separated; default: FULCRUM_WORKER_QUEUES, else by FULCRUM_QUEUE_ROUTING (workers/routing.py)",
        )
        parser.add_argument("--loglevel", "-l", default="INFO")
        parser.add_argument("--hostname", "-n", default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        argv = [
            "worker",
            f"--loglevel={options['loglevel']}",
            f"--concurrency={options['concurrency']}",
            f"--queues={options['queues'] or ','.join(worker_queues())}",
            "--pool=prefork",
            "--without-gossip",
            "--without-mingle",
        ]
        if options["hostname"]:
            argv.append(f"--hostname={options['hostname']}")
        app.worker_main(argv)
