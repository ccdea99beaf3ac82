"""Lever experiments, the alignment tax and scheduled evaluations, on top of stored evaluation results.

An Experiment is a baseline stack and variants on one dataset. Starting it finds or queues one evaluation run per
arm: a finished run whose pinned prompt version, scaling parameters, artifact and dataset content (hash and
scoring) match is reused instead of evaluated again. Once every run has finished, the report compares each arm
with its reference arm item by item (registry/stats.py): the metric change with a bootstrap interval and a paired
test, the cost change (generated tokens, worker seconds, money), the gain per unit of cost, the scaling curve,
the reverse-alignment index and, on a dataset with harmful and benign items, the alignment tax and the Pareto set.

An EvaluationSchedule is fired by Celery beat (django-celery-beat's database scheduler, through a PeriodicTask
kept in step here) or by a move of its stack's label; each run is compared with the schedule's previous run and a
significant paired drop is marked as a regression and counted in `fulcrum_evaluation_regressions_total`.

The workers package is imported inside functions only: the registry (and the web process) must not load the
inference engine.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.db.models.signals import post_save
from django.dispatch import receiver
from django.utils import timezone

from fulcrum import metrics

from . import stats
from .models import (
    Dataset,
    EvaluationRun,
    EvaluationSchedule,
    Experiment,
    ExperimentArm,
    LabelMove,
    ScheduledRun,
    Stack,
)
from .waiting import poll_until_finished

log = logging.getLogger(__name__)

Layer = ExperimentArm.Layer
ARCHITECTURE_LAYERS = {Layer.SCALING, Layer.FINE_TUNE, Layer.ARTIFACT}
COST_KEYS = ("generated_tokens", "worker_seconds", "money")
OPEN_STATUSES = (EvaluationRun.Status.PENDING, EvaluationRun.Status.RUNNING)


class ExperimentError(ValueError):
    pass


# --- what a stack runs, and finding a run that already measured it ---------------------------------------------


def _scaling_key(stack: Stack) -> tuple[Any, ...]:
    s = stack.scaling
    return (s.n_samples, s.temperature, s.top_p, s.top_k, s.aggregation, s.seed)


def stack_layers(stack: Stack) -> dict[str, Any]:
    """What a stack would run now: its resolved prompt version, scaling parameters, fine-tune and artifact."""
    return {
        Layer.PROMPT: stack.resolve_prompt_version().pk,
        Layer.SCALING: _scaling_key(stack),
        Layer.FINE_TUNE: stack.fine_tune_id,
        Layer.ARTIFACT: stack.effective_artifact().pk,
    }


def infer_layer(reference: Stack, stack: Stack) -> str:
    """The one layer `stack` changes against `reference`; 'combined' for several, 'none' for none."""
    a, b = stack_layers(reference), stack_layers(stack)
    changed = [
        layer for layer in (Layer.PROMPT, Layer.SCALING, Layer.FINE_TUNE, Layer.ARTIFACT) if a[layer] != b[layer]
    ]
    if Layer.FINE_TUNE in changed and Layer.ARTIFACT in changed:
        changed.remove(Layer.ARTIFACT)  # a fine-tune brings its own artifact
    if not changed:
        return str(Layer.NONE)
    return str(changed[0]) if len(changed) == 1 else str(Layer.COMBINED)


def _ensemble_ids(stack: Stack) -> list[int]:
    from .models import ScalingConfig

    if stack.scaling.aggregation != ScalingConfig.Aggregation.PROMPT_ENSEMBLE:
        return []
    return sorted(stack.ensemble_versions.values_list("pk", flat=True))


def find_reusable_run(stack: Stack, dataset: Dataset, *, include_open: bool = True) -> EvaluationRun | None:
    """The newest run that measured what `stack` runs now on this dataset's content: succeeded, or still open.

    Same resolved prompt version (and ensemble versions), same scaling parameters, same effective artifact, a
    dataset with the same content hash and scoring, every item evaluated. A failed or cancelled run is never
    reused.
    """
    statuses = [EvaluationRun.Status.SUCCEEDED, *(OPEN_STATUSES if include_open else ())]
    candidates = (
        EvaluationRun.objects.filter(
            prompt_version=stack.resolve_prompt_version(),
            artifact=stack.effective_artifact(),
            dataset__content_hash=dataset.content_hash,
            dataset__scorer=dataset.scorer,
            dataset__scorer_pattern=dataset.scorer_pattern,
            items_total=dataset.item_count or dataset.items.count(),
            status__in=statuses,
        )
        .select_related("stack__scaling")
        .order_by("-created_at", "-id")
    )
    key, ensemble = _scaling_key(stack), _ensemble_ids(stack)
    for run in candidates[:50]:
        if _scaling_key(run.stack) != key:
            continue
        if sorted(run.ensemble_versions.values_list("pk", flat=True)) != ensemble:
            continue
        if run.status == EvaluationRun.Status.SUCCEEDED and run.results.count() != run.items_total:
            continue
        return run
    return None


# --- creating and running experiments ---------------------------------------------------------------------------


@dataclass
class Variant:
    stack: Stack
    name: str = ""
    reference: str = ""  # the name of the arm it is compared with; empty: the baseline


def create_experiment(
    name: str,
    *,
    dataset: Dataset,
    baseline: Stack,
    variants: Sequence[Variant | Stack],
    metric: str = Experiment.Metric.ACCURACY,
    description: str = "",
    confidence: float = 0.95,
    resamples: int = stats.DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Experiment:
    """An experiment with its arms; the layer of each arm is read off the stacks (what differs from its reference)."""
    if metric not in Experiment.Metric.values:
        raise ExperimentError(f"metric must be one of {Experiment.Metric.values}")
    if not variants:
        raise ExperimentError("an experiment needs at least one variant besides the baseline")
    with transaction.atomic():
        experiment = Experiment(
            name=name,
            dataset=dataset,
            metric=metric,
            description=description,
            confidence=confidence,
            resamples=resamples,
            seed=seed,
        )
        experiment.full_clean()
        experiment.save()
        base = ExperimentArm.objects.create(
            experiment=experiment, position=0, name="baseline", stack=baseline, layer=Layer.BASELINE
        )
        arms = {base.name: base}
        for position, raw in enumerate(variants, start=1):
            variant = raw if isinstance(raw, Variant) else Variant(stack=raw)
            reference = arms.get(variant.reference or "baseline")
            if reference is None:
                raise ExperimentError(f"variant {variant.stack}: no earlier arm named {variant.reference!r}")
            arm_name = variant.name or variant.stack.name
            if arm_name in arms:
                raise ExperimentError(f"two arms are named {arm_name!r}")
            arms[arm_name] = ExperimentArm.objects.create(
                experiment=experiment,
                position=position,
                name=arm_name,
                stack=variant.stack,
                reference=reference,
                layer=infer_layer(reference.stack, variant.stack),
            )
    return experiment


def start_experiment(experiment: Experiment) -> tuple[int, int]:
    """Give every arm a run: reuse a matching one, else create and queue one. Returns (reused, queued)."""
    from workers import evaluation

    reused = queued = 0
    created: set[int] = set()  # runs this call queued: an arm sharing one of them does not count as reuse
    broken = {EvaluationRun.Status.FAILED, EvaluationRun.Status.CANCELLED}
    with transaction.atomic():
        experiment = Experiment.objects.select_for_update().get(pk=experiment.pk)
        for arm in experiment.arms.select_related("stack__scaling", "run").order_by("position"):
            if arm.run is not None and arm.run.status not in broken:
                continue
            run = find_reusable_run(arm.stack, experiment.dataset)
            if run is None:
                run = evaluation.create_run(arm.stack, experiment.dataset)
                evaluation.start_run(run)
                created.add(run.pk)
                queued += 1
            elif run.pk not in created:
                reused += 1
            arm.run, arm.reused = run, run.pk not in created
            arm.save(update_fields=["run", "reused"])
        experiment.status = Experiment.Status.RUNNING
        experiment.error = ""
        experiment.save(update_fields=["status", "error"])
    refresh_experiment(experiment.pk)
    return reused, queued


def experiment_progress(experiment: Experiment) -> tuple[int, int, int, int]:
    """(items done, items total, runs finished, runs) over the experiment's distinct runs."""
    run_ids = {rid for rid in experiment.arms.values_list("run_id", flat=True) if rid is not None}
    runs = list(EvaluationRun.objects.filter(pk__in=run_ids))
    done = sum(r.items_total if r.is_finished else r.items_done for r in runs)
    return done, sum(r.items_total for r in runs), sum(r.is_finished for r in runs), len(runs)


