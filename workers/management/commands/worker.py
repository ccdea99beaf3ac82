from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from fulcrum.celery import app
from workers.routing import train_queue, worker_queues


class Command(BaseCommand):
    help = (
        "Start a Celery worker for evaluation jobs, or with --train for fine-tune jobs (same as `celery -A fulcrum "
        "worker`, with the path set)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--concurrency", "-c", type=int, default=settings.CELERY_WORKER_CONCURRENCY)
        parser.add_argument(
            "--queues",
            "-Q",
            default=None,
            help="comma-separated; default: FULCRUM_WORKER_QUEUES, else by FULCRUM_QUEUE_ROUTING (workers/routing.py)",
        )
        parser.add_argument(
            "--train",
            action="store_true",
            help="consume the training queue (FULCRUM_TRAIN_QUEUE, default <FULCRUM_QUEUE>.train); needs the convert "
            "extra (torch, transformers, peft)",
        )
        parser.add_argument("--loglevel", "-l", default="INFO")
        parser.add_argument("--hostname", "-n", default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        queues = options["queues"] or ",".join([train_queue()] if options["train"] else worker_queues())
        argv = [
            "worker",
            f"--loglevel={options['loglevel']}",
            f"--concurrency={options['concurrency']}",
            f"--queues={queues}",
            "--pool=prefork",
            "--without-gossip",
            "--without-mingle",
        ]
        if options["hostname"]:
            argv.append(f"--hostname={options['hostname']}")
        app.worker_main(argv)
