"""Fine-tune jobs: the domain functions the API, the admin, `manage.py fine_tune` and the Celery task call.

A job is created pending (an identical request joins the open or succeeded job with the same spec hash instead
of training again) and queued on the training queue. A worker claims it atomically (pending -> running, with a
fresh claim token), trains (workers/training.py), exports the merged weights through the same conversion
pipeline as an import (workers/convert.py), and registers the result artifact and its FineTune in one
transaction, guarded by the job's claim token and the FineTune's one-to-one key on the job: a redelivered
message, a second worker or a worker that lost its claim never registers a second result.

Progress, the loss curve and a heartbeat are written every few steps; the cancel flag is read after every step.
A failed or cancelled job removes its folder (merged weights, ONNX export, partial files) and registers nothing.
A job whose heartbeat stops for FULCRUM_TRAIN_STALE_SECONDS is presumed orphaned: a redelivered message restarts
it under a new claim, and cancelling it finishes it at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from fulcrum import metrics
from registry.models import Dataset, FineTune, FineTuneJob, ModelArtifact, NotTrainable, PromptVersion
from registry.prompting import PromptTemplateError
from registry.waiting import poll_until_finished

from . import convert, scorers, training

log = logging.getLogger(__name__)

Status = FineTuneJob.Status
# Progress (steps, loss curve, heartbeat) is written at least this often, and on the last step.
PROGRESS_EVERY_SECONDS = 2.0
# Longer runs keep about this many points of their loss curve (every k-th step, and the last).
LOSS_CURVE_POINTS = 1000
# Between steps too (loading, the loss probes, merging, the ONNX export) a running job's heartbeat is renewed this
# often, so only a dead worker's job ever looks orphaned.
HEARTBEAT_SECONDS = 30.0
NAME_RE = re.compile(r"[-\w.]{1,200}")


class FineTuneError(ValueError):
    """A job that cannot be created as asked; `field` names the input at fault."""

    def __init__(self, message: str, field: str = "non_field_errors") -> None:
        super().__init__(message)
        self.field = field


class JobFailed(RuntimeError):
    """Raised by the Celery task after a job failed, so the task counts as failed too."""


class _Superseded(Exception):  # noqa: N818 - a control-flow signal, not an error
    """This worker no longer holds the job's claim (cancelled as stale, or taken over): stop, register nothing."""


# --- creating, starting, cancelling ------------------------------------------------------------------------------


def training_examples(dataset: Dataset, prompt_version: PromptVersion) -> list[training.Example]:
    """One chat pair per item: the prompt version's messages for its inputs, and its expected answer.

    An expected value with alternatives ("4|four") trains on the first one.
    """
    examples = []
    for item in dataset.items.order_by("index"):
        answer = item.expected.split(scorers.ALTERNATIVE_SEPARATOR)[0].strip()
        if not answer:
            raise FineTuneError(
                f"dataset {dataset.name}: item {item.key} has no expected answer to train on", field="dataset"
            )
        try:
            messages = prompt_version.render_messages(item.inputs)
        except PromptTemplateError as exc:
            raise FineTuneError(f"item {item.key}: {exc}", field="prompt_version") from None
        examples.append(training.Example(messages=messages, answer=answer))
    if not examples:
        raise FineTuneError(f"dataset {dataset.name} has no items", field="dataset")
    return examples