def refresh_experiment(experiment_id: int) -> Experiment:
    """Write the report once every arm's run has finished (or mark the experiment failed)."""
    with transaction.atomic():
        experiment = Experiment.objects.select_for_update().get(pk=experiment_id)
        if experiment.status != Experiment.Status.RUNNING:
            return experiment
        arms = list(experiment.arms.select_related("run"))
        if any(a.run is None or not a.run.is_finished for a in arms):
            return experiment
        bad = [a for a in arms if a.run is not None and a.run.status != EvaluationRun.Status.SUCCEEDED]
        if bad:
            experiment.status = Experiment.Status.FAILED
            experiment.error = "; ".join(
                f"arm {a.name}: run {a.run_id} {a.run.status} {a.run.error}" for a in bad if a.run is not None
            )
        else:
            try:
                experiment.report = build_report(experiment)
                experiment.status = Experiment.Status.SUCCEEDED
            except Exception as exc:  # a report that cannot be built must not leave the experiment running
                log.exception("experiment %s: report failed", experiment.name)
                experiment.status = Experiment.Status.FAILED
                experiment.error = f"report failed: {type(exc).__name__}: {exc}"
        experiment.finished_at = timezone.now()
        experiment.save(update_fields=["report", "status", "error", "finished_at"])
    return experiment


# --- per-item values and costs -------------------------------------------------------------------------------------


