"""/api/experiments/, /api/schedules/, /api/regressions/: lever reports and scheduled-evaluation results, read-only.

Reports are the JSON that registry/experiments.py stores on each experiment once its runs have finished.
"""

from __future__ import annotations

from typing import Any

from django.shortcuts import get_object_or_404
from django.urls import path
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from registry import experiments
from registry.models import EvaluationSchedule, Experiment, ScheduledRun


def _experiment(e: Experiment) -> dict[str, Any]:
    return {
        "name": e.name,
        "dataset": e.dataset.name,
        "metric": e.metric,
        "status": e.status,
        "error": e.error,
        "arms": [
            {"name": a.name, "layer": a.layer, "stack": a.stack.name, "run": a.run_id, "reused": a.reused}
            for a in e.arms.select_related("stack").order_by("position")
        ],
        "created_at": e.created_at,
        "finished_at": e.finished_at,
    }


def _scheduled(r: ScheduledRun) -> dict[str, Any]:
    return {
        "schedule": r.schedule.name,
        "run": r.run_id,
        "run_status": r.run.status,
        "previous_run": r.previous_id,
        "trigger": r.trigger,
        "compared": r.compared,
        "regression": r.regression,
        "comparison": r.comparison,
        "created_at": r.created_at,
    }


@extend_schema(exclude=True)
class ExperimentListView(APIView):
    def get(self, request: Request) -> Response:
        rows = Experiment.objects.select_related("dataset")[:200]
        return Response({"results": [_experiment(e) for e in rows]})


@extend_schema(exclude=True)
class ExperimentReportView(APIView):
    def get(self, request: Request, name: str) -> Response:
        experiment = get_object_or_404(Experiment.objects.select_related("dataset"), name=name)
        experiment = experiments.refresh_experiment(experiment.pk)
        return Response({**_experiment(experiment), "report": experiment.report or None})


@extend_schema(exclude=True)
class ScheduleListView(APIView):
    def get(self, request: Request) -> Response:
        out = []
        for s in EvaluationSchedule.objects.select_related("stack", "dataset"):
            runs = s.scheduled_runs.select_related("schedule", "run")[:20]
            out.append(
                {
                    "name": s.name,
                    "stack": s.stack.name,
                    "dataset": s.dataset.name,
                    "metric": s.metric,
                    "every_seconds": s.every_seconds,
                    "crontab": s.crontab,
                    "on_label_move": s.on_label_move,
                    "enabled": s.enabled,
                    "alpha": s.alpha,
                    "runs": [_scheduled(r) for r in runs],
                }
            )
        return Response({"results": out})


@extend_schema(exclude=True)
class RegressionListView(APIView):
    def get(self, request: Request) -> Response:
        return Response({"results": [_scheduled(r) for r in experiments.regressions()]})


urlpatterns = [
    path("experiments/", ExperimentListView.as_view(), name="experiment-list"),
    path("experiments/<slug:name>/", ExperimentReportView.as_view(), name="experiment-report"),
    path("schedules/", ScheduleListView.as_view(), name="schedule-list"),
    path("regressions/", RegressionListView.as_view(), name="regression-list"),
]
