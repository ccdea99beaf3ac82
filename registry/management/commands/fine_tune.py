"""Fine-tune jobs from the shell: start one (optionally waiting for it), show its status, cancel it, list them.

    manage.py fine_tune start answer-format --base 1 --dataset answer_format --prompt qa --version 1 \\
        --method lora --set steps=40 --set batch_size=8 --set learning_rate=0.001 --wait
    manage.py fine_tune status 3 [--json]
    manage.py fine_tune cancel 3
    manage.py fine_tune list [--status running]

Jobs are trained by a worker consuming the training queue (`manage.py worker --train`). An identical request
(same base, data, prompt version, method, hyperparameters and seed) returns the job that trains or trained it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from registry import access
from registry.models import Dataset, FineTuneJob, ModelArtifact, Prompt, PromptLabel


def _parse_value(text: str) -> Any:
    """A --set value: JSON when it parses (numbers, lists), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _hyperparameters(options: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if options["hyperparameters"]:
        try:
            out = json.loads(options["hyperparameters"])
        except json.JSONDecodeError as exc:
            raise CommandError(f"--hyperparameters is not valid JSON: {exc.msg}") from None
        if not isinstance(out, dict):
            raise CommandError("--hyperparameters must be a JSON object")
    for item in options["set"]:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandError(f"--set takes KEY=VALUE, not {item!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def describe(job: FineTuneJob) -> str:
    """One line about a job: status, progress, losses, time, device, result."""
    parts = [f"job {job.pk} {job.name}: {job.status}"]
    if job.steps_total:
        parts.append(f"step {job.steps_done}/{job.steps_total}")
    if job.loss_curve:
        first, last = job.loss_curve[0], job.loss_curve[-1]
        parts.append(f"batch loss {first[1]:.3f} (step {first[0]}) -> {last[1]:.3f} (step {last[0]})")
    if job.initial_loss is not None and job.final_loss is not None:
        parts.append(f"loss on training examples {job.initial_loss:.3f} -> {job.final_loss:.3f}")
    if job.training_seconds:
        parts.append(f"{job.training_seconds:.1f} s training, {job.worker_seconds:.1f} s of worker time")
    if job.device:
        parts.append(f"on {job.device}")
    fine_tune = getattr(job, "fine_tune", None)
    if fine_tune is not None:
        parts.append(f"result: fine-tune {fine_tune.name}, artifact {fine_tune.result_artifact_id}")
    if job.cancel_requested and not job.is_finished:
        parts.append("cancel requested")
    if job.error:
        parts.append(f"error: {job.error}")
    return "; ".join(parts)


class Command(BaseCommand):
    help = "Fine-tune jobs: start one (trained by a worker on the training queue), show, cancel or list them."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="{start,status,cancel,list}")
        start = actions.add_parser("start", help="create and queue a job (or join the identical one)")
        start.add_argument("name", help="the name the resulting fine-tune gets")
        start.add_argument("--base", type=int, required=True, help="id of the base artifact")
        start.add_argument("--dataset", required=True, help="training dataset name (the newest of that name)")
        start.add_argument("--prompt", required=True, help="prompt that renders each item's inputs")
        which = start.add_mutually_exclusive_group(required=True)
        which.add_argument("--version", type=int, help="prompt version number")
        which.add_argument("--label", help="prompt label, resolved now")
        start.add_argument("--method", default="lora", choices=FineTuneJob.Method.values)
        start.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter")
        start.add_argument("--hyperparameters", default="", help="hyperparameters as a JSON object")
        start.add_argument("--seed", type=int, default=0)
        start.add_argument("--no-start", action="store_true", help="create it pending; do not queue it")
        start.add_argument("--wait", action="store_true", help="wait for the job to finish, showing progress")
        start.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds to wait with --wait")
        status = actions.add_parser("status", help="show a job")
        status.add_argument("job", type=int)
        status.add_argument("--json", action="store_true", help="everything, as JSON (loss curve included)")
        cancel = actions.add_parser("cancel", help="cancel a pending job, or stop a running one within a step")
        cancel.add_argument("job", type=int)
        listing = actions.add_parser("list", help="list jobs, newest first")
        listing.add_argument("--status", choices=FineTuneJob.Status.values)
        listing.add_argument("--limit", type=int, default=50)

    def handle(self, *args: Any, **options: Any) -> None:
        getattr(self, f"do_{options['action']}")(options)

    # -- actions -------------------------------------------------------------------------------------------------------

    def do_start(self, options: dict[str, Any]) -> None:
        from workers import finetuning

        base = ModelArtifact.objects.filter(pk=options["base"]).first()
        if base is None:
            raise CommandError(f"no artifact with id {options['base']}")
        dataset = Dataset.objects.filter(name=options["dataset"]).order_by("-created_at").first()
        if dataset is None:
            raise CommandError(f"no dataset named {options['dataset']!r}")
        prompt = Prompt.objects.filter(name=options["prompt"]).first()
        if prompt is None:
            raise CommandError(f"no prompt named {options['prompt']!r}")
        if options["version"] is not None:
            version = prompt.versions.filter(number=options["version"]).first()
            if version is None:
                raise CommandError(f"prompt {prompt.name!r} has no version {options['version']}")
        else:
            try:
                version = prompt.version_for_label(options["label"])
            except PromptLabel.DoesNotExist as exc:
                raise CommandError(str(exc)) from None
        try:
            with transaction.atomic():
                job, created = finetuning.create_job(
                    name=options["name"],
                    base_artifact=base,
                    dataset=dataset,
                    prompt_version=version,
                    method=options["method"],
                    hyperparameters=_hyperparameters(options),
                    seed=options["seed"],
                )
                queued = False if options["no_start"] else finetuning.start_job(job)
                if created:
                    access.record(access.Actor(via="cli"), "finetunejob.create", job, spec_hash=job.spec_hash)
        except finetuning.FineTuneError as exc:
            raise CommandError(f"{exc.field}: {exc}" if exc.field != "non_field_errors" else str(exc)) from None
        if created:
            self.stderr.write(f"created job {job.pk}" + (" and queued it for a training worker" if queued else ""))
        else:
            self.stderr.write(f"an identical fine-tune is {job.status} as job {job.pk}: reused, not trained again")
        if options["wait"]:
            try:
                job = finetuning.wait_for(job, timeout=options["timeout"], report=self._progress)
            except finetuning.FineTuneError as exc:
                raise CommandError(str(exc)) from None
            finally:
                self.stderr.write("")
        self.stdout.write(describe(job))
        if job.status in (FineTuneJob.Status.FAILED, FineTuneJob.Status.CANCELLED):
            raise CommandError(f"job {job.pk} {job.status}")

    def do_status(self, options: dict[str, Any]) -> None:
        from registry.api.serializers import FineTuneJobSerializer

        job = self._job(options["job"])
        if options["json"]:
            self.stdout.write(json.dumps(FineTuneJobSerializer(job).data, indent=2, default=str))
        else:
            self.stdout.write(describe(job))

    def do_cancel(self, options: dict[str, Any]) -> None:
        from workers import finetuning

        job = self._job(options["job"])
        with transaction.atomic():
            if not finetuning.cancel_job(job):
                raise CommandError(f"job {job.pk} is already {job.status}")
            access.record(access.Actor(via="cli"), "finetunejob.cancel", job)
        job.refresh_from_db()
        done = "cancelled" if job.status == FineTuneJob.Status.CANCELLED else "asked to stop; it will within a step"
        self.stdout.write(f"job {job.pk} {done}")

    def do_list(self, options: dict[str, Any]) -> None:
        jobs = FineTuneJob.objects.select_related("base_artifact", "dataset").order_by("-created_at", "-id")
        if options["status"]:
            jobs = jobs.filter(status=options["status"])
        for job in jobs[: options["limit"]]:
            self.stdout.write(
                f"{job.pk:>5} {job.name[:30]:<30} {job.status:<10} {job.method:<5} "
                f"{job.steps_done:>6}/{job.steps_total:<6} {job.base_artifact.name[:24]:<24} {job.dataset.name}"
            )

    # -- helpers -------------------------------------------------------------------------------------------------------

    def _job(self, pk: int) -> FineTuneJob:
        job = FineTuneJob.objects.select_related("fine_tune", "prompt_version__prompt").filter(pk=pk).first()
        if job is None:
            raise CommandError(f"no fine-tune job {pk}")
        return job

    def _progress(self, job: FineTuneJob) -> None:
        loss = f", batch loss {job.loss_curve[-1][1]:.3f}" if job.loss_curve else ""
        line = f"job {job.pk}: {job.status}, step {job.steps_done}/{job.steps_total or '?'}{loss}"
        if sys.stderr.isatty():
            self.stderr.write(f"\r{line}", ending="")
        else:
            self.stderr.write(line)
        self.stderr.flush()