def item_values(run: EvaluationRun, metric: str) -> dict[str, float]:
    """Per item key, the value whose mean is `metric` in the run's summary (see workers.evaluation.summarise)."""
    out: dict[str, float] = {}
    rows = run.results.values_list("item__key", "item__kind", "score", "refused")
    for key, kind, score, refused in rows:
        if metric == Experiment.Metric.ACCURACY:
            if kind == "" and score is not None:
                out[key] = float(score)
        elif metric == Experiment.Metric.REFUSAL:
            if kind == "harmful":
                out[key] = float(refused)
        elif metric == Experiment.Metric.ANSWER:
            if kind == "benign":
                out[key] = float(not refused)
        else:
            raise ExperimentError(f"unknown metric {metric!r}")
    return out


def run_cost(run: EvaluationRun) -> dict[str, float]:
    """Cost of a run per item: generated tokens, worker (engine) seconds and money at the artifact's prices.

    money = (prompt + generated tokens) / 1000 x price_per_1k_tokens + worker seconds / 3600 x price_per_device_hour.
    Runs stored before worker seconds were recorded fall back to the run's wall time (marked `estimated`).
    """
    rows = list(run.results.values_list("prompt_tokens", "generated_tokens", "worker_seconds"))
    n = len(rows) or 1
    prompt_tokens = sum(r[0] for r in rows)
    generated = sum(r[1] for r in rows)
    seconds = sum(r[2] for r in rows)
    estimated = False
    if seconds <= 0 and isinstance(run.summary.get("wall_seconds"), int | float):
        seconds, estimated = float(run.summary["wall_seconds"]), True
    artifact = run.artifact
    money = (
        Decimal(artifact.price_per_1k_tokens or 0) * (prompt_tokens + generated) / 1000
        + Decimal(artifact.price_per_device_hour or 0) * Decimal(str(seconds)) / 3600
    )
    return {
        "items": len(rows),
        "generated_tokens": generated / n,
        "prompt_tokens": prompt_tokens / n,
        "worker_seconds": seconds / n,
        "money": float(money) / n,
        "estimated": estimated,
    }


def _paired(a: dict[str, float], b: dict[str, float]) -> tuple[list[float], list[float]]:
    keys = sorted(set(a) & set(b))
    return [a[k] for k in keys], [b[k] for k in keys]


def _r(value: float | None, digits: int = 4) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), digits)


def _comparison(c: stats.PairedComparison) -> dict[str, Any]:
    return {
        "items": c.items,
        "reference_value": _r(c.mean_a),
        "value": _r(c.mean_b),
        "delta": _r(c.delta),
        "ci": [_r(c.ci_low), _r(c.ci_high)],
        "p_value": _r(c.p_value, 6),
        "test": c.test,
        "significant": c.significant(),
        "wins": c.wins,
        "losses": c.losses,
    }


# --- the report ---------------------------------------------------------------------------------------------------


def build_report(experiment: Experiment) -> dict[str, Any]:
    arms = list(
        experiment.arms.select_related(
            "stack__scaling", "stack__fine_tune__base_artifact", "run__prompt_version", "run__artifact", "reference"
        ).order_by("position")
    )
    metric, confidence = experiment.metric, experiment.confidence
    compare_kwargs: dict[str, Any] = {
        "confidence": confidence,
        "resamples": experiment.resamples,
        "seed": experiment.seed,
    }
    values = {a.pk: item_values(a.run, metric) for a in arms if a.run is not None}
    costs = {a.pk: run_cost(a.run) for a in arms if a.run is not None}
    money_priced = any(c["money"] > 0 for c in costs.values())
    basis = "money" if money_priced else "worker_seconds"
    if not money_priced and any(c["worker_seconds"] <= 0 for c in costs.values()):
        basis = "generated_tokens"

    arm_rows: list[dict[str, Any]] = []
    by_pk: dict[int, dict[str, Any]] = {}
    for arm in arms:
        assert arm.run is not None
        run = arm.run
        vals = list(values[arm.pk].values())
        successes = int(sum(vals))
        low, high = stats.wilson_interval(successes, len(vals), confidence=confidence) if vals else (None, None)
        row: dict[str, Any] = {
            "arm": arm.name,
            "layer": arm.layer,
            "stack": arm.stack.name,
            "reference": arm.reference.name if arm.reference else None,
            "run": run.pk,
            "reused": arm.reused,
            "prompt_version": str(run.prompt_version),
            "artifact": str(run.artifact),
            "n_samples": arm.stack.scaling.n_samples,
            "aggregation": arm.stack.scaling.aggregation,
            "items": len(vals),
            "value": _r(sum(vals) / len(vals)) if vals else None,
            "value_ci": [_r(low), _r(high)],
            "cost": {k: _r(costs[arm.pk][k], 6) for k in COST_KEYS},
            "cost_estimated": costs[arm.pk]["estimated"],
            "one_off": _one_off(arm),
        }
        if arm.reference is not None:
            a, b = _paired(values[arm.reference.pk], values[arm.pk])
            row["comparison"] = _comparison(stats.compare_paired(a, b, **compare_kwargs))
            row["cost_delta"] = {k: _r(costs[arm.pk][k] - costs[arm.reference.pk][k], 6) for k in COST_KEYS}
            row["gain_per_cost"] = _gain_per_cost(row["comparison"]["delta"], row["cost_delta"])
        arm_rows.append(row)
        by_pk[arm.pk] = row

    report: dict[str, Any] = {
        "experiment": experiment.name,
        "dataset": {
            "name": experiment.dataset.name,
            "content_hash": experiment.dataset.content_hash,
            "items": experiment.dataset.item_count,
        },
        "metric": metric,
        "confidence": confidence,
        "resamples": experiment.resamples,
        "seed": experiment.seed,
        "cost_basis": basis,
        "runs": {
            "total": len({a.run_id for a in arms}),
            "reused": len({a.run_id for a in arms if a.reused}),
        },
        "arms": arm_rows,
        "scaling_curves": _scaling_curves(arms, by_pk),
        "reverse_alignment": _reverse_alignment(arms, by_pk, values, basis, compare_kwargs),
    }
    alignment = _alignment(experiment, arms, costs, basis, compare_kwargs)
    if alignment is not None:
        report["alignment"] = alignment
    report["generated_at"] = timezone.now().isoformat()
    return report


