"""Celery tasks: thin wrappers that take ids and call one domain function (workers.evaluation, workers.finetuning,
registry.experiments)."""

from __future__ import annotations

from celery import shared_task
from celery.utils.log import get_task_logger

from . import evaluation

log = get_task_logger(__name__)


@shared_task(name="fulcrum.run_evaluation", ignore_result=True)
def run_evaluation(run_id: int) -> int:
    """Fan a run out into chunk tasks; returns how many chunks were queued."""
    try:
        chunks = evaluation.plan_chunks(run_id)
    except Exception as exc:
        evaluation.fail(run_id, f"planning failed: {type(exc).__name__}: {exc}")
        raise
    for item_ids in chunks:
        evaluate_chunk.delay(run_id, item_ids)
    log.info("run %s: %d chunk(s) queued", run_id, len(chunks))
    return len(chunks)


@shared_task(name="fulcrum.evaluate_chunk")
def evaluate_chunk(run_id: int, item_ids: list[int]) -> int:
    try:
        return evaluation.evaluate_chunk(run_id, item_ids)
    except Exception as exc:
        # A broken model or prompt fails the same way on every retry: record it on the run for the user.
        evaluation.fail(run_id, f"{type(exc).__name__}: {exc}")
        raise


# --- lever experiments and scheduled evaluations (registry/experiments.py) ---------------------------------------


@shared_task(name="fulcrum.run_schedule", ignore_result=True)
def run_schedule(schedule_id: int, trigger: str = "beat") -> int | None:
    """Fired by Celery beat (or a label move): queue the schedule's next run; returns its id, None if skipped."""
    from registry import experiments

    run = experiments.fire_schedule(schedule_id, trigger)
    return run.pk if run is not None else None


@shared_task(name="fulcrum.start_experiment", ignore_result=True)
def start_experiment(experiment_id: int) -> tuple[int, int]:
    """Reuse or queue the experiment's runs; the report is written when the last one finishes."""
    from registry import experiments
    from registry.models import Experiment

    return experiments.start_experiment(Experiment.objects.get(pk=experiment_id))


# --- prompt optimisation (registry/optimisation/jobs.py) ---------------------------------------------------------


@shared_task(name="fulcrum.step_optimisation", ignore_result=True)
def step_optimisation(job_id: int) -> str:
    """Advance an optimisation job as far as it goes without waiting (queued again when its runs finish)."""
    from registry.optimisation import jobs

    try:
        return jobs.step(job_id)
    except Exception as exc:
        jobs.fail(job_id, f"{type(exc).__name__}: {exc}")
        raise


# --- fine-tuning (workers/finetuning.py), on the training queue (workers/routing.py) ---------------------------------


@shared_task(name="fulcrum.run_fine_tune", ignore_result=True)
def run_fine_tune(job_id: int) -> str:
    """Claim and run a fine-tune job; a redelivered message for a job already claimed or finished does nothing."""
    from . import finetuning

    outcome = finetuning.run_job(job_id)
    log.info("fine-tune job %s: %s", job_id, outcome)
    if outcome == "failed":
        from registry.models import FineTuneJob

        error = FineTuneJob.objects.filter(pk=job_id).values_list("error", flat=True).first()
        raise finetuning.JobFailed(f"fine-tune job {job_id} failed: {error}")
    return outcome
