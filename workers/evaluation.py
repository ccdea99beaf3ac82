"""Evaluation runs: the domain functions the Celery tasks call.

One evaluation = one EvaluationRun (stack x dataset, prompt version and artifact pinned at creation). It fans out
over chunks of items; each chunk renders prompts, asks the engine for N samples per input, scores and aggregates
them, and upserts one ItemResult per item, so a redelivered chunk overwrites instead of duplicating. Progress is
derived from the stored results; the chunk that stores the last result finalises the run.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from fulcrum import metrics
from registry.models import Dataset, DatasetItem, EvaluationRun, ItemResult, Stack

from . import aggregation, scorers
from .engine import Engine, SamplingParams

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 64


class RunNotRunnable(RuntimeError):
    pass


# --- creating and starting runs --------------------------------------------------------------------------------


def create_run(stack: Stack, dataset: Dataset) -> EvaluationRun:
    """A pending run with the prompt version and artifact pinned now (a label may move later)."""
    version = stack.resolve_prompt_version()
    total = dataset.items.count()
    if total == 0:
        raise RunNotRunnable(f"dataset {dataset.name} has no items")
    missing = set(version.variables) - set(dataset.items.first().inputs)  # type: ignore[union-attr]
    if missing:
        raise RunNotRunnable(
            f"prompt {version} needs variable(s) {sorted(missing)} that dataset {dataset.name} items do not have"
        )
    return EvaluationRun.objects.create(
        stack=stack,
        dataset=dataset,
        prompt_version=version,
        artifact=stack.effective_artifact(),
        items_total=total,
    )


def start_run(run: EvaluationRun) -> None:
    """Queue the run once the surrounding transaction commits (a worker must be able to read it)."""
    from .tasks import run_evaluation

    run_id = run.pk
    transaction.on_commit(lambda: run_evaluation.delay(run_id))


def plan_chunks(run_id: int) -> list[list[int]]:
    """Mark the run running and split its not-yet-evaluated items into chunks for the workers."""
    with transaction.atomic():
        run = EvaluationRun.objects.select_for_update().get(pk=run_id)
        if run.is_finished:
            return []
        if run.status == EvaluationRun.Status.PENDING:
            run.status = EvaluationRun.Status.RUNNING
            run.started_at = timezone.now()
            run.save(update_fields=["status", "started_at"])
        done = set(run.results.values_list("item_id", flat=True))
    ids = [i for i in run.dataset.items.order_by("index").values_list("id", flat=True) if i not in done]
    # Whole prompts per chunk: shared-prefix sampling batches an item's N samples together.
    size = max(1, settings.FULCRUM_CHUNK_SIZE)
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
    if not chunks:
        finalise(run_id)
    return chunks


def cancel_run(run: EvaluationRun) -> bool:
    with transaction.atomic():
        locked = EvaluationRun.objects.select_for_update().get(pk=run.pk)
        if locked.is_finished:
            return False
        locked.status = EvaluationRun.Status.CANCELLED
        locked.finished_at = timezone.now()
        locked.save(update_fields=["status", "finished_at"])
    metrics.RUNS.labels(status="cancelled").inc()
    return True


# --- running a chunk ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def get_engine(folder: str) -> Engine:
    """One engine per artifact per worker process, built on first use (after the pool has forked)."""
    return Engine(folder, provider=settings.FULCRUM_PROVIDER, threads=settings.FULCRUM_INTRA_OP_THREADS)


def sampling_params(run: EvaluationRun) -> SamplingParams:
    scaling = run.stack.scaling
    params = run.prompt_version.params
    return SamplingParams(
        n=scaling.n_samples,
        # A scaling config that samples overrides the prompt's temperature; a greedy one keeps the prompt's.
        temperature=scaling.temperature
        if scaling.n_samples > 1
        else float(params.get("temperature", scaling.temperature)),
        top_p=scaling.top_p if scaling.n_samples > 1 else float(params.get("top_p", scaling.top_p)),
        top_k=scaling.top_k or int(params.get("top_k", 0)),
        max_new_tokens=int(params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
        seed=scaling.seed,
    )


def evaluate_chunk(run_id: int, item_ids: list[int]) -> int:
    """Evaluate the given items of a run; return how many results were written."""
    run = EvaluationRun.objects.select_related("stack__scaling", "prompt_version", "artifact", "dataset").get(
        pk=run_id
    )
    if run.is_finished:
        log.info("run %s is %s; skipping chunk", run_id, run.status)
        return 0
    items = list(DatasetItem.objects.filter(pk__in=item_ids, dataset=run.dataset).order_by("index"))
    if not items:
        return 0
    engine = get_engine(run.artifact.path)
    params = sampling_params(run)
    conversations = [run.prompt_version.render_messages(item.inputs) for item in items]
    rendered = [engine.render(c) for c in conversations]
    # Seeding by item index keeps an item's samples identical however the items are chunked.
    generations = engine.generate(rendered, params, seeds=[item.index for item in items])
    worker = f"{socket.gethostname()}:{os.getpid()}"
    rows = []
    for item, text, gen in zip(items, rendered, generations, strict=True):
        rows.append(_item_result(run, item, text, gen, worker))
        metrics.INFERENCE_SECONDS.labels(provider=engine.provider).observe(gen.latency_s)
        metrics.TIME_TO_FIRST_TOKEN.labels(provider=engine.provider).observe(gen.ttft_s)
        metrics.PROMPT_TOKENS.labels(provider=engine.provider).inc(gen.prompt_tokens)
        metrics.GENERATED_TOKENS.labels(provider=engine.provider).inc(gen.generated_tokens)
    metrics.ITEMS_EVALUATED.labels(stack=run.stack.name).inc(len(rows))
    with transaction.atomic():
        locked = EvaluationRun.objects.select_for_update().get(pk=run_id)
        if locked.is_finished:
            return 0
        ItemResult.objects.bulk_create(
            rows,
            update_conflicts=True,
            unique_fields=["run", "item"],
            update_fields=[
                "rendered_prompt",
                "samples",
                "answer",
                "score",
                "refused",
                "prompt_tokens",
                "generated_tokens",
                "latency_s",
                "worker",
            ],
        )
        locked.items_done = locked.results.count()
        if not locked.provider:
            locked.provider = engine.provider
        locked.save(update_fields=["items_done", "provider"])
        complete = locked.items_done >= locked.items_total
    if complete:
        finalise(run_id)
    return len(rows)


def _item_result(run: EvaluationRun, item: DatasetItem, text: str, gen: Any, worker: str) -> ItemResult:
    scorer_kind = run.dataset.scorer
    pattern = run.dataset.scorer_pattern or None
    scored = [scorers.score(scorer_kind, s.text, item.expected, pattern=pattern) for s in gen.samples]
    samples = [
        {
            "text": s.text,
            "answer": r.answer,
            "correct": r.correct,
            "refused": r.refused,
            "tokens": len(s.token_ids),
            "mean_logprob": round(s.mean_logprob, 4),
            "finish_reason": s.finish_reason,
        }
        for s, r in zip(gen.samples, scored, strict=True)
    ]
    chosen = 0
    if run.stack.scaling.aggregation == "majority_vote" and len(scored) > 1:
        vote = aggregation.majority_vote([r.answer for r in scored])
        chosen = next((i for i, r in enumerate(scored) if r.answer == vote.answer), 0)
    winner = scored[chosen]
    refused_votes = sum(r.refused for r in scored)
    return ItemResult(
        run=run,
        item=item,
        rendered_prompt=text,
        samples=samples,
        answer=winner.answer,
        score=None if winner.correct is None else float(winner.correct),
        refused=refused_votes * 2 > len(scored) if len(scored) > 1 else winner.refused,
        prompt_tokens=gen.prompt_tokens,
        generated_tokens=gen.generated_tokens,
        latency_s=gen.latency_s,
        worker=worker,
    )


# --- finishing ---------------------------------------------------------------------------------------------------


def finalise(run_id: int) -> EvaluationRun:
    with transaction.atomic():
        run = EvaluationRun.objects.select_for_update().select_related("stack", "dataset").get(pk=run_id)
        if run.is_finished:
            return run
        run.summary = summarise(run.results.select_related("item"))
        run.status = EvaluationRun.Status.SUCCEEDED
        run.finished_at = timezone.now()
        if run.started_at:
            run.summary["wall_seconds"] = round((run.finished_at - run.started_at).total_seconds(), 2)
        run.save(update_fields=["summary", "status", "finished_at"])
    labels = {"stack": run.stack.name, "dataset": run.dataset.name}
    metrics.RUNS.labels(status="succeeded").inc()
    for key, gauge in (
        ("accuracy", metrics.ACCURACY),
        ("refusal_rate_harmful", metrics.REFUSAL_RATE),
        ("answer_rate_benign", metrics.ANSWER_RATE),
    ):
        if run.summary.get(key) is not None:
            gauge.labels(**labels).set(run.summary[key])
    return run


def fail(run_id: int, error: str) -> None:
    with transaction.atomic():
        run = EvaluationRun.objects.select_for_update().get(pk=run_id)
        if run.is_finished:
            return
        run.status = EvaluationRun.Status.FAILED
        run.error = error[:5000]
        run.finished_at = timezone.now()
        run.save(update_fields=["status", "error", "finished_at"])
    metrics.RUNS.labels(status="failed").inc()


def _rate(values: list[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 4)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 4)


def summarise(results: Iterable[ItemResult]) -> dict[str, Any]:
    """Quality, safety, latency and token figures over a run's item results."""
    rows = list(results)
    scored = [r.score for r in rows if r.score is not None and r.item.kind == ""]
    harmful = [r.refused for r in rows if r.item.kind == "harmful"]
    benign = [not r.refused for r in rows if r.item.kind == "benign"]
    latencies = [r.latency_s for r in rows]
    generated = sum(r.generated_tokens for r in rows)
    return {
        "items": len(rows),
        "scored_items": len(scored),
        "accuracy": round(sum(scored) / len(scored), 4) if scored else None,
        "refusal_rate_harmful": _rate(harmful),
        "answer_rate_benign": _rate(benign),
        "harmful_items": len(harmful),
        "benign_items": len(benign),
        "latency_p50_s": _percentile(latencies, 50),
        "latency_p95_s": _percentile(latencies, 95),
        "prompt_tokens": sum(r.prompt_tokens for r in rows),
        "generated_tokens": generated,
        "generated_tokens_per_item": round(generated / len(rows), 2) if rows else 0,
    }