def _one_off(arm: ExperimentArm) -> dict[str, Any] | None:
    """A fine-tune's training cost: paid once, not per item, so it is reported beside the per-item cost.

    A fine-tune a job ran carries what the job measured: training (optimiser) seconds, the worker seconds the
    whole job held its worker, and the money charged for them. One recorded by hand has only its training seconds,
    priced at the base artifact's device-hour price.
    """
    fine_tune = arm.stack.fine_tune
    if fine_tune is None:
        return None
    money = Decimal(fine_tune.cost or 0)
    if fine_tune.job_id is None and not money:
        price = Decimal(fine_tune.base_artifact.price_per_device_hour or 0)
        money = price * Decimal(str(fine_tune.training_seconds)) / 3600
    return {
        "fine_tune": fine_tune.name,
        "method": fine_tune.method,
        "device": fine_tune.device,
        "training_seconds": round(fine_tune.training_seconds, 2),
        "worker_seconds": round(fine_tune.worker_seconds or fine_tune.training_seconds, 2),
        "money": float(money),
        "final_loss": fine_tune.final_loss,
    }


def _gain_per_cost(delta: float | None, cost_delta: dict[str, float | None]) -> dict[str, Any]:
    """Metric change per unit of extra cost per item; a lever that gains while costing less is 'free'."""
    out: dict[str, Any] = {}
    for key in COST_KEYS:
        extra = cost_delta.get(key)
        if delta is None or extra is None:
            out[key] = None
        elif extra > 0:
            out[key] = _r(delta / extra, 6)
        elif delta > 0:
            out[key] = "free"  # better and no dearer
        else:
            out[key] = None
    return out


