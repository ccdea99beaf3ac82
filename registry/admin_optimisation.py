"""Admin for prompt optimisation jobs: the list, a read-only change page with the candidates, and the report page.

Jobs are created through the API or `manage.py optimise`; here they are followed and cancelled. The report page
(/admin/registry/optimisationjob/<id>/report/) shows the budget and what was spent, every candidate tried with
its origin (operator, parameters, parent) and its score per rung, the successive-halving chart and the held-out
comparison of the winner with the starting version (its interval drawn like a lever of an experiment report),
from the report registry/optimisation/jobs.py builds.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import Count, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

from . import access, charts
from .admin import AuditedModelAdmin, ReadOnlyTabularInline, _link, _pre
from .admin_experiments import _interval
from .models import OptimisationCandidate, OptimisationJob, Role
from .optimisation import jobs, reporting


def _report_url(job: OptimisationJob) -> str:
    return reverse("admin:registry_optimisationjob_report", args=[job.pk])


def _share(spent: Any, budget: Any) -> dict[str, Any]:
    s, b = charts.number(spent), charts.number(budget)
    return {
        "spent": "-" if s is None else f"{s:.0f}",
        "budget": "-" if b is None else f"{b:.0f}",
        "share": "" if s is None or not b else f"{100 * s / b:.0f}%",
        "value": s or 0,
        "max": b or 0,
    }


def candidate_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The candidates table: origin, score per rung (blank where eliminated), cost, safety."""
    rungs = [r.get("index") for r in (report.get("search") or {}).get("rungs") or []]
    winner = report.get("winner")
    rows = []
    for c in report.get("candidates") or []:
        by_rung = {s.get("rung"): s for s in c.get("scores") or []}
        params = c.get("params") or {}
        shown = {k: v for k, v in params.items() if k not in ("text", "instruction")}
        rows.append(
            {
                "position": c.get("position"),
                "family": c.get("family", ""),
                "operator": c.get("operator", ""),
                "text": params.get("instruction") or params.get("text") or "",
                "params": json.dumps(shown, ensure_ascii=False, sort_keys=True) if shown else "",
                "parent": c.get("parent"),
                "version": c.get("version", ""),
                "scores": [charts.pct((by_rung.get(r) or {}).get("value")) if r in by_rung else "" for r in rungs],
                "rank": c.get("rank") or "",
                "items": c.get("items_evaluated", 0),
                "tokens": charts.amount((c.get("scores") or [{}])[-1].get("tokens_per_item"), 1)
                if c.get("scores")
                else "-",
                "safety": (c.get("safety") or {}).get("detail", ""),
                "safety_passed": (c.get("safety") or {}).get("passed"),
                "winner": c.get("position") == winner and winner != 0,
                "start": c.get("position") == 0,
                "trimmed": bool(c.get("trimmed")),
            }
        )
    return rows


def holdout_context(report: dict[str, Any]) -> dict[str, Any] | None:
    h = report.get("holdout")
    if not isinstance(h, dict):
        return None
    level = f"{round(100 * (charts.number(h.get('confidence')) or 0.95))}%"
    arm = {
        "arm": "winner vs start",
        "reference": "start",
        "comparison": {
            "delta": h.get("delta"),
            "ci": h.get("ci"),
            "p_value": h.get("p_value"),
            "significant": h.get("gain"),
        },
    }
    return {
        "level": level,
        "items": h.get("items"),
        "start": charts.pct(h.get("start_value")),
        "winner": charts.pct(h.get("winner_value")),
        "delta": charts.pts(h.get("delta")),
        "ci": _interval(h.get("ci"), charts.pts),
        "p_value": charts.p_value(h.get("p_value")),
        "test": h.get("test", ""),
        "alpha": h.get("alpha"),
        "gain": bool(h.get("gain")),
        "wins_losses": f"{h.get('wins')}/{h.get('losses')}",
        "start_run": h.get("start_run"),
        "winner_run": h.get("winner_run"),
        "chart": mark_safe(charts.lever_chart([arm])),
    }


class CandidateInline(ReadOnlyTabularInline):
    model = OptimisationCandidate
    fk_name = "job"
    show_change_link = False
    fields = ("position", "operator", "version_link", "parent_position", "per_rung", "items_evaluated", "tokens")
    readonly_fields = fields
    ordering = ("position",)
    verbose_name_plural = "candidates"

    @admin.display(description="version")
    def version_link(self, obj: OptimisationCandidate) -> str:
        return _link(obj.version)

    @admin.display(description="parent")
    def parent_position(self, obj: OptimisationCandidate) -> str:
        return f"#{obj.parent.position}" if obj.parent is not None else "-"

    @admin.display(description="score per rung")
    def per_rung(self, obj: OptimisationCandidate) -> str:
        return ", ".join(f"r{s.get('rung')}: {charts.pct(s.get('value'))}" for s in obj.scores) or "-"

    def get_queryset(self, request: HttpRequest) -> QuerySet[OptimisationCandidate]:
        return super().get_queryset(request).select_related("version__prompt", "parent")