def create_job(
    *,
    name: str,
    base_artifact: ModelArtifact,
    dataset: Dataset,
    prompt_version: PromptVersion,
    method: str = FineTuneJob.Method.LORA,
    hyperparameters: dict[str, Any] | None = None,
    seed: int = 0,
    created_by: Any = None,
) -> tuple[FineTuneJob, bool]:
    """A pending job for this spec, or the job that already trains or trained exactly it; (job, created).

    Everything is checked before anything is written: the name, the method and hyperparameters, that the base
    has trainable weights (an ONNX-only base is refused here, not in the worker), and that every item renders
    through the prompt version and has an answer.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise FineTuneError(
            "the name must be 1 to 200 letters, digits, '-', '_' or '.' (it names the resulting fine-tune)",
            field="name",
        )
    job = FineTuneJob(
        name=name,
        base_artifact=base_artifact,
        dataset=dataset,
        prompt_version=prompt_version,
        method=method,
        hyperparameters=dict(hyperparameters or {}),
        seed=seed,
        created_by=created_by if getattr(created_by, "pk", None) else None,
    )
    try:
        job.full_clean(exclude=["spec_hash", "created_by"], validate_constraints=False)
    except ValidationError as exc:
        field, messages = next(iter(exc.message_dict.items()))
        raise FineTuneError("; ".join(messages), field="non_field_errors" if field == "__all__" else field) from None
    training_examples(dataset, prompt_version)
    job.spec_hash = FineTuneJob.compute_spec_hash(
        base_artifact=base_artifact,
        dataset=dataset,
        prompt_version=prompt_version,
        method=job.method,
        hyperparameters=job.hyperparameters,
        seed=seed,
    )
    with transaction.atomic():
        existing = reusable_job(job.spec_hash)
        if existing is not None:
            return existing, False
        if FineTune.objects.filter(name=name).exists():
            raise FineTuneError(f"a fine-tune named {name!r} exists; choose another name", field="name")
        if FineTuneJob.objects.filter(name=name, status__in=FineTuneJob.OPEN).exists():
            raise FineTuneError(f"a job for a fine-tune named {name!r} is already open", field="name")
        try:
            with transaction.atomic():
                job.save()
        except IntegrityError:
            # A concurrent identical request won the open-spec (or open-name) constraint: join its job.
            existing = reusable_job(job.spec_hash)
            if existing is not None:
                return existing, False
            raise FineTuneError(f"a job for a fine-tune named {name!r} is already open", field="name") from None
    return job, True


def reusable_job(spec_hash: str) -> FineTuneJob | None:
    """The open job with this spec, else the newest succeeded one whose result is still registered and on disk."""
    open_job = FineTuneJob.objects.filter(spec_hash=spec_hash, status__in=FineTuneJob.OPEN).first()
    if open_job is not None:
        return open_job
    for job in FineTuneJob.objects.filter(spec_hash=spec_hash, status=Status.SUCCEEDED).select_related(
        "fine_tune__result_artifact"
    )[:5]:
        fine_tune = getattr(job, "fine_tune", None)
        result = fine_tune.result_artifact if fine_tune is not None else None
        if result is not None and Path(result.path, "model.onnx").is_file():
            return job
    return None


def start_job(job: FineTuneJob) -> bool:
    """Queue the job once the surrounding transaction commits; False when there is nothing to run.

    A pending job is (re)queued, which is safe: a second message for a job that is already claimed does nothing.
    So is an orphaned running job (its worker died), which the message lets another worker restart.
    """
    from .tasks import run_fine_tune

    job.refresh_from_db()
    if job.status != Status.PENDING and not job.is_stale():
        return False
    job_id = job.pk
    transaction.on_commit(lambda: run_fine_tune.delay(job_id))
    return True


def cancel_job(job: FineTuneJob) -> bool:
    """Cancel a pending job at once, or ask a running one to stop (its worker sees it within a step).

    False when the job has already finished. An orphaned running job is cancelled at once.
    """
    with transaction.atomic():
        locked = FineTuneJob.objects.select_for_update().get(pk=job.pk)
        if locked.is_finished:
            return False
        locked.cancel_requested = True
        fields = ["cancel_requested"]
        if locked.status == Status.PENDING or locked.is_stale():
            locked.status = Status.CANCELLED
            locked.finished_at = timezone.now()
            fields += ["status", "finished_at"]
            transaction.on_commit(lambda: metrics.FINE_TUNE_JOBS.labels(status="cancelled").inc())
        locked.save(update_fields=fields)
    if locked.status == Status.CANCELLED:
        _remove_job_folders(locked.pk)
    job.refresh_from_db()
    return True


def wait_for(
    job: FineTuneJob,
    *,
    timeout: float,
    poll: float = 1.0,
    report: Callable[[FineTuneJob], None] | None = None,
    alive: Callable[[], bool] | None = None,
) -> FineTuneJob:
    """Poll until the job has finished; `report(job)` whenever its status or step changes."""

    def refresh() -> FineTuneJob:
        job.refresh_from_db()
        return job

    return poll_until_finished(
        refresh,
        progress=lambda j: (j.status, j.steps_done),
        finished=lambda j: j.is_finished,
        timeout=timeout,
        poll=poll,
        report=(lambda j, _: report(j)) if report is not None else None,
        alive=alive,
        on_dead=lambda: FineTuneError("the training worker stopped before the job finished"),
        on_timeout=lambda: FineTuneError(f"fine-tune job {job.pk} not finished after {timeout:.0f}s"),
    )


def price_per_hour(artifact: ModelArtifact, device: str) -> Decimal:
    """Money per device hour: the base artifact's own price, else the setting for the device class."""
    own = Decimal(artifact.price_per_device_hour or 0)
    if own > 0:
        return own
    return Decimal(settings.FULCRUM_TRAIN_PRICE_PER_HOUR.get(device, "0"))