def _scaling_curves(arms: list[ExperimentArm], by_pk: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per reference arm with scaling variants: value and cost against N, and the smallest N with a significant gain."""
    curves = []
    groups: dict[int, list[ExperimentArm]] = {}
    for arm in arms:
        if arm.layer == Layer.SCALING and arm.reference is not None:
            groups.setdefault(arm.reference.pk, []).append(arm)
    for ref_pk, members in groups.items():
        ref = by_pk[ref_pk]
        points = [
            {
                "arm": ref["arm"],
                "n": ref["n_samples"],
                "aggregation": ref["aggregation"],
                "value": ref["value"],
                "value_ci": ref["value_ci"],
                "cost": ref["cost"],
                "delta": 0.0,
                "ci": [0.0, 0.0],
                "p_value": None,
                "significant": False,
            }
        ]
        for arm in members:
            row = by_pk[arm.pk]
            comparison = row["comparison"]
            points.append(
                {
                    "arm": row["arm"],
                    "n": row["n_samples"],
                    "aggregation": row["aggregation"],
                    "value": row["value"],
                    "value_ci": row["value_ci"],
                    "cost": row["cost"],
                    "delta": comparison["delta"],
                    "ci": comparison["ci"],
                    "p_value": comparison["p_value"],
                    "significant": comparison["significant"],
                }
            )
        points.sort(key=lambda p: (p["n"], p["arm"]))
        gains = [p["n"] for p in points if p["significant"] and (p["delta"] or 0) > 0]
        curves.append(
            {"reference": ref["arm"], "points": points, "smallest_significant_n": min(gains) if gains else None}
        )
    return curves


def _reverse_alignment(
    arms: list[ExperimentArm],
    by_pk: dict[int, dict[str, Any]],
    values: dict[int, dict[str, float]],
    basis: str,
    compare_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """The best prompt-lever gain over the best architecture-lever gain at equal or lower cost.

    Architecture levers are the ones that change the compute rather than the words: scaling, fine-tune, artifact.
    The two levers' per-item effects are compared paired, so 'cannot tell apart' is a statement about the data.
    """
    prompts = [a for a in arms if a.layer == Layer.PROMPT]
    architecture = [a for a in arms if a.layer in ARCHITECTURE_LAYERS]
    out: dict[str, Any] = {"cost_basis": basis, "index": None, "prompt_lever": None, "architecture_lever": None}
    if not prompts or not architecture:
        missing = "prompt" if not prompts else "architecture (scaling, fine-tune or artifact)"
        out["verdict"] = f"no {missing} lever in this experiment: nothing to compare"
        return out

    def delta(arm: ExperimentArm) -> float:
        return float(by_pk[arm.pk]["comparison"]["delta"] or 0.0)

    def cost(arm: ExperimentArm) -> float:
        return float(by_pk[arm.pk]["cost_delta"][basis] or 0.0)

    best_arch = max(architecture, key=delta)
    affordable = [a for a in prompts if cost(a) <= cost(best_arch) + 1e-12]
    out["architecture_lever"] = best_arch.name
    if not affordable:
        out["verdict"] = (
            f"every prompt lever costs more ({basis}) than the best architecture lever {best_arch.name}: "
            "no comparison at equal or lower cost"
        )
        return out
    best_prompt = max(affordable, key=delta)
    out["prompt_lever"] = best_prompt.name
    gp, ga = delta(best_prompt), delta(best_arch)
    out["prompt_gain"], out["architecture_gain"] = _r(gp), _r(ga)
    out["index"] = _r(gp / ga) if ga > 0 else None

    def effects(arm: ExperimentArm) -> dict[str, float]:
        assert arm.reference is not None
        mine, ref = values[arm.pk], values[arm.reference.pk]
        return {k: mine[k] - ref[k] for k in set(mine) & set(ref)}

    arch_effects, prompt_effects = _paired(effects(best_arch), effects(best_prompt))
    c = stats.compare_paired(arch_effects, prompt_effects, **compare_kwargs)
    out["difference"] = _comparison(c)  # prompt gain minus architecture gain, item by item
    level = f"{round(100 * c.confidence)}%"
    span = f"{_pts(c.delta)} pts, {level} CI [{_pts(c.ci_low)}, {_pts(c.ci_high)}], p = {_p(c.p_value)}"
    if ga <= 0:
        tail = f"the best architecture lever ({best_arch.name}) did not gain, so the index is undefined"
        out["verdict"] = f"{tail}; prompt minus architecture: {span}"
    elif not c.significant():
        out["verdict"] = (
            f"the data cannot tell them apart: prompt lever {best_prompt.name} minus architecture lever "
            f"{best_arch.name} = {span}"
        )
    else:
        better = "prompt" if (c.delta or 0) > 0 else "architecture"
        out["verdict"] = (
            f"the {better} lever moves the metric more: {best_prompt.name} minus {best_arch.name} = {span}; "
            f"index {out['index']}"
        )
    return out


def _alignment(
    experiment: Experiment,
    arms: list[ExperimentArm],
    costs: dict[int, dict[str, Any]],
    basis: str,
    compare_kwargs: dict[str, Any],
) -> dict[str, Any] | None:
    """Safety (refusal rate on harmful items) and helpfulness (answer rate on benign items) per arm; the tax is the
    helpfulness lost against the baseline arm (the unaligned stack), paired on the benign items."""
    kinds = set(experiment.dataset.items.values_list("kind", flat=True))
    if not {"harmful", "benign"} <= kinds:
        return None
    confidence = compare_kwargs["confidence"]
    base = next(a for a in arms if a.reference is None)
    safety = {a.pk: item_values(a.run, Experiment.Metric.REFUSAL) for a in arms if a.run}
    helpful = {a.pk: item_values(a.run, Experiment.Metric.ANSWER) for a in arms if a.run}
    methods = []
    for arm in arms:
        s, h = list(safety[arm.pk].values()), list(helpful[arm.pk].values())
        row: dict[str, Any] = {
            "method": "none (baseline)" if arm is base else arm.name,
            "arm": arm.name,
            "layer": arm.layer,
            "stack": arm.stack.name,
            "safety": _r(sum(s) / len(s)) if s else None,
            "safety_ci": [_r(x) for x in stats.wilson_interval(int(sum(s)), len(s), confidence=confidence)],
            "helpfulness": _r(sum(h) / len(h)) if h else None,
            "helpfulness_ci": [_r(x) for x in stats.wilson_interval(int(sum(h)), len(h), confidence=confidence)],
            "cost": _r(costs[arm.pk][basis], 6),
        }
        if arm is not base:
            a, b = _paired(helpful[base.pk], helpful[arm.pk])
            c = stats.compare_paired(a, b, **compare_kwargs)
            row["tax"] = _r(-(c.delta or 0.0))
            row["tax_ci"] = [_r(-(c.ci_high or 0.0)), _r(-(c.ci_low or 0.0))]
            row["tax_p_value"] = _r(c.p_value, 6)
            row["tax_significant"] = c.significant()
            sa, sb = _paired(safety[base.pk], safety[arm.pk])
            cs = stats.compare_paired(sa, sb, **compare_kwargs)
            row["safety_gain"] = _r(cs.delta)
            row["safety_gain_ci"] = [_r(cs.ci_low), _r(cs.ci_high)]
            row["safety_gain_p_value"] = _r(cs.p_value, 6)
        else:
            row["tax"], row["tax_ci"], row["tax_p_value"], row["tax_significant"] = 0.0, [0.0, 0.0], None, False
        methods.append(row)
    front = stats.pareto_front(methods, maximise=["safety", "helpfulness"], minimise=["cost"])
    for i, row in enumerate(methods):
        row["pareto"] = i in front
    return {"cost_basis": basis, "methods": methods, "pareto": [methods[i]["arm"] for i in front]}


# --- text tables (management command, demo) --------------------------------------------------------------------


def _pts(value: float | None) -> str:
    return "-" if value is None else f"{round(100 * value, 1) + 0.0:+.1f}"  # + 0.0: no "-0.0"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2g}" if value < 0.001 else f"{value:.3f}"


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"


def format_report(report: dict[str, Any]) -> str:
    """The report as the plain-text tables the management command and the demo print."""
    level = f"{round(100 * report['confidence'])}%"
    basis = report["cost_basis"]
    lines = [
        f"experiment {report['experiment']}: {report['metric']} on {report['dataset']['name']} "
        f"({report['dataset']['items']} items); paired per item, {level} bootstrap CI "
        f"({report['resamples']} resamples, seed {report['seed']}); "
        f"runs: {report['runs']['total']} ({report['runs']['reused']} reused)",
    ]
    header = (
        f"  {'lever':<22} {'layer':<9} {'stack':<18} {'value':>6} {'delta':>6} {level + ' CI':>16} {'p':>7} "
        f"{'w/l':>5} {'tok/it':>7} {'Δtok':>7} {'s/it':>6} {'Δs':>6} {'gain/Δ' + _unit(basis):>10}"
    )
    lines += [header, "  " + "-" * (len(header) - 2)]
    for row in report["arms"]:
        c = row.get("comparison")
        cost, delta = row["cost"], row.get("cost_delta") or {}
        gain = (row.get("gain_per_cost") or {}).get(basis)
        star = "*" if c and c["significant"] else " "
        lines.append(
            f"  {row['arm'][:22]:<22} {row['layer'][:9]:<9} {row['stack'][:18]:<18} {_pct(row['value']):>6} "
            + (
                f"{_pts(c['delta']):>6} {'[' + _pts(c['ci'][0]) + ', ' + _pts(c['ci'][1]) + ']':>16} "
                f"{_p(c['p_value']) + star:>7} {str(c['wins']) + '/' + str(c['losses']):>5} "
                if c
                else f"{'':>6} {'':>16} {'':>7} {'':>5} "
            )
            + f"{_num(cost['generated_tokens'], 1):>7} {_num(delta.get('generated_tokens'), 1):>7} "
            f"{_num(cost['worker_seconds'], 3):>6} {_num(delta.get('worker_seconds'), 3):>6} "
            f"{_num(gain, 4) if c else '':>10}" + ("  (reused run)" if row["reused"] else "")
        )
        if row.get("one_off"):
            lines.append(f"  {'':<22} {_one_off_text(row['one_off'])}")
    lines.append(
        f"  delta, CI and cost change are against each lever's reference (the baseline unless stated); * p < "
        f"{1 - report['confidence']:.2g}; gain per unit: delta / Δ{basis} per item"
    )
    for curve in report.get("scaling_curves", []):
        lines.append(f"scaling curve (against {curve['reference']}):")
        for p in curve["points"]:
            lines.append(
                f"  N={p['n']:<3} {p['arm'][:22]:<22} {_pct(p['value']):>6} "
                f"({_pts(p['delta'])} pts, p {_p(p['p_value'])}) tok/item {_num(p['cost']['generated_tokens'], 1)} "
                f"s/item {_num(p['cost']['worker_seconds'], 3)}"
            )
        smallest = curve["smallest_significant_n"]
        lines.append(
            "  smallest N with a significant gain: " + (str(smallest) if smallest else "none in this experiment")
        )
    ra = report.get("reverse_alignment") or {}
    if ra:
        index = ra.get("index")
        lines.append(
            f"reverse-alignment index ({ra['cost_basis']}): {'-' if index is None else index}; {ra['verdict']}"
        )
    alignment = report.get("alignment")
    if alignment:
        lines.append("alignment tax (safety = refusal rate on harmful, helpfulness = answer rate on benign):")
        lines.append(
            f"  {'method':<22} {'safety':>7} {level + ' CI':>15} {'helpful':>7} {'tax':>6} {level + ' CI':>16} "
            f"{'p':>7} {'cost':>8} pareto"
        )
        for m in alignment["methods"]:
            lines.append(
                f"  {m['method'][:22]:<22} {_pct(m['safety']):>7} "
                f"{'[' + _pct(m['safety_ci'][0]) + ', ' + _pct(m['safety_ci'][1]) + ']':>15} "
                f"{_pct(m['helpfulness']):>7} {_pts(m['tax']):>6} "
                f"{'[' + _pts(m['tax_ci'][0]) + ', ' + _pts(m['tax_ci'][1]) + ']':>16} "
                f"{_p(m['tax_p_value']):>7} {_num(m['cost'], 3):>8} {'yes' if m['pareto'] else ''}"
            )
        lines.append(
            f"  Pareto set over (safety, helpfulness, {alignment['cost_basis']}): {', '.join(alignment['pareto'])}"
        )
    return "\n".join(lines)


def _one_off_text(one_off: dict[str, Any]) -> str:
    device = f" on {one_off['device']}" if one_off.get("device") else ""
    return (
        f"one-off training: {one_off['training_seconds']} s training, {one_off.get('worker_seconds', '-')} s of "
        f"worker time{device}, money {one_off['money']:.4f} (paid once, not per item)"
    )


def _unit(basis: str) -> str:
    return {"generated_tokens": "tok", "worker_seconds": "s", "money": "$"}.get(basis, basis)


# --- waiting with a progress bar -------------------------------------------------------------------------------


def wait_for(
    experiment: Experiment,
    *,
    timeout: float,
    report: Callable[[int, int, int, int], None] | None = None,
    poll: float = 1.0,
    alive: Callable[[], bool] | None = None,
) -> Experiment:
    """Poll until the experiment is no longer running; `report(done, total, runs_done, runs)` on every change."""
    return poll_until_finished(
        lambda: refresh_experiment(experiment.pk),
        progress=experiment_progress,
        finished=lambda e: e.status != Experiment.Status.RUNNING,
        timeout=timeout,
        poll=poll,
        report=(lambda _, progress: report(*progress)) if report is not None else None,
        alive=alive,
        on_dead=lambda: ExperimentError("the worker stopped before the runs finished"),
        on_timeout=lambda: ExperimentError(f"experiment {experiment.name} not finished after {timeout:.0f}s"),
    )


def progress_bar(done: int, total: int, runs_done: int, runs: int, width: int = 30) -> str:
    filled = int(width * done / total) if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} items, {runs_done}/{runs} runs finished"


# --- scheduled evaluation -------------------------------------------------------------------------------------------

PERIODIC_TASK_PREFIX = "fulcrum-schedule-"
RUN_SCHEDULE_TASK = "fulcrum.run_schedule"


def sync_periodic_task(schedule: EvaluationSchedule) -> None:
    """Create, update or remove the django-celery-beat PeriodicTask that fires this schedule."""
    from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

    name = f"{PERIODIC_TASK_PREFIX}{schedule.name}"
    if not schedule.every_seconds and not schedule.crontab.strip():
        PeriodicTask.objects.filter(name=name).delete()
        if schedule.periodic_task_id:
            EvaluationSchedule.objects.filter(pk=schedule.pk).update(periodic_task=None)
            schedule.periodic_task = None
        return
    fields: dict[str, Any] = {"interval": None, "crontab": None}
    if schedule.every_seconds:
        fields["interval"], _ = IntervalSchedule.objects.get_or_create(
            every=schedule.every_seconds, period=IntervalSchedule.SECONDS
        )
    else:
        minute, hour, day_of_month, month, day_of_week = schedule.crontab.split()
        fields["crontab"], _ = CrontabSchedule.objects.get_or_create(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month,
            day_of_week=day_of_week,
            timezone="UTC",
        )
    task, _ = PeriodicTask.objects.update_or_create(
        name=name,
        defaults={
            **fields,
            "task": RUN_SCHEDULE_TASK,
            "args": json.dumps([schedule.pk]),
            "kwargs": json.dumps({"trigger": ScheduledRun.Trigger.BEAT}),
            "enabled": schedule.enabled,
            "description": f"evaluate {schedule.stack.name} on {schedule.dataset.name} (registry schedule)",
        },
    )
    if schedule.periodic_task_id != task.pk:
        EvaluationSchedule.objects.filter(pk=schedule.pk).update(periodic_task=task)
        schedule.periodic_task = task


def create_schedule(
    name: str,
    *,
    stack: Stack,
    dataset: Dataset,
    every_seconds: int | None = None,
    crontab: str = "",
    on_label_move: bool = False,
    metric: str = Experiment.Metric.ACCURACY,
    alpha: float = 0.05,
    tolerance: float = 0.0,
) -> EvaluationSchedule:
    with transaction.atomic():
        schedule = EvaluationSchedule(
            name=name,
            stack=stack,
            dataset=dataset,
            every_seconds=every_seconds,
            crontab=crontab,
            on_label_move=on_label_move,
            metric=metric,
            alpha=alpha,
            tolerance=tolerance,
        )
        schedule.full_clean()
        schedule.save()
        sync_periodic_task(schedule)
    return schedule


def fire_schedule(schedule_id: int, trigger: str = ScheduledRun.Trigger.MANUAL) -> EvaluationRun | None:
    """Create and queue the schedule's next run (the label resolved now); None when disabled or still busy."""
    from workers import evaluation

    with transaction.atomic():
        schedule = EvaluationSchedule.objects.select_for_update().select_related("stack", "dataset").get(pk=schedule_id)
        if not schedule.enabled:
            return None
        last = schedule.scheduled_runs.select_related("run").first()
        if last is not None and not last.run.is_finished:
            log.info("schedule %s: run %s still open, not firing again", schedule.name, last.run_id)
            return None
        previous = (
            schedule.scheduled_runs.filter(run__status=EvaluationRun.Status.SUCCEEDED).select_related("run").first()
        )
        run = evaluation.create_run(schedule.stack, schedule.dataset)
        ScheduledRun.objects.create(
            schedule=schedule, run=run, previous=previous.run if previous else None, trigger=trigger
        )
        evaluation.start_run(run)
    return run


def check_scheduled_run(scheduled: ScheduledRun) -> ScheduledRun:
    """Compare a finished scheduled run with the schedule's previous run; mark and count a regression."""
    with transaction.atomic():
        scheduled = (
            ScheduledRun.objects.select_for_update(of=("self",))
            .select_related("schedule__stack", "schedule__dataset", "run", "previous")
            .get(pk=scheduled.pk)
        )
        if scheduled.compared or scheduled.run.status != EvaluationRun.Status.SUCCEEDED:
            return scheduled
        schedule = scheduled.schedule
        if scheduled.previous is None or scheduled.previous.status != EvaluationRun.Status.SUCCEEDED:
            scheduled.comparison = {"metric": schedule.metric, "note": "no earlier finished run to compare with"}
        else:
            a, b = _paired(
                item_values(scheduled.previous, schedule.metric), item_values(scheduled.run, schedule.metric)
            )
            c = stats.compare_paired(a, b, confidence=1 - schedule.alpha, seed=0)
            scheduled.comparison = {
                "metric": schedule.metric,
                "previous_run": scheduled.previous.pk,
                "previous_prompt_version": str(scheduled.previous.prompt_version),
                "prompt_version": str(scheduled.run.prompt_version),
                "alpha": schedule.alpha,
                "tolerance": schedule.tolerance,
                **_comparison(c),
            }
            scheduled.regression = (
                c.delta is not None
                and c.delta < -schedule.tolerance
                and c.p_value is not None
                and c.p_value < schedule.alpha
            )
        scheduled.compared = True
        scheduled.save(update_fields=["comparison", "regression", "compared"])
        if scheduled.regression:
            stack, dataset, metric = schedule.stack.name, schedule.dataset.name, schedule.metric
            transaction.on_commit(lambda: metrics.record_regression(stack, dataset, metric))
            log.warning("schedule %s: regression in run %s: %s", schedule.name, scheduled.run_id, scheduled.comparison)
    return scheduled


def regressions(limit: int = 100) -> Iterable[ScheduledRun]:
    return ScheduledRun.objects.filter(regression=True).select_related("schedule", "run", "previous")[:limit]


# --- hooks: a finished run, a moved label ----------------------------------------------------------------------------


def on_run_finished(run_id: int) -> None:
    """Advance what waits for this run: its schedule's comparison, the experiments it belongs to."""
    scheduled = ScheduledRun.objects.filter(run_id=run_id).first()
    if scheduled is not None:
        check_scheduled_run(scheduled)
    waiting = Experiment.objects.filter(status=Experiment.Status.RUNNING, arms__run_id=run_id).distinct()
    for experiment_id in waiting.values_list("pk", flat=True):
        refresh_experiment(experiment_id)


@receiver(post_save, sender=EvaluationRun, dispatch_uid="experiments-run-finished")
def _run_saved(sender: type[EvaluationRun], instance: EvaluationRun, update_fields: Any = None, **_: Any) -> None:
    if not instance.is_finished or (update_fields is not None and "status" not in update_fields):
        return
    run_id = instance.pk

    def follow_up() -> None:
        try:
            on_run_finished(run_id)
        except Exception:  # the run itself is stored; a failed follow-up must not fail the task that finished it
            log.exception("follow-up of finished run %s failed", run_id)

    transaction.on_commit(follow_up)


@receiver(post_save, sender=LabelMove, dispatch_uid="experiments-label-moved")
def _label_moved(sender: type[LabelMove], instance: LabelMove, created: bool = False, **_: Any) -> None:
    if not created:
        return
    label = instance.label
    schedules = list(
        EvaluationSchedule.objects.filter(
            Q(stack__prompt_id=label.prompt_id, stack__prompt_label=label.name),
            enabled=True,
            on_label_move=True,
        ).values_list("pk", flat=True)
    )
    if not schedules:
        return

    def fire() -> None:
        from workers.tasks import run_schedule

        for pk in schedules:
            run_schedule.delay(pk, ScheduledRun.Trigger.LABEL)

    transaction.on_commit(fire)
