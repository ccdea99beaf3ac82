"""Prometheus metrics, in prometheus-client's multiprocess mode.

Every process of a process group (the web server and its workers, a Celery worker and its children, beat) writes
its samples to files under the group's directory (fulcrum/multiproc.py); a scrape of the group's /metrics merges
them. Quality figures of finished runs come from the database instead (fulcrum/collectors.py), so every web
replica reports the same latest values however many worker machines produced them.

Naming follows Prometheus conventions: a `fulcrum_` prefix, base units in the name (`_seconds`, `_ratio`), `_total`
on counters. Labels stay low-cardinality: provider, stack, dataset, artifact, queue, task, status, prompt label —
never an item, a user or a run id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

# --- inference -------------------------------------------------------------------------------------------------

# Whole requests on a small model take tens of milliseconds; N samples of a large one on a CPU, over a minute.
LLM_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
# Prefill of one batch: a few milliseconds on a GPU to seconds for long prompts on a CPU.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0)
# One decode step: ~1 ms for a small model on a GPU, tens to hundreds of ms for a large one on a CPU.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
SAMPLES_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

INFERENCE_SECONDS = Histogram(
    "fulcrum_inference_request_seconds",
    "Wall time from the start of an input's batch until its last sample finished.",
    ["provider"],
    buckets=LLM_LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "fulcrum_inference_time_to_first_token_seconds",
    "Time until the first generated token of an input's batch.",
    ["provider"],
    buckets=TTFT_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "fulcrum_inference_time_per_output_token_seconds",
    "Decode time per output token of an input after its first: (latency - time to first token) / (tokens - 1) "
    "of its longest sample.",
    ["provider"],
    buckets=TPOT_BUCKETS,
)
SAMPLES_PER_REQUEST = Histogram(
    "fulcrum_inference_samples_per_request",
    "Samples generated per input (inference-time scaling N).",
    ["provider"],
    buckets=SAMPLES_BUCKETS,
)
PROMPT_TOKENS = Counter("fulcrum_prompt_tokens", "Prompt tokens processed.", ["provider"])
GENERATED_TOKENS = Counter("fulcrum_generated_tokens", "Tokens generated, all samples counted.", ["provider"])

# --- cost ------------------------------------------------------------------------------------------------------

WORKER_SECONDS = Counter(
    "fulcrum_inference_worker_seconds",
    "Engine time (prefill and decode) a worker process spent generating for a stack on an artifact.",
    ["stack", "artifact"],
)
COST = Counter(
    "fulcrum_inference_cost",
    "Money spent on inference, in the currency the registry's prices are kept in: (prompt + generated tokens) / "
    "1000 x the artifact's price_per_1k_tokens, plus engine hours x its price_per_device_hour where it has one.",
    ["stack", "artifact"],
)

# --- evaluation --------------------------------------------------------------------------------------------------

ITEMS_EVALUATED = Counter("fulcrum_evaluation_items", "Dataset items evaluated.", ["stack"])
RUNS = Counter("fulcrum_evaluation_runs", "Evaluation runs that reached a final status.", ["status"])
RUN_STATUSES = ("succeeded", "failed", "cancelled")
REGRESSIONS = Counter(
    "fulcrum_evaluation_regressions",
    "Finished runs whose metric came out worse than the stack's previous run on the same dataset by more than "
    "the allowed tolerance (recorded by the regression check).",
    ["stack", "dataset", "metric"],
)

# --- prompt optimisation -------------------------------------------------------------------------------------------

OPTIMISATION_CANDIDATES = Counter(
    "fulcrum_optimisation_candidates",
    "Prompt candidates optimisation jobs sent to evaluation, by the operator family that made them (start, "
    "instruction, fewshot, meta, combine).",
    ["family"],
)
OPTIMISATION_PROPOSALS_DROPPED = Counter(
    "fulcrum_optimisation_proposals_dropped",
    "Candidate proposals dropped before evaluation (an invalid template, a duplicate, an unusable model reply), by "
    "operator family.",
    ["family"],
)
OPTIMISATION_JOBS = Counter("fulcrum_optimisation_jobs", "Optimisation jobs that reached a final status.", ["status"])
OPTIMISATION_LABEL_MOVES = Counter(
    "fulcrum_optimisation_label_moves",
    "Labels optimisation jobs moved to their winner (a significant held-out gain) or left alone, by outcome.",
    ["outcome"],
)

# --- fine-tuning -------------------------------------------------------------------------------------------------

# A LoRA run on a small model takes a minute on a CPU; a full fine-tune of a large one, many hours on a GPU.
TRAINING_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)
FINE_TUNE_JOBS = Counter("fulcrum_fine_tune_jobs", "Fine-tune jobs that reached a final status.", ["status"])
FINE_TUNE_TRAINING_SECONDS = Histogram(
    "fulcrum_fine_tune_training_seconds",
    "Optimiser-loop time of each succeeded fine-tune job, by the device it trained on.",
    ["device"],
    buckets=TRAINING_BUCKETS,
)
FINE_TUNE_WORKER_SECONDS = Counter(
    "fulcrum_fine_tune_worker_seconds",
    "Time training workers spent on fine-tune jobs (loading, training, merging, export, registration), failed and "
    "cancelled jobs included: the compute fine-tuning cost.",
    ["device"],
)

JOB_STATUSES = ("succeeded", "failed", "cancelled")

# --- registry ----------------------------------------------------------------------------------------------------

LABEL_MOVES = Counter(
    "fulcrum_prompt_label_moves", "Prompt label moves (deploys and rollbacks), by label name.", ["label"]
)
PROMPT_FETCHES = Counter(
    "fulcrum_prompt_fetches",
    "Prompts fetched by label through the serving API (/api/serve/); cache=hit is a 304 Not Modified answer to a "
    "request whose If-None-Match still matches.",
    ["label", "cache"],
)

# --- workers, beat, process groups -----------------------------------------------------------------------------

TASKS = Counter("fulcrum_celery_tasks", "Celery tasks a worker finished, by task and outcome.", ["task", "state"])
TASK_STATES = ("succeeded", "failed", "retried")
TASK_SECONDS = Histogram(
    "fulcrum_celery_task_seconds",
    "Run time of Celery tasks in a worker child.",
    ["task"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0),
)
WORKER_PROCESSES = Gauge(
    "fulcrum_worker_processes",
    "Live worker child processes of this worker, idle or busy running a task.",
    ["state"],
    multiprocess_mode="livesum",
)
WORKER_INFO = Gauge(
    "fulcrum_worker_info",
    "Always 1 while the worker runs: the queues it consumes and the execution provider it asks for.",
    ["queues", "provider"],
    multiprocess_mode="livemax",
)
BEAT_TASKS_SENT = Counter("fulcrum_beat_tasks_sent", "Periodic tasks beat sent to the broker.", ["task"])
# Set by the group's main process only; forked children hold 0 for it, so the live maximum is the group's start.
GROUP_START_TIME = Gauge(
    "fulcrum_process_group_start_time_seconds",
    "Unix time this process group (web, worker or beat) started.",
    ["role"],
    multiprocess_mode="livemax",
)

# --- computed at scrape time by the web process (fulcrum/collectors.py) -----------------------------------------

SCRAPE_TIME_GAUGES: dict[str, str] = {
    "fulcrum_evaluation_accuracy_ratio": "Accuracy of the latest finished run of a stack on a dataset.",
    "fulcrum_evaluation_refusal_rate_ratio": "Share of harmful items refused in the latest finished run.",
    "fulcrum_evaluation_answer_rate_ratio": "Share of benign items answered (not refused) in the latest finished run.",
    "fulcrum_evaluation_alignment_tax_ratio": (
        "Helpfulness a stack's safety behaviour costs: share of benign look-alike items refused (1 - answer rate) "
        "in the latest finished run on a dataset with benign items."
    ),
    "fulcrum_evaluation_last_finished_timestamp_seconds": (
        "Unix time the latest finished run of a stack on a dataset finished."
    ),
    "fulcrum_evaluation_open_runs": "Evaluation runs not finished yet, by status (pending, running).",
    "fulcrum_optimisation_open_jobs": "Optimisation jobs not finished yet, by status (pending, running).",
    "fulcrum_fine_tune_open_jobs": "Fine-tune jobs not finished yet, by status (pending, running).",
    "fulcrum_queue_messages": "Messages waiting in a Celery queue, as the broker reports them.",
    "fulcrum_broker_up": "1 when the last queue-depth query reached the broker, else 0.",
}

ALL_METRICS = (
    INFERENCE_SECONDS,
    TIME_TO_FIRST_TOKEN,
    TIME_PER_OUTPUT_TOKEN,
    SAMPLES_PER_REQUEST,
    PROMPT_TOKENS,
    GENERATED_TOKENS,
    WORKER_SECONDS,
    COST,
    ITEMS_EVALUATED,
    RUNS,
    REGRESSIONS,
    OPTIMISATION_CANDIDATES,
    OPTIMISATION_PROPOSALS_DROPPED,
    OPTIMISATION_JOBS,
    OPTIMISATION_LABEL_MOVES,
    FINE_TUNE_JOBS,
    FINE_TUNE_TRAINING_SECONDS,
    FINE_TUNE_WORKER_SECONDS,
    LABEL_MOVES,
    PROMPT_FETCHES,
    TASKS,
    TASK_SECONDS,
    WORKER_PROCESSES,
    WORKER_INFO,
    BEAT_TASKS_SENT,
    GROUP_START_TIME,
)


# --- recording helpers -------------------------------------------------------------------------------------------


class _Generation(Protocol):
    """What workers.engine's Generation offers (metrics imports no engine code)."""

    @property
    def samples(self) -> Sequence[object]: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def latency_s(self) -> float: ...
    @property
    def ttft_s(self) -> float: ...
    @property
    def generated_tokens(self) -> int: ...
    @property
    def time_per_output_token_s(self) -> float: ...


