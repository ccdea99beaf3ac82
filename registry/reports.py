"""Evaluation results as tables: per-item rows for export, and the comparison of two runs on one dataset."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

from django.core.exceptions import ValidationError

from .models import EvaluationRun, ItemResult

EXPORT_COLUMNS = (
    "item",
    "index",
    "kind",
    "expected",
    "answer",
    "score",
    "refused",
    "prompt_tokens",
    "generated_tokens",
    "latency_s",
    "worker",
    "inputs",
)


def result_rows(run: EvaluationRun) -> Iterator[dict[str, Any]]:
    results = ItemResult.objects.filter(run=run).select_related("item").order_by("item__index")
    for result in results.iterator(chunk_size=1000):
        item = result.item
        yield {
            "item": item.key,
            "index": item.index,
            "kind": item.kind,
            "expected": item.expected,
            "answer": result.answer,
            "score": result.score,
            "refused": result.refused,
            "prompt_tokens": result.prompt_tokens,
            "generated_tokens": result.generated_tokens,
            "latency_s": result.latency_s,
            "worker": result.worker,
            "inputs": item.inputs,
        }


def _csv_cell(value: Any) -> Any:
    if isinstance(value, dict | list):
        value = json.dumps(value, ensure_ascii=False, sort_keys=True)
    # Spreadsheet programs run a cell starting with = + - @ as a formula; a leading quote keeps it text.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def export_csv(run: EvaluationRun) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_COLUMNS)
    for row in result_rows(run):
        writer.writerow([_csv_cell(row[column]) for column in EXPORT_COLUMNS])
        if buffer.tell() > 64 * 1024:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def export_json(run: EvaluationRun) -> dict[str, Any]:
    return {
        "run": run.pk,
        "stack": run.stack.name,
        "dataset": run.dataset.name,
        "prompt_version": str(run.prompt_version),
        "status": run.status,
        "summary": run.summary,
        "results": list(result_rows(run)),
    }


# Metric names containing one of these are costs: a drop is an improvement.
LOWER_IS_BETTER = ("latency", "seconds", "tokens", "cost", "price", "ttft")


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def compare_runs(a: EvaluationRun, b: EvaluationRun, *, limit: int = 500) -> dict[str, Any]:
    """Metric deltas (b - a) and the items on which the two runs disagree (answer, score or refusal)."""
    if a.dataset_id != b.dataset_id:
        raise ValidationError(
            f"runs {a.pk} and {b.pk} were evaluated on different datasets ({a.dataset} and {b.dataset}); "
            "a comparison needs the same dataset"
        )
    metrics = []
    for key in sorted(set(a.summary) | set(b.summary)):
        left, right = a.summary.get(key), b.summary.get(key)
        if not (_numeric(left) or _numeric(right)):
            continue
        delta = right - left if _numeric(left) and _numeric(right) else None
        lower_is_better = any(word in key for word in LOWER_IS_BETTER)
        better = None if not delta else (delta < 0) == lower_is_better
        metrics.append({"metric": key, "a": left, "b": right, "delta": delta, "better": better})
    left_results = {r.item_id: r for r in ItemResult.objects.filter(run=a)}
    right_results = {r.item_id: r for r in ItemResult.objects.filter(run=b)}
    disagreements = []
    both = 0
    for item in a.dataset.items.order_by("index"):
        left, right = left_results.get(item.pk), right_results.get(item.pk)
        if left is None or right is None:
            continue
        both += 1
        if (left.answer, left.score, left.refused) == (right.answer, right.score, right.refused):
            continue
        if left.score is not None and right.score is not None and left.score != right.score:
            change = "fixed" if right.score > left.score else "broken"
        else:
            change = "changed"
        disagreements.append(
            {
                "item": item.key,
                "index": item.index,
                "expected": item.expected,
                "a_answer": left.answer,
                "b_answer": right.answer,
                "a_score": left.score,
                "b_score": right.score,
                "a_refused": left.refused,
                "b_refused": right.refused,
                "change": change,
            }
        )
    return {
        "a": a.pk,
        "b": b.pk,
        "dataset": a.dataset.name,
        "items_compared": both,
        "disagreement_count": len(disagreements),
        "fixed": sum(d["change"] == "fixed" for d in disagreements),
        "broken": sum(d["change"] == "broken" for d in disagreements),
        "metrics": metrics,
        "disagreements": disagreements[:limit],
        "truncated": len(disagreements) > limit,
    }
