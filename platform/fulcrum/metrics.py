"""Prometheus metrics, in prometheus-client's multiprocess mode.

Every process (web, each worker child, beat) writes its samples to files under PROMETHEUS_MULTIPROC_DIR; a scrape
of any /metrics endpoint merges them. Labels stay low-cardinality: provider, stack, dataset, status — never an
item, a user or a run id.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# Generation on a small model takes tens of milliseconds to tens of seconds.
LLM_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)

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
    buckets=LLM_LATENCY_BUCKETS,
)
PROMPT_TOKENS = Counter("fulcrum_prompt_tokens", "Prompt tokens processed.", ["provider"])
GENERATED_TOKENS = Counter("fulcrum_generated_tokens", "Tokens generated, all samples counted.", ["provider"])
ITEMS_EVALUATED = Counter("fulcrum_evaluation_items", "Dataset items evaluated.", ["stack"])
RUNS = Counter("fulcrum_evaluation_runs", "Evaluation runs that reached a final status.", ["status"])
ACCURACY = Gauge(
    "fulcrum_evaluation_accuracy_ratio",
    "Accuracy of the latest finished run of a stack on a dataset.",
    ["stack", "dataset"],
    multiprocess_mode="mostrecent",
)
REFUSAL_RATE = Gauge(
    "fulcrum_evaluation_refusal_rate_ratio",
    "Share of harmful items refused in the latest finished run.",
    ["stack", "dataset"],
    multiprocess_mode="mostrecent",
)
ANSWER_RATE = Gauge(
    "fulcrum_evaluation_answer_rate_ratio",
    "Share of benign items answered (not refused) in the latest finished run.",
    ["stack", "dataset"],
    multiprocess_mode="mostrecent",
)


def registry() -> CollectorRegistry:
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged)
    return merged


def render_latest() -> tuple[bytes, str]:
    return generate_latest(registry()), CONTENT_TYPE_LATEST
