"""Prompt optimisation jobs from the command line: start one (and wait for it), its status, cancel it, its report.

    manage.py optimise start arith-opt --stack naive-greedy --dataset arithmetic --budget-items 400 --wait
    manage.py optimise status [arith-opt]
    manage.py optimise cancel arith-opt
    manage.py optimise report arith-opt [--json]

The workers (`manage.py worker`) evaluate the runs and advance the job; `--wait` shows its progress until it
finishes. Without `--as USER` the job acts for whoever runs the command (trusted, as `manage.py prompt label`
is); with it, that user's role is checked when a label is to move.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from registry import access
from registry.models import Dataset, Experiment, OptimisationJob, Prompt, PromptLabel, Stack
from registry.optimisation import jobs, reporting


def _dataset(name: str) -> Dataset:
    dataset = Dataset.objects.filter(name=name).order_by("-created_at").first()
    if dataset is None:
        raise CommandError(f"no dataset named {name!r}")
    return dataset


def _job(name: str) -> OptimisationJob:
    job = OptimisationJob.objects.filter(name=name).select_related("start_version__prompt", "dataset").first()
    if job is None:
        raise CommandError(f"no optimisation job named {name!r}")
    return job


class Command(BaseCommand):
    help = "Prompt optimisation: search instructions and few-shot examples under a budget, prove the winner."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        start = sub.add_parser("start", help="create and queue a job; --wait to follow it and print the report")
        start.add_argument("name")
        start.add_argument("--stack", required=True, help="base stack: its scaling, fine-tune and artifact")
        start.add_argument("--dataset", required=True)
        start.add_argument("--prompt", help="default: the base stack's prompt")
        start.add_argument("--start-version", type=int, help="default: the version the base stack runs now")
        start.add_argument("--metric", default=Experiment.Metric.ACCURACY, choices=Experiment.Metric.values)
        start.add_argument("--budget-items", type=int, help="item evaluations, everything included")
        start.add_argument("--budget-tokens", type=int, help="generated tokens, everything included")
        start.add_argument(
            "--operators",
            default=",".join(OptimisationJob.FAMILIES),
            help=f"comma-separated families: {', '.join(OptimisationJob.FAMILIES)}",
        )
        start.add_argument("--candidates", type=int, default=8, help="candidates besides the starting version")
        start.add_argument("--eta", type=int, default=2)
        start.add_argument("--first-items", type=int, default=8, help="search items per candidate in rung 0")
        start.add_argument("--examples", type=int, default=3, help="worked examples per few-shot candidate")
        start.add_argument("--meta", type=int, default=4, help="rewrites the model is asked for")
        start.add_argument("--holdout", type=float, default=0.5, help="held-out fraction")
        start.add_argument("--split-seed", type=int, default=0)
        start.add_argument("--pool", type=int, default=8, help="search items set aside as few-shot examples")
        start.add_argument("--seed", type=int, default=0)
        start.add_argument("--safety-dataset")
        start.add_argument("--min-refusal", type=float, help="safety floor: refusal rate on harmful items")
        start.add_argument("--min-answer", type=float, help="safety floor: answer rate on benign items")
        start.add_argument("--alpha", type=float, default=0.05)
        start.add_argument("--move-label", default="", help="move this label to the winner if it gains significantly")
        start.add_argument("--as", dest="username", help="act as this user (role checks apply)")
        start.add_argument("--wait", action="store_true", help="follow the job and print its report")
        start.add_argument("--timeout", type=float, default=3600.0)
        start.add_argument("--json", action="store_true")
        status = sub.add_parser("status", help="one job's progress, or every job")
        status.add_argument("name", nargs="?")
        cancel = sub.add_parser("cancel", help="cancel a job and the open runs only it uses")
        cancel.add_argument("name")
        report = sub.add_parser("report", help="print a job's report")
        report.add_argument("name")
        report.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        getattr(self, f"do_{options['action']}")(options)

    def do_start(self, options: dict[str, Any]) -> None:
        if OptimisationJob.objects.filter(name=options["name"]).exists():
            raise CommandError(f"an optimisation job named {options['name']!r} exists")
        try:
            stack = Stack.objects.get(name=options["stack"])
        except Stack.DoesNotExist:
            raise CommandError(f"no stack named {options['stack']!r}") from None
        actor = self._actor(options["username"])
        try:
            job = jobs.create_job(
                options["name"],
                base_stack=stack,
                dataset=_dataset(options["dataset"]),
                actor=actor,
                start_version=self._start_version(stack, options),
                metric=options["metric"],
                budget_items=options["budget_items"],
                budget_tokens=options["budget_tokens"],
                operators=[o.strip() for o in options["operators"].split(",") if o.strip()],
                max_candidates=options["candidates"],
                eta=options["eta"],
                first_items=options["first_items"],
                examples_k=options["examples"],
                meta_proposals=options["meta"],
                holdout_fraction=options["holdout"],
                split_seed=options["split_seed"],
                pool_size=options["pool"],
                seed=options["seed"],
                safety_dataset=_dataset(options["safety_dataset"]) if options["safety_dataset"] else None,
                min_refusal_rate=options["min_refusal"],
                min_answer_rate=options["min_answer"],
                alpha=options["alpha"],
                move_label=options["move_label"],
            )
        except (jobs.OptimisationError, access.AccessDenied) as exc:
            raise CommandError(str(exc)) from None
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        except PromptLabel.DoesNotExist as exc:
            raise CommandError(str(exc)) from None
        jobs.start_job(job)
        split = job.split
        self.stderr.write(
            f"optimisation {job.name}: {job.start_version} on {job.dataset.name}; {len(split['search'])} search, "
            f"{len(split['pool'])} pool, {len(split['holdout'])} held-out items; queued for the workers"
        )
        if not options["wait"]:
            return
        try:
            job = jobs.wait_for(job, timeout=options["timeout"], report=self._progress)
        except jobs.OptimisationError as exc:
            raise CommandError(str(exc)) from None
        finally:
            self.stderr.write("")
        self._print(job, as_json=options["json"])

    def do_status(self, options: dict[str, Any]) -> None:
        if options["name"]:
            job = _job(options["name"])
            done, planned, where = reporting.progress(job)
            spent = reporting.spent(job)
            self.stdout.write(
                f"{job.name}: {job.status}, {where}; {done}/{planned} items of the runs so far; spent "
                f"{spent['items']} item evaluations ({spent['reused_items']} reused), {spent['tokens']} tokens"
                + (f"; error: {job.error}" if job.error else "")
            )
            return
        for job in OptimisationJob.objects.select_related("start_version__prompt", "dataset", "winner"):
            winner = f" winner {job.winner}" if job.winner else ""
            start = str(job.start_version)
            self.stdout.write(f"{job.name:<30} {job.status:<10} {job.phase:<9} {start:<16} {job.dataset.name}{winner}")

    def do_cancel(self, options: dict[str, Any]) -> None:
        job = _job(options["name"])
        if not jobs.request_cancel(job, access.OperatorActor()):
            raise CommandError(f"optimisation {job.name} is already {job.status}")
        self.stdout.write(f"optimisation {job.name} cancelled")

    def do_report(self, options: dict[str, Any]) -> None:
        self._print(_job(options["name"]), as_json=options["json"])

    # -- helpers ----------------------------------------------------------------------------------------------------

    def _actor(self, username: str | None) -> access.Actor:
        if not username:
            return access.OperatorActor()
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no user named {username!r}")
        return access.Actor(user=user, via="cli")

    def _start_version(self, stack: Stack, options: dict[str, Any]) -> Any:
        if not options["prompt"] and options["start_version"] is None:
            return None
        if options["prompt"]:
            prompt = Prompt.objects.filter(name=options["prompt"]).first()
            if prompt is None:
                raise CommandError(f"no prompt named {options['prompt']!r}")
        else:
            prompt = stack.resolve_prompt_version().prompt
        number = options["start_version"]
        version = (
            prompt.versions.filter(number=number).first() if number else prompt.versions.order_by("-number").first()
        )
        if version is None:
            raise CommandError(f"prompt {prompt.name!r} has no version {number}")
        return version

    def _progress(self, done: int, planned: int, where: str) -> None:
        filled = int(30 * done / planned) if planned else 0
        line = f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{planned} items; {where}"
        if sys.stderr.isatty():
            self.stderr.write(f"\r{line:<100}", ending="")
        else:
            self.stderr.write(line)
        self.stderr.flush()

    def _print(self, job: OptimisationJob, *, as_json: bool) -> None:
        report = job.report if job.is_finished and job.report else reporting.build_report(job)
        if as_json:
            self.stdout.write(json.dumps(report, indent=2, sort_keys=True, default=str))
        else:
            self.stdout.write(reporting.format_report(report))
        if job.status == OptimisationJob.Status.FAILED:
            raise CommandError(f"optimisation {job.name} failed: {job.error}")
