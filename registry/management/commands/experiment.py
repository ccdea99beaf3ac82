"""Lever experiments from the command line: create and run one (with a progress bar), print its report, list them.

    manage.py experiment run arith --dataset arithmetic --baseline naive-greedy \\
        --variant engineered-greedy --variant engineered-vote5:engineered-greedy
    manage.py experiment report arith [--json]
    manage.py experiment list

A variant is STACK, STACK:REFERENCE (compared with an earlier arm instead of the baseline) or NAME=STACK[:REFERENCE].
Runs are evaluated by the workers (`manage.py worker`); finished runs with the same content are reused.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from registry import experiments
from registry.models import Dataset, Experiment, Stack


def _dataset(name: str) -> Dataset:
    dataset = Dataset.objects.filter(name=name).order_by("-created_at").first()
    if dataset is None:
        raise CommandError(f"no dataset named {name!r}")
    return dataset


def _stack(name: str) -> Stack:
    try:
        return Stack.objects.get(name=name)
    except Stack.DoesNotExist:
        raise CommandError(f"no stack named {name!r}") from None


def parse_variant(spec: str) -> experiments.Variant:
    name, _, rest = spec.rpartition("=") if "=" in spec else ("", "", spec)
    stack, _, reference = rest.partition(":")
    return experiments.Variant(stack=_stack(stack), name=name, reference=reference)


class Command(BaseCommand):
    help = "Lever experiments: run one (reusing finished runs) and print which layer moved the metric, at what cost."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        run = sub.add_parser("run", help="create (unless it exists) and start an experiment, wait, print the report")
        run.add_argument("name")
        run.add_argument("--dataset")
        run.add_argument("--baseline", help="baseline stack")
        run.add_argument("--variant", action="append", default=[], help="STACK, STACK:REFERENCE or NAME=STACK[:REF]")
        run.add_argument("--metric", default=Experiment.Metric.ACCURACY, choices=Experiment.Metric.values)
        run.add_argument("--confidence", type=float, default=0.95)
        run.add_argument("--seed", type=int, default=0)
        run.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the runs")
        run.add_argument("--no-wait", action="store_true", help="start the runs and return")
        run.add_argument("--json", action="store_true", help="print the report as JSON")
        report = sub.add_parser("report", help="print an experiment's report")
        report.add_argument("name")
        report.add_argument("--json", action="store_true")
        sub.add_parser("list", help="list experiments")

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        if action == "list":
            for e in Experiment.objects.select_related("dataset"):
                self.stdout.write(
                    f"{e.name:<30} {e.status:<10} {e.metric:<22} {e.dataset.name} ({e.arms.count()} arms)"
                )
            return
        if action == "report":
            experiment = self._get(options["name"])
            self._print(experiments.refresh_experiment(experiment.pk), as_json=options["json"])
            return
        found = Experiment.objects.filter(name=options["name"]).first()
        if found is not None:
            experiment = found
        else:
            if not (options["dataset"] and options["baseline"] and options["variant"]):
                raise CommandError("a new experiment needs --dataset, --baseline and at least one --variant")
            try:
                experiment = experiments.create_experiment(
                    options["name"],
                    dataset=_dataset(options["dataset"]),
                    baseline=_stack(options["baseline"]),
                    variants=[parse_variant(v) for v in options["variant"]],
                    metric=options["metric"],
                    confidence=options["confidence"],
                    seed=options["seed"],
                )
            except experiments.ExperimentError as exc:
                raise CommandError(str(exc)) from None
        reused, queued = experiments.start_experiment(experiment)
        self.stderr.write(f"experiment {experiment.name}: {reused} run(s) reused, {queued} queued")
        if options["no_wait"]:
            return
        try:
            experiment = experiments.wait_for(experiment, timeout=options["timeout"], report=self._progress)
        except experiments.ExperimentError as exc:
            raise CommandError(str(exc)) from None
        finally:
            self.stderr.write("")
        self._print(experiment, as_json=options["json"])

    def _get(self, name: str) -> Experiment:
        experiment = Experiment.objects.filter(name=name).first()
        if experiment is None:
            raise CommandError(f"no experiment named {name!r}")
        return experiment

    def _progress(self, done: int, total: int, runs_done: int, runs: int) -> None:
        bar = experiments.progress_bar(done, total, runs_done, runs)
        if sys.stderr.isatty():
            self.stderr.write(f"\r{bar}", ending="")
        else:
            self.stderr.write(bar)
        self.stderr.flush()

    def _print(self, experiment: Experiment, *, as_json: bool) -> None:
        if experiment.status == Experiment.Status.FAILED:
            raise CommandError(f"experiment {experiment.name} failed: {experiment.error}")
        if not experiment.report:
            raise CommandError(f"experiment {experiment.name} is {experiment.status}: no report yet")
        if as_json:
            self.stdout.write(json.dumps(experiment.report, indent=2, sort_keys=True))
        else:
            self.stdout.write(experiments.format_report(experiment.report))