# --- running a job (the Celery task) -------------------------------------------------------------------------------


def run_job(job_id: int) -> str:
    """Claim, train, export and register the job; returns its outcome.

    "skipped" when there was nothing to do (already claimed, finished or gone): that is what a redelivered
    message sees. "superseded" when this worker lost its claim meanwhile. Otherwise the job's final status.
    """
    token = uuid.uuid4().hex[:16]
    job = _claim(job_id, token)
    if job is None:
        return "skipped"
    started = time.monotonic()
    folder = job_folder(job.pk, token)
    try:
        with _heartbeat(job.pk, token):
            outcome = _train_and_register(job, token, folder, started)
    except training.TrainingCancelled:
        outcome = _finish(job_id, token, Status.CANCELLED, "", time.monotonic() - started)
    except _Superseded:
        outcome = "superseded"
    except Exception as exc:
        if isinstance(exc, NotTrainable):
            message = "; ".join(exc.messages)
        elif isinstance(exc, training.TrainingError | FineTuneError | convert.ConversionError):
            message = str(exc)  # says what is wrong; no traceback needed
        else:
            log.exception("fine-tune job %s failed", job_id)
            message = f"{type(exc).__name__}: {exc}"
        log.warning("fine-tune job %s failed: %s", job_id, message)
        outcome = _finish(job_id, token, Status.FAILED, message, time.monotonic() - started)
    if outcome != Status.SUCCEEDED:
        shutil.rmtree(folder, ignore_errors=True)
    return str(outcome)


def _train_and_register(job: FineTuneJob, token: str, folder: Path, started: float) -> str:
    """Train into `folder`, export, register; the final status (exceptions are run_job's to record)."""
    job_id = job.pk
    training.require_training_libraries()
    source = job.base_artifact.trainable_source()
    examples = training_examples(job.dataset, job.prompt_version)
    device = training.pick_device(settings.FULCRUM_TRAIN_DEVICE)
    progress = _Progress(job.pk, token, device)
    result = training.train(
        source,
        Path(job.base_artifact.path),
        examples,
        method=job.method,
        hyperparameters=job.hyperparameters,
        seed=job.seed,
        out_dir=folder / "hf",
        on_step=progress,
        device=device,
        threads=settings.FULCRUM_TRAIN_THREADS,
        log=lambda message: log.info("fine-tune job %s: %s", job_id, message),
    )
    progress.finish(result)
    progress.check()  # a cancel that came during the last step or the save
    log.info("fine-tune job %s: trained in %.1fs; exporting ONNX", job_id, result.training_seconds)
    built = convert.convert(
        folder / "hf", folder / "onnx", progress=lambda m: log.info("fine-tune job %s: %s", job_id, m)
    )
    return _register(job.pk, token, result, built, time.monotonic() - started)


