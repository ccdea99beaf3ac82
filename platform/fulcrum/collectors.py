"""Metrics the web process computes when it is scraped: run results from the database, queue depths from the broker.

Both are global facts, so they come from the web (every replica reports the same values) rather than from the
worker that happened to finish a run: with several worker machines, a per-worker gauge would keep reporting an
old result next to the new one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from django.db.models import Count, F, Window
from django.db.models.functions import RowNumber
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .metrics import SCRAPE_TIME_GAUGES
from .multiproc import GroupCollector

log = logging.getLogger(__name__)

# Summary key -> gauge name. Label order (dataset, stack) matches the multiprocess files' sorted labels.
RESULT_GAUGES = {
    "accuracy": "fulcrum_evaluation_accuracy_ratio",
    "refusal_rate_harmful": "fulcrum_evaluation_refusal_rate_ratio",
    "answer_rate_benign": "fulcrum_evaluation_answer_rate_ratio",
}
# At most this many (stack, dataset) pairs, the most recently finished first: a bound on the series count.
MAX_RESULT_PAIRS = 500


def _gauge(name: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, SCRAPE_TIME_GAUGES[name], labels=labels)


class RunResultsCollector(Collector):
    """Latest succeeded run per (stack, dataset): accuracy, refusal and answer rates, alignment tax, finish time;
    open evaluation runs and fine-tune jobs by status."""

    def collect(self) -> Iterable[GaugeMetricFamily]:
        from registry.models import EvaluationRun

        families = {name: _gauge(name, ["dataset", "stack"]) for name in RESULT_GAUGES.values()}
        tax = _gauge("fulcrum_evaluation_alignment_tax_ratio", ["dataset", "stack"])
        finished = _gauge("fulcrum_evaluation_last_finished_timestamp_seconds", ["dataset", "stack"])
        latest = (
            # A run on part of a dataset (an optimisation rung) is not the stack's result on that dataset.
            EvaluationRun.objects.filter(
                status=EvaluationRun.Status.SUCCEEDED, finished_at__isnull=False, item_subset_hash=""
            )
            .annotate(
                rank=Window(
                    RowNumber(),
                    partition_by=[F("stack__name"), F("dataset__name")],
                    order_by=[F("finished_at").desc(), F("id").desc()],
                )
            )
            .filter(rank=1)
            .order_by("-finished_at")
            .values_list("stack__name", "dataset__name", "summary", "finished_at")[:MAX_RESULT_PAIRS]
        )
        for stack, dataset, summary, finished_at in latest:
            labels = [dataset, stack]
            summary = summary or {}
            for key, name in RESULT_GAUGES.items():
                if isinstance(summary.get(key), int | float):
                    families[name].add_metric(labels, float(summary[key]))
            if isinstance(summary.get("answer_rate_benign"), int | float):
                tax.add_metric(labels, round(1.0 - float(summary["answer_rate_benign"]), 6))
            if finished_at is not None:
                finished.add_metric(labels, finished_at.timestamp())
        open_runs = _gauge("fulcrum_evaluation_open_runs", ["status"])
        open_statuses = [EvaluationRun.Status.PENDING, EvaluationRun.Status.RUNNING]
        counts = dict(
            EvaluationRun.objects.filter(status__in=open_statuses)
            .order_by()
            .values("status")
            .annotate(n=Count("id"))
            .values_list("status", "n")
        )
        for status in open_statuses:
            open_runs.add_metric([str(status)], counts.get(status, 0))
        return [*families.values(), tax, finished, open_runs, self._open_jobs()]

    def _open_jobs(self) -> GaugeMetricFamily:
        from registry.models import FineTuneJob

        gauge = _gauge("fulcrum_fine_tune_open_jobs", ["status"])
        counts = dict(
            FineTuneJob.objects.filter(status__in=FineTuneJob.OPEN)
            .order_by()
            .values("status")
            .annotate(n=Count("id"))
            .values_list("status", "n")
        )
        for status in FineTuneJob.OPEN:
            gauge.add_metric([str(status)], counts.get(status, 0))
        return gauge


class QueueDepthCollector(Collector):
    """Messages waiting per Celery queue, asked of the broker with a short timeout and cached for a few seconds."""

    def __init__(self, ttl_s: float = 5.0, timeout_s: float = 2.0, url: str | None = None) -> None:
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.url = url  # None: the Celery app's broker
        self._lock = threading.Lock()
        self._at = 0.0
        self._cached: tuple[bool, dict[str, int]] = (False, {})

    def depths(self) -> tuple[bool, dict[str, int]]:
        with self._lock:
            if time.monotonic() - self._at > self.ttl_s:
                self._cached = self._query()
                self._at = time.monotonic()
            return self._cached

    def _query(self) -> tuple[bool, dict[str, int]]:
        from kombu.exceptions import ChannelError

        from fulcrum.celery import app
        from workers.routing import known_queues

        depths: dict[str, int] = {}
        try:
            with app.connection_for_read(
                self.url,
                connect_timeout=self.timeout_s,
                transport_options={"socket_timeout": self.timeout_s, "socket_connect_timeout": self.timeout_s},
            ) as conn:
                conn.ensure_connection(max_retries=1, timeout=self.timeout_s)
                for queue in known_queues():
                    # A fresh channel per queue: on AMQP a passive declare of a missing queue closes its channel.
                    channel = conn.channel()
                    try:
                        depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
                    except ChannelError:
                        depths[queue] = 0  # not declared yet (Redis: no key while empty)
                    except Exception as exc:  # AMQP's NotFound and friends
                        if "NOT_FOUND" not in str(exc) and "404" not in str(exc):
                            raise
                        depths[queue] = 0
                    finally:
                        with contextlib.suppress(Exception):  # a closed channel is what we wanted anyway
                            channel.close()
        except Exception as exc:
            log.warning("queue depth: the broker did not answer: %s", exc)
            return False, {}
        return True, depths

    def collect(self) -> Iterable[GaugeMetricFamily]:
        up, depths = self.depths()
        messages = _gauge("fulcrum_queue_messages", ["queue"])
        for queue, count in sorted(depths.items()):
            messages.add_metric([queue], count)
        broker_up = _gauge("fulcrum_broker_up", [])
        broker_up.add_metric([], 1.0 if up else 0.0)
        return [messages, broker_up]


class OptimisationJobsCollector(Collector):
    """Optimisation jobs still open, by status (pending, running)."""

    def collect(self) -> Iterable[GaugeMetricFamily]:
        from registry.models import OptimisationJob

        statuses = [OptimisationJob.Status.PENDING, OptimisationJob.Status.RUNNING]
        counts = dict(
            OptimisationJob.objects.filter(status__in=statuses)
            .order_by()
            .values("status")
            .annotate(n=Count("id"))
            .values_list("status", "n")
        )
        gauge = _gauge("fulcrum_optimisation_open_jobs", ["status"])
        for status in statuses:
            gauge.add_metric([str(status)], counts.get(status, 0))
        return [gauge]


QUEUE_DEPTHS = QueueDepthCollector()
RUN_RESULTS = RunResultsCollector()
OPTIMISATION_JOBS = OptimisationJobsCollector()


def web_registry(extra: Iterable[Any] = ()) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(GroupCollector(extra=[RUN_RESULTS, QUEUE_DEPTHS, OPTIMISATION_JOBS, *extra], web=True))
    return registry