@admin.register(OptimisationJob)
class OptimisationJobAdmin(AuditedModelAdmin):
    """Read-only: jobs are made by the API or `manage.py optimise`; editors may cancel them here."""

    list_display = (
        "name",
        "start_version",
        "dataset",
        "metric",
        "status",
        "phase",
        "candidate_count",
        "spent_items",
        "winner",
        "label_outcome",
        "created_at",
        "report_link",
    )
    list_filter = ("status", "phase", "metric", "dataset")
    search_fields = ("name", "description", "start_version__prompt__name", "dataset__name")
    list_select_related = ("start_version__prompt", "dataset", "winner__prompt")
    date_hierarchy = "created_at"
    inlines = (CandidateInline,)
    actions = ("cancel_jobs",)
    fields = (
        "name",
        "description",
        "base_stack",
        "start_version",
        "dataset",
        "metric",
        "status",
        "phase",
        "progress",
        "budget_items",
        "budget_tokens",
        "operators",
        "max_candidates",
        "eta",
        "first_items",
        "holdout_fraction",
        "split_seed",
        "safety_dataset",
        "min_refusal_rate",
        "min_answer_rate",
        "alpha",
        "move_label",
        "label_moved",
        "winner",
        "created_by",
        "created_via",
        "created_at",
        "started_at",
        "finished_at",
        "error_text",
        "report_link",
        "report_text",
    )
    readonly_fields = fields

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "<path:object_id>/report/",
                self.admin_site.admin_view(self.report_view),
                name="registry_optimisationjob_report",
            ),
            *super().get_urls(),
        ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[OptimisationJob]:
        return super().get_queryset(request).annotate(candidates_total=Count("candidates", distinct=True))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="candidates", ordering="candidates_total")
    def candidate_count(self, obj: OptimisationJob) -> int:
        return int(getattr(obj, "candidates_total", 0))

    @admin.display(description="items spent / budget")
    def spent_items(self, obj: OptimisationJob) -> str:
        spent = (obj.report or {}).get("spent") or reporting.spent(obj)
        return f"{spent.get('items', 0)} / {obj.budget_items if obj.budget_items is not None else '-'}"

    @admin.display(description="label")
    def label_outcome(self, obj: OptimisationJob) -> str:
        if not obj.move_label:
            return "-"
        return f"{obj.move_label}: {'moved' if obj.label_moved else 'not moved'}"

    @admin.display(description="report")
    def report_link(self, obj: OptimisationJob) -> str:
        if obj.pk is None:
            return "-"
        return format_html('<a href="{}">{}</a>', _report_url(obj), "report and charts")

    @admin.display(description="progress")
    def progress(self, obj: OptimisationJob) -> str:
        done, planned, where = reporting.progress(obj)
        return format_html(
            '<progress value="{}" max="{}"></progress> {} / {} items of the runs so far — {}',
            done,
            max(planned, 1),
            done,
            planned,
            where,
        )

    @admin.display(description="error")
    def error_text(self, obj: OptimisationJob) -> SafeString:
        return _pre(obj.error or "-")

    @admin.display(description="report as text")
    def report_text(self, obj: OptimisationJob) -> SafeString:
        report = obj.report if obj.report else reporting.build_report(obj)
        try:
            return _pre(reporting.format_report(report))
        except (KeyError, TypeError, ValueError, IndexError):  # a report stored in an older shape
            return _pre(json.dumps(report, indent=2, default=str))

    @admin.action(description="Cancel the selected jobs (and the open runs only they use)")
    def cancel_jobs(self, request: HttpRequest, queryset: QuerySet[OptimisationJob]) -> None:
        actor = access.Actor(user=request.user, via="admin")
        try:
            actor.require(Role.EDITOR, "cancel optimisation jobs")
        except access.AccessDenied as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        cancelled = [job.name for job in queryset.order_by("name") if jobs.request_cancel(job, actor)]
        if cancelled:
            self.message_user(request, f"Cancelled: {', '.join(cancelled)}.", messages.SUCCESS)
        else:
            self.message_user(request, "Nothing to cancel: the selected jobs had finished.", messages.WARNING)

    def report_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        job = self.get_object(request, unquote(object_id))
        if job is None:
            raise Http404(f"no optimisation job with id {object_id!r}")
        if not self.has_view_permission(request, job):
            raise PermissionDenied
        report = job.report if job.is_finished and job.report else reporting.build_report(job)
        try:
            json_url = reverse("api:optimisation-report", args=[job.name])
        except NoReverseMatch:
            json_url = ""
        spent, budget = report.get("spent") or {}, report.get("budget") or {}
        rungs = (report.get("search") or {}).get("rungs") or []
        done, planned, where = reporting.progress(job)
        context: dict[str, Any] = {
            **self.admin_site.each_context(request),
            "title": f"Optimisation {job.name}: report",
            "opts": self.opts,
            "original": job,
            "job": job,
            "report": report,
            "verdict": reporting.verdict(report),
            "json_url": json_url,
            "progress": {"done": done, "planned": planned, "where": where},
            "items": _share(spent.get("items"), budget.get("items")),
            "tokens": _share(spent.get("tokens"), budget.get("tokens")),
            "rungs": rungs,
            "candidates": candidate_rows(report),
            "holdout": holdout_context(report),
            "halving_chart": mark_safe(
                charts.halving_chart(report.get("candidates"), rungs, winner=report.get("winner"), metric=job.metric)
            ),
            "generation": report.get("generation") or {},
            "label": report.get("label") or {},
            "winner_version": report.get("winner_version"),
        }
        return TemplateResponse(request, "admin/registry/optimisationjob/report.html", context)