@contextlib.contextmanager
def _heartbeat(job_id: int, token: str) -> Iterator[None]:
    """Renew the job's heartbeat from a background thread while the block runs (it stops with the block)."""
    stop = threading.Event()
    interval = min(HEARTBEAT_SECONDS, settings.FULCRUM_TRAIN_STALE_SECONDS / 4)

    def beat() -> None:
        try:
            while not stop.wait(interval):
                FineTuneJob.objects.filter(pk=job_id, attempt=token, status=Status.RUNNING).update(
                    heartbeat_at=timezone.now()
                )
        except Exception:  # a missed heartbeat only makes the job look older; training goes on
            log.warning("fine-tune job %s: heartbeat failed", job_id, exc_info=True)
        finally:
            connection.close()  # this thread's own database connection

    thread = threading.Thread(target=beat, name=f"fine-tune-{job_id}-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def job_folder(job_id: int, token: str) -> Path:
    """Where one claim of a job keeps its merged weights (hf/) and its ONNX export (onnx/)."""
    return Path(settings.FINE_TUNES_DIR) / f"job-{job_id}-{token}"


def _remove_job_folders(job_id: int, keep: Path | None = None) -> None:
    root = Path(settings.FINE_TUNES_DIR)
    if not root.is_dir():
        return
    for folder in root.glob(f"job-{job_id}-*"):
        if folder != keep:
            shutil.rmtree(folder, ignore_errors=True)


def _claim(job_id: int, token: str) -> FineTuneJob | None:
    with transaction.atomic():
        job = FineTuneJob.objects.select_for_update().filter(pk=job_id).first()
        if job is None:
            log.warning("fine-tune job %s does not exist; nothing to do", job_id)
            return None
        takeover = job.is_stale()
        if job.status != Status.PENDING and not takeover:
            log.info("fine-tune job %s is %s; nothing to do", job_id, job.status)
            return None
        if job.cancel_requested:
            job.status, job.finished_at = Status.CANCELLED, timezone.now()
            job.save(update_fields=["status", "finished_at"])
            transaction.on_commit(lambda: metrics.FINE_TUNE_JOBS.labels(status="cancelled").inc())
            transaction.on_commit(lambda: _remove_job_folders(job_id))  # a dead claim's partial files
            return None
        if takeover:
            log.warning("fine-tune job %s: worker %s stopped reporting; restarting the job", job_id, job.worker)
        now = timezone.now()
        job.status, job.attempt = Status.RUNNING, token
        job.worker = f"{socket.gethostname()}:{os.getpid()}"
        job.started_at = job.heartbeat_at = now
        job.steps_done, job.loss_curve, job.error = 0, [], ""
        job.save()
    if takeover:
        _remove_job_folders(job_id, keep=job_folder(job_id, token))  # the dead claim's partial files
    return FineTuneJob.objects.select_related("base_artifact", "dataset", "prompt_version").get(pk=job_id)


class _Progress:
    """The per-step callback: keeps the loss curve, writes progress and a heartbeat, reads the cancel flag."""

    def __init__(self, job_id: int, token: str, device: str) -> None:
        self.job_id, self.token, self.device = job_id, token, device
        self.curve: list[list[float]] = []
        self.written_at = 0.0
        self.stride = 1

    def __call__(self, step: int, total: int, loss: float) -> None:
        self.stride = max(1, -(-total // LOSS_CURVE_POINTS))
        if step == 1 or step == total or step % self.stride == 0:
            self.curve.append([step, round(loss, 5)])
        if step == total or time.monotonic() - self.written_at >= PROGRESS_EVERY_SECONDS:
            self.write(steps_done=step, steps_total=total)
        self.check()

    def write(self, **fields: Any) -> None:
        updated = FineTuneJob.objects.filter(pk=self.job_id, attempt=self.token, status=Status.RUNNING).update(
            loss_curve=self.curve, device=self.device, heartbeat_at=timezone.now(), **fields
        )
        self.written_at = time.monotonic()
        if not updated:
            raise _Superseded()

    def finish(self, result: training.TrainResult) -> None:
        self.write(
            initial_loss=result.initial_loss,
            final_loss=result.final_loss,
            training_seconds=result.training_seconds,
            steps_done=result.steps,
        )

    def check(self) -> None:
        row = FineTuneJob.objects.filter(pk=self.job_id).values_list("attempt", "status", "cancel_requested").first()
        if row is None or row[0] != self.token or row[1] != Status.RUNNING:
            raise _Superseded()
        if row[2]:
            raise training.TrainingCancelled()


def _finish(job_id: int, token: str, status: str, error: str, worker_seconds: float, device: str = "") -> str:
    """Record a failed or cancelled end, unless this worker no longer holds the claim."""
    with transaction.atomic():
        job = FineTuneJob.objects.select_for_update().get(pk=job_id)
        if job.attempt != token or job.status != Status.RUNNING:
            return "superseded"
        job.status, job.error = status, error[:5000]
        job.finished_at = timezone.now()
        job.worker_seconds = round(worker_seconds, 3)
        job.device = device = job.device or device  # the progress writes name it once training started
        job.save(update_fields=["status", "error", "finished_at", "worker_seconds", "device"])
        transaction.on_commit(lambda: _count(status, device, worker_seconds, None))
    return status


def _count(status: str, device: str, worker_seconds: float, training_seconds: float | None) -> None:
    metrics.FINE_TUNE_JOBS.labels(status=status).inc()
    metrics.FINE_TUNE_WORKER_SECONDS.labels(device=device or "unknown").inc(max(worker_seconds, 0.0))
    if training_seconds is not None:
        metrics.FINE_TUNE_TRAINING_SECONDS.labels(device=device or "unknown").observe(training_seconds)


def _register(
    job_id: int, token: str, result: training.TrainResult, built: convert.ConvertedArtifact, worker_seconds: float
) -> str:
    """The result artifact and its FineTune, and the job's success, in one transaction; or nothing at all."""
    try:
        with transaction.atomic():
            job = FineTuneJob.objects.select_for_update().select_related("base_artifact", "dataset").get(pk=job_id)
            if job.attempt != token or job.status != Status.RUNNING:
                raise _Superseded()
            if job.cancel_requested:
                raise training.TrainingCancelled()
            base = job.base_artifact
            hf_dir = built.folder.parent / "hf"
            price = price_per_hour(base, result.device)
            cost = (price * Decimal(str(round(worker_seconds, 3))) / 3600).quantize(Decimal("0.000001"))
            artifact, created = ModelArtifact.objects.get_or_create(
                sha256=built.sha256,
                defaults={
                    "name": job.name,
                    "path": str(built.folder),
                    "parameter_count": built.parameter_count or base.parameter_count,
                    "dtype": built.dtype,
                    "size_bytes": built.size_bytes,
                    # Provenance: the merged Hugging Face folder it was exported from, which stays on disk as the
                    # trainable source of fine-tunes of this fine-tune.
                    "source_kind": ModelArtifact.SourceKind.HF,
                    "source_path": str(hf_dir),
                    "source_sha256": convert.source_sha256(hf_dir),
                    "chat_template": built.chat_template,
                    "parent": base,
                    "price_per_1k_tokens": base.price_per_1k_tokens,
                    "price_per_device_hour": base.price_per_device_hour,
                    "metadata": {**built.metadata, "fine_tune_job": job.pk, "method": job.method},
                },
            )
            if not created:
                log.info("fine-tune job %s: the same weights are registered as artifact %s", job_id, artifact.pk)
            FineTune.objects.create(
                name=job.name,
                base_artifact=base,
                result_artifact=artifact,
                job=job,
                training_dataset=job.dataset,
                training_dataset_hash=job.dataset.content_hash,
                method=job.method,
                hyperparameters=job.hyperparameters,
                seed=job.seed,
                device=result.device,
                final_loss=result.final_loss,
                training_seconds=result.training_seconds,
                worker_seconds=round(worker_seconds, 3),
                cost=cost,
            )
            job.status = Status.SUCCEEDED
            job.finished_at = timezone.now()
            job.worker_seconds = round(worker_seconds, 3)
            job.save(update_fields=["status", "finished_at", "worker_seconds"])
            transaction.on_commit(
                lambda: _count(Status.SUCCEEDED, result.device, worker_seconds, result.training_seconds)
            )
    except training.TrainingCancelled:
        return _finish(job_id, token, Status.CANCELLED, "", worker_seconds, result.device)
    except IntegrityError as exc:
        # FineTune names are unique: one registered by hand (or by another job) after this job was created.
        return _finish(
            job_id,
            token,
            Status.FAILED,
            f"registering the result failed (a fine-tune named like this job was registered meanwhile?): {exc}",
            worker_seconds,
            result.device,
        )
    if not created:
        shutil.rmtree(built.folder.parent, ignore_errors=True)  # the registered artifact's own folders serve
    log.info("fine-tune job %s: registered artifact %s (%s)", job_id, artifact.pk, artifact.sha256[:12])
    return str(Status.SUCCEEDED)
