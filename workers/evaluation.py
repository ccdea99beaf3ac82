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
from registry.models import Dataset, DatasetItem, EvaluationRun, ItemResult, PromptVersion, ScalingConfig, Stack

from . import aggregation, scorers
from .engine import Engine, Sample, SamplingParams

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 64


class RunNotRunnable(RuntimeError):
    pass


# --- creating and starting runs --------------------------------------------------------------------------------


def create_run(stack: Stack, dataset: Dataset, *, item_keys: Iterable[str] | None = None) -> EvaluationRun:
    """A pending run with the prompt version(s) and artifact pinned now (a label may move later).

    `item_keys` restricts the run to those items of the dataset (an optimisation job's rungs and held-out split);
    None evaluates every item.
    """
    version = stack.resolve_prompt_version()
    keys = sorted(set(item_keys)) if item_keys is not None else []
    if item_keys is not None:
        if not keys:
            raise RunNotRunnable("a run on a subset of items needs at least one item key")
        known = set(dataset.items.filter(key__in=keys).values_list("key", flat=True))
        absent = [k for k in keys if k not in known]
        if absent:
            raise RunNotRunnable(f"dataset {dataset.name} has no item(s) {', '.join(absent[:5])}")
    ensemble = (
        list(stack.ensemble_versions.all())
        if stack.scaling.aggregation == ScalingConfig.Aggregation.PROMPT_ENSEMBLE
        else []
    )
    first = dataset.items.first()
    if first is None:
        raise RunNotRunnable(f"dataset {dataset.name} has no items")
    for v in (version, *ensemble):
        missing = set(v.variables) - set(first.inputs)
        if missing:
            raise RunNotRunnable(
                f"prompt {v} needs variable(s) {sorted(missing)} that dataset {dataset.name} items do not have"
            )
    with transaction.atomic():
        run = EvaluationRun.objects.create(
            stack=stack,
            dataset=dataset,
            prompt_version=version,
            artifact=stack.effective_artifact(),
            items_total=len(keys) if keys else dataset.items.count(),
            item_keys=keys,
            item_subset_hash=EvaluationRun.subset_hash(keys),
        )
        run.ensemble_versions.set(ensemble)
    return run


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
    items = run.dataset.items.order_by("index")
    if run.item_keys:
        items = items.filter(key__in=run.item_keys)
    ids = [i for i in items.values_list("id", flat=True) if i not in done]
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