def record_generation(provider: str, gen: _Generation) -> None:
    """Latency, token and sample figures of one input's generation."""
    INFERENCE_SECONDS.labels(provider=provider).observe(gen.latency_s)
    TIME_TO_FIRST_TOKEN.labels(provider=provider).observe(gen.ttft_s)
    PROMPT_TOKENS.labels(provider=provider).inc(gen.prompt_tokens)
    GENERATED_TOKENS.labels(provider=provider).inc(gen.generated_tokens)
    SAMPLES_PER_REQUEST.labels(provider=provider).observe(len(gen.samples))
    # 0 when there is no decode step to time (a single token, or no time after the first token).
    if gen.time_per_output_token_s > 0:
        TIME_PER_OUTPUT_TOKEN.labels(provider=provider).observe(gen.time_per_output_token_s)


def artifact_label(artifact: Any) -> str:
    """A stable, readable label value for an artifact: its name and the start of its sha256."""
    return f"{artifact.name}@{artifact.sha256[:8]}"


def record_usage(*, stack: str, artifact: Any, engine_seconds: float, generations: Iterable[_Generation]) -> None:
    """Worker time and money a chunk cost, charged to its stack and artifact."""
    label = artifact_label(artifact)
    seconds = max(engine_seconds, 0.0)
    tokens = sum(g.prompt_tokens + g.generated_tokens for g in generations)
    per_token = Decimal(artifact.price_per_1k_tokens or 0) * tokens / 1000
    per_hour = Decimal(getattr(artifact, "price_per_device_hour", 0) or 0) * Decimal(seconds) / 3600
    WORKER_SECONDS.labels(stack=stack, artifact=label).inc(seconds)
    COST.labels(stack=stack, artifact=label).inc(float(per_token + per_hour))


