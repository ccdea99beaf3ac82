"""Scheduled evaluations: create one (kept in step with a django-celery-beat PeriodicTask), list, fire, regressions.

    manage.py schedule create nightly --stack engineered-greedy --dataset arithmetic --every 86400 [--on-label-move]
    manage.py schedule create nightly --stack engineered-greedy --dataset arithmetic --crontab "0 3 * * *"
    manage.py schedule list
    manage.py schedule fire nightly
    manage.py schedule regressions

`manage.py beat` fires them; `manage.py worker` evaluates.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from registry import experiments
from registry.models import Dataset, EvaluationSchedule, Experiment, ScheduledRun, Stack


class Command(BaseCommand):
    help = "Scheduled evaluations of a stack on a dataset, with regression detection against the previous run."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create")
        create.add_argument("name")
        create.add_argument("--stack", required=True)
        create.add_argument("--dataset", required=True)
        create.add_argument("--every", type=int, default=None, help="seconds between runs")
        create.add_argument("--crontab", default="", help="'minute hour day-of-month month day-of-week' (UTC)")
        create.add_argument("--on-label-move", action="store_true", help="also run when the stack's label moves")
        create.add_argument("--metric", default=Experiment.Metric.ACCURACY, choices=Experiment.Metric.values)
        create.add_argument("--alpha", type=float, default=0.05)
        create.add_argument("--tolerance", type=float, default=0.0)
        sub.add_parser("list")
        fire = sub.add_parser("fire", help="queue the schedule's next run now")
        fire.add_argument("name")
        sub.add_parser("regressions")

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        if action == "create":
            dataset = Dataset.objects.filter(name=options["dataset"]).order_by("-created_at").first()
            stack = Stack.objects.filter(name=options["stack"]).first()
            if dataset is None or stack is None:
                raise CommandError("unknown stack or dataset")
            try:
                schedule = experiments.create_schedule(
                    options["name"],
                    stack=stack,
                    dataset=dataset,
                    every_seconds=options["every"],
                    crontab=options["crontab"],
                    on_label_move=options["on_label_move"],
                    metric=options["metric"],
                    alpha=options["alpha"],
                    tolerance=options["tolerance"],
                )
            except ValidationError as exc:
                raise CommandError("; ".join(exc.messages)) from None
            self.stdout.write(f"created {schedule}")
        elif action == "list":
            for s in EvaluationSchedule.objects.select_related("stack", "dataset"):
                when = f"every {s.every_seconds}s" if s.every_seconds else (s.crontab or "label moves only")
                last = s.scheduled_runs.select_related("run").first()
                state = f"last run {last.run_id} {last.run.status}" if last else "never ran"
                flag = " REGRESSION" if last and last.regression else ""
                self.stdout.write(f"{s.name:<24} {s.stack.name:<20} {s.dataset.name:<14} {when:<20} {state}{flag}")
        elif action == "fire":
            found = EvaluationSchedule.objects.filter(name=options["name"]).first()
            if found is None:
                raise CommandError(f"no schedule named {options['name']!r}")
            run = experiments.fire_schedule(found.pk, ScheduledRun.Trigger.MANUAL)
            self.stdout.write(f"queued run {run.pk}" if run else "not fired: disabled, or its last run is still open")
        else:
            for r in experiments.regressions():
                c = r.comparison
                self.stdout.write(
                    f"{r.created_at:%Y-%m-%d %H:%M} {r.schedule.name}: run {r.run_id} vs {r.previous_id} "
                    f"{c.get('metric')} {c.get('delta'):+.3f} CI {c.get('ci')} p={c.get('p_value')}"
                )