def sampling_params(run: EvaluationRun, version: PromptVersion, offset: int = 0) -> SamplingParams:
    scaling = run.stack.scaling
    params = version.params
    sampled = scaling.n_samples > 1
    return SamplingParams(
        n=scaling.n_samples,
        # A scaling config that samples overrides the prompt's temperature; a greedy one keeps the prompt's.
        temperature=scaling.temperature if sampled else float(params.get("temperature", scaling.temperature)),
        top_p=scaling.top_p if sampled else float(params.get("top_p", scaling.top_p)),
        top_k=scaling.top_k or int(params.get("top_k", 0)),
        max_new_tokens=int(params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
        # Each prompt of an ensemble draws its own stream of samples.
        seed=scaling.seed + offset,
    )


def evaluate_chunk(run_id: int, item_ids: list[int]) -> int:
    """Evaluate the given items of a run; return how many results were written."""
    run = EvaluationRun.objects.select_related("stack__scaling", "prompt_version", "artifact", "dataset").get(pk=run_id)
    if run.is_finished:
        log.info("run %s is %s; skipping chunk", run_id, run.status)
        return 0
    items = list(DatasetItem.objects.filter(pk__in=item_ids, dataset=run.dataset).order_by("index"))
    if not items:
        return 0
    engine = get_engine(run.artifact.path)
    versions = [run.prompt_version, *run.ensemble_versions.order_by("prompt_id", "number")]
    # One batched generation per prompt version; an item's samples are then pooled across versions.
    pooled: list[list[tuple[PromptVersion, Sample]]] = [[] for _ in items]
    rendered: list[list[str]] = [[] for _ in items]
    totals = [[0, 0.0, 0.0] for _ in items]  # prompt tokens, latency, time to first token
    engine_seconds = 0.0  # the chunk's engine time, shared out over its items (the cost of a run)
    for offset, version in enumerate(versions):
        texts = [engine.render(version.render_messages(item.inputs)) for item in items]
        # Seeding by item index keeps an item's samples identical however the items are chunked.
        gens = engine.generate(texts, sampling_params(run, version, offset), seeds=[item.index for item in items])
        for i, (text, gen) in enumerate(zip(texts, gens, strict=True)):
            pooled[i].extend((version, sample) for sample in gen.samples)
            rendered[i].append(text)
            totals[i][0] += gen.prompt_tokens
            totals[i][1] += gen.latency_s
            totals[i][2] = totals[i][2] or gen.ttft_s
            metrics.record_generation(engine.provider, gen)
        stats = engine.last_stats  # of this generate call: the worker time it cost
        engine_seconds += stats.prefill_s + stats.decode_s
        metrics.record_usage(
            stack=run.stack.name,
            artifact=run.artifact,
            engine_seconds=stats.prefill_s + stats.decode_s,
            generations=gens,
        )
    worker = f"{socket.gethostname()}:{os.getpid()}"
    rows = [
        _item_result(run, item, rendered[i], pooled[i], int(totals[i][0]), totals[i][1], worker)
        for i, item in enumerate(items)
    ]
    for row in rows:
        row.worker_seconds = engine_seconds / len(rows)
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
                "worker_seconds",
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


PROMPT_SEPARATOR = "\n\n===== next prompt version =====\n\n"


def _storable(text: str) -> str:
    # PostgreSQL text and jsonb cannot hold NUL, and a model can emit a byte token that decodes to one.
    return text.replace("\x00", "\ufffd")


def _item_result(
    run: EvaluationRun,
    item: DatasetItem,
    rendered: list[str],
    pooled: list[tuple[PromptVersion, Sample]],
    prompt_tokens: int,
    latency_s: float,
    worker: str,
) -> ItemResult:
    scorer_kind = run.dataset.scorer
    pattern = run.dataset.scorer_pattern or None
    scored = [scorers.score(scorer_kind, s.text, item.expected, pattern=pattern) for _, s in pooled]
    samples = [
        {
            "text": _storable(s.text),
            "answer": _storable(r.answer),
            "correct": r.correct,
            "refused": r.refused,
            "tokens": len(s.token_ids),
            "mean_logprob": round(s.mean_logprob, 4),
            "finish_reason": s.finish_reason,
            "prompt_version": str(version),
        }
        for (version, s), r in zip(pooled, scored, strict=True)
    ]
    chosen = choose_sample(
        run.stack.scaling.aggregation, [r.answer for r in scored], [s.mean_logprob for _, s in pooled]
    )
    winner = scored[chosen]
    refused_votes = sum(r.refused for r in scored)
    return ItemResult(
        run=run,
        item=item,
        rendered_prompt=_storable(PROMPT_SEPARATOR.join(rendered)),
        samples=samples,
        answer=_storable(winner.answer),
        score=None if winner.correct is None else float(winner.correct),
        # Several samples refuse "as a whole" only when most of them do.
        refused=refused_votes * 2 > len(scored) if len(scored) > 1 else winner.refused,
        prompt_tokens=prompt_tokens,
        generated_tokens=sum(len(s.token_ids) for _, s in pooled),
        latency_s=latency_s,
        worker=worker,
    )


def choose_sample(strategy: str, answers: list[str], mean_logprobs: list[float]) -> int:
    """Index of the sample whose answer stands for the item under the scaling config's aggregation."""
    if len(answers) == 1 or strategy == ScalingConfig.Aggregation.NONE:
        return 0
    if strategy == ScalingConfig.Aggregation.BEST_OF_N:
        best = aggregation.best_of_n(list(zip(answers, mean_logprobs, strict=True)))
        ranked = sorted(range(len(answers)), key=lambda i: -mean_logprobs[i])
        return next((i for i in ranked if answers[i] == best), 0)
    # majority vote and prompt ensembles both vote over the extracted answers
    vote = aggregation.majority_vote(answers)
    return next((i for i, a in enumerate(answers) if a == vote.answer), 0)


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
    # Accuracy, refusal and answer rates and the alignment tax are read from the run records when the web process
    # is scraped (fulcrum/collectors.py), so every worker machine's latest result counts.
    metrics.RUNS.labels(status="succeeded").inc()
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
        "worker_seconds": round(sum(r.worker_seconds for r in rows), 4),
    }