def record_prompt_fetch(label: str | None, *, not_modified: bool) -> None:
    """One fetch of a prompt by label through the serving API (None: by version number, not counted)."""
    if label is not None:
        PROMPT_FETCHES.labels(label=label, cache="hit" if not_modified else "miss").inc()


def record_regression(stack: str, dataset: str, metric: str) -> None:
    """For the regression check: a finished run came out worse than the stack's previous one on `metric`."""
    REGRESSIONS.labels(stack=stack, dataset=dataset, metric=metric).inc()


def initialise_counters(role: str) -> None:
    """Give series whose label values are known in advance a 0 sample, so alerts and rates see them at once."""
    if role in {"web", "worker"}:
        for status in RUN_STATUSES:
            RUNS.labels(status=status)
        for status in JOB_STATUSES:
            OPTIMISATION_JOBS.labels(status=status)
            FINE_TUNE_JOBS.labels(status=status)
    if role == "worker":
        for task in ("fulcrum.run_evaluation", "fulcrum.evaluate_chunk", "fulcrum.run_fine_tune"):
            for state in TASK_STATES:
                TASKS.labels(task=task, state=state)
        # The main process's 0 keeps the pool gauge present (not absent) when every child is gone.
        for state in ("idle", "busy"):
            WORKER_PROCESSES.labels(state=state).set(0)


# --- exposition --------------------------------------------------------------------------------------------------


class DeclaredMetrics:
    """Every Fulcrum metric family with no samples yet, as HELP and TYPE lines only.

    In multiprocess mode a family appears only once some process recorded a sample; declaring the rest lets
    Prometheus (and the dashboards' checks) know every metric a target serves before the first event.
    """

    def __init__(self, present: Iterable[str], *, scrape_time: bool = False) -> None:
        self.present = set(present)
        self.scrape_time = scrape_time  # the web process also declares what it computes when scraped

    def collect(self) -> Iterable[Metric]:
        for metric in ALL_METRICS:
            for family in metric.describe():
                if family.name not in self.present:
                    yield family
        if self.scrape_time:
            for name, documentation in SCRAPE_TIME_GAUGES.items():
                if name not in self.present:
                    yield GaugeMetricFamily(name, documentation)


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST


def registry() -> CollectorRegistry:
    """This process group's merged samples plus the declarations (what a worker's or beat's /metrics serves)."""
    from .multiproc import GroupCollector

    merged = CollectorRegistry()
    merged.register(GroupCollector())
    return merged


def render_latest() -> tuple[bytes, str]:
    """What the web process's /metrics serves: its group's samples, run results, queue depths."""
    from .collectors import web_registry

    return render(web_registry())
