"""Admin for lever experiments, evaluation schedules and their runs, and the experiment report page.

Experiments are created and started through the `experiment` management command or the API; here they are
viewed: the change page is read-only and links to the report page (/admin/registry/experiment/<id>/report/),
which draws the lever table, the scaling curve, the lever bars and the safety/helpfulness scatter from the
stored report (registry/experiments.py build_report) with the inline SVG charts of registry/charts.py.
Schedules can be added, edited (their Celery beat task is kept in step) and fired at once; each scheduled run
shows whether it was a regression, and the list filters on that.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

from . import charts, experiments
from .admin import (
    AuditedModelAdmin,
    DeletesReadOnlyChildren,
    ReadOnlyAdmin,
    ReadOnlyTabularInline,
    _changelist_link,
    _link,
    _pre,
    _pretty_json,
)
from .models import EvaluationSchedule, Experiment, ExperimentArm, ScheduledRun

COST_LABELS = {"generated_tokens": "tokens", "worker_seconds": "worker s", "money": "money"}


def _signed(value: Any, digits: int = 3) -> str:
    v = charts.number(value)
    if v is None:
        return "-"
    text = charts.amount(abs(v), digits)
    return ("+" if v > 0 else "−" if v < 0 else "±") + text


def _interval(ci: Any, fmt: Any) -> str:
    bounds = charts.pair(ci)
    return "-" if bounds is None else f"[{fmt(bounds[0])}, {fmt(bounds[1])}]"


def _sign(value: Any) -> str:
    v = charts.number(value)
    return "" if not v else "up" if v > 0 else "down"


def _gain(value: Any) -> str:
    """Gain per unit of extra cost, in points; "free" (better and no dearer) passes through."""
    if isinstance(value, str):
        return value
    v = charts.number(value)
    return "-" if v is None else f"{100 * v:+.4g}"


def _report_url(experiment: Experiment) -> str:
    return reverse("admin:registry_experiment_report", args=[experiment.pk])


# --- the report page's rows ----------------------------------------------------------------------------------------


def lever_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The lever table: one row of display strings per arm of the report."""
    basis = report.get("cost_basis") or "worker_seconds"
    rows = []
    for arm in report.get("arms") or []:
        c = arm.get("comparison") or {}
        cost, cost_delta = arm.get("cost") or {}, arm.get("cost_delta") or {}
        gain = (arm.get("gain_per_cost") or {}).get(basis)
        wins, losses = c.get("wins"), c.get("losses")
        rows.append(
            {
                "arm": arm.get("arm", ""),
                "layer": arm.get("layer", ""),
                "stack": arm.get("stack", ""),
                "reference": arm.get("reference") or "",
                "run": arm.get("run"),
                "reused": bool(arm.get("reused")),
                "value": charts.pct(arm.get("value")),
                "value_ci": _interval(arm.get("value_ci"), charts.pct),
                "compared": bool(c),
                "delta": charts.pts(c.get("delta")),
                "delta_sign": _sign(c.get("delta")),
                "ci": _interval(c.get("ci"), charts.pts),
                "p_value": charts.p_value(c.get("p_value")),
                "significant": bool(c.get("significant")),
                "test": c.get("test") or "",
                "wins_losses": f"{wins}/{losses}" if wins is not None and losses is not None else "-",
                "tokens": charts.amount(cost.get("generated_tokens"), 1),
                "tokens_delta": _signed(cost_delta.get("generated_tokens"), 1) if c else "",
                "seconds": charts.amount(cost.get("worker_seconds"), 3),
                "seconds_delta": _signed(cost_delta.get("worker_seconds"), 3) if c else "",
                "money": charts.amount(cost.get("money"), 4),
                "money_delta": _signed(cost_delta.get("money"), 4) if c else "",
                "cost_estimated": bool(arm.get("cost_estimated")),
                "gain": _gain(gain) if c else "",
                "one_off": arm.get("one_off"),
            }
        )
    return rows


def scaling_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    basis = report.get("cost_basis") or "worker_seconds"
    curves = []
    for curve in report.get("scaling_curves") or []:
        points = [
            {
                "n": p.get("n"),
                "arm": p.get("arm", ""),
                "value": charts.pct(p.get("value")),
                "value_ci": _interval(p.get("value_ci"), charts.pct),
                "delta": charts.pts(p.get("delta")) if p.get("p_value") is not None else "",
                "ci": _interval(p.get("ci"), charts.pts) if p.get("p_value") is not None else "",
                "p_value": charts.p_value(p.get("p_value")) if p.get("p_value") is not None else "",
                "significant": bool(p.get("significant")),
                "cost": charts.amount((p.get("cost") or {}).get(basis), 4),
            }
            for p in curve.get("points") or []
        ]
        curves.append(
            {
                "reference": curve.get("reference", ""),
                "smallest_significant_n": curve.get("smallest_significant_n"),
                "points": points,
            }
        )
    return curves


def alignment_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for m in (report.get("alignment") or {}).get("methods") or []:
        rows.append(
            {
                "method": m.get("method", ""),
                "arm": m.get("arm", ""),
                "stack": m.get("stack", ""),
                "safety": charts.pct(m.get("safety")),
                "safety_ci": _interval(m.get("safety_ci"), charts.pct),
                "helpfulness": charts.pct(m.get("helpfulness")),
                "helpfulness_ci": _interval(m.get("helpfulness_ci"), charts.pct),
                "tax": charts.pts(m.get("tax")),
                "tax_ci": _interval(m.get("tax_ci"), charts.pts),
                "tax_p_value": charts.p_value(m.get("tax_p_value")),
                "tax_significant": bool(m.get("tax_significant")),
                "cost": charts.amount(m.get("cost"), 4),
                "pareto": bool(m.get("pareto")),
            }
        )
    return rows


def report_context(report: dict[str, Any]) -> dict[str, Any]:
    """Everything the report template shows, from a stored report dict (any key may be missing)."""
    basis = report.get("cost_basis") or "worker_seconds"
    confidence = charts.number(report.get("confidence")) or 0.95
    alignment = report.get("alignment")
    metric = str(report.get("metric") or "metric")
    levers = lever_rows(report)
    return {
        "level": f"{round(100 * confidence)}%",
        "cost_basis": basis,
        "cost_label": COST_LABELS.get(basis, basis),
        "cost_unit": charts.COST_UNITS.get(basis, basis),
        "levers": levers,
        "show_money": any((a.get("cost") or {}).get("money") for a in report.get("arms") or []),
        "scaling": scaling_rows(report),
        "reverse_alignment": report.get("reverse_alignment") or {},
        "alignment": alignment,
        "alignment_rows": alignment_rows(report),
        "scaling_chart": mark_safe(charts.scaling_chart(report.get("scaling_curves"), basis, metric=metric)),
        "lever_chart": mark_safe(charts.lever_chart(report.get("arms"))),
        "alignment_chart": mark_safe(charts.alignment_chart(alignment)),
    }


# --- experiments ---------------------------------------------------------------------------------------------------


class ExperimentArmInline(ReadOnlyTabularInline):
    model = ExperimentArm
    fk_name = "experiment"
    show_change_link = False
    fields = ("position", "name", "layer", "stack_link", "reference", "run_link", "run_status", "reused", "value")
    readonly_fields = fields
    ordering = ("position",)
    verbose_name_plural = "arms"

    @admin.display(description="stack")
    def stack_link(self, obj: ExperimentArm) -> str:
        return _link(obj.stack)

    @admin.display(description="run")
    def run_link(self, obj: ExperimentArm) -> str:
        return _link(obj.run, f"run {obj.run_id}") if obj.run_id else "-"

    @admin.display(description="run status")
    def run_status(self, obj: ExperimentArm) -> str:
        return obj.run.status if obj.run is not None else "-"

    @admin.display(description="value (Δ vs reference)")
    def value(self, obj: ExperimentArm) -> str:
        for row in obj.experiment.report.get("arms") or []:
            if row.get("arm") == obj.name:
                delta = (row.get("comparison") or {}).get("delta")
                value = charts.pct(row.get("value"))
                return value if delta is None else f"{value} ({charts.pts(delta)} pts)"
        return "-"

    def get_queryset(self, request: HttpRequest) -> QuerySet[ExperimentArm]:
        return super().get_queryset(request).select_related("experiment", "stack", "reference", "run")


@admin.register(Experiment)
class ExperimentAdmin(AuditedModelAdmin):
    """Read-only: experiments are made and started by `manage.py experiment` or the API."""

    list_display = ("name", "dataset", "metric", "status", "runs", "created_at", "report_link")
    list_filter = ("status", "metric", "dataset")
    search_fields = ("name", "description", "dataset__name")
    list_select_related = ("dataset",)
    date_hierarchy = "created_at"
    inlines = (ExperimentArmInline,)
    fields = (
        "name",
        "description",
        "dataset",
        "metric",
        "confidence",
        "resamples",
        "seed",
        "status",
        "progress",
        "created_at",
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
                name="registry_experiment_report",
            ),
            *super().get_urls(),
        ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Experiment]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                run_total=Count("arms__run", distinct=True),
                run_reused=Count("arms__run", filter=Q(arms__reused=True), distinct=True),
            )
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="runs reused/total")
    def runs(self, obj: Experiment) -> str:
        return f"{getattr(obj, 'run_reused', 0)}/{getattr(obj, 'run_total', 0)}"

    @admin.display(description="report")
    def report_link(self, obj: Experiment) -> str:
        if obj.pk is None:
            return "-"
        text = "report and charts" if obj.report.get("arms") else f"report page ({obj.status})"
        return format_html('<a href="{}">{}</a>', _report_url(obj), text)

    @admin.display(description="progress")
    def progress(self, obj: Experiment) -> str:
        done, total, runs_done, runs = experiments.experiment_progress(obj)
        return format_html(
            '<progress value="{}" max="{}"></progress> {} / {} items, {} / {} runs finished',
            done,
            max(total, 1),
            done,
            total,
            runs_done,
            runs,
        )

    @admin.display(description="error")
    def error_text(self, obj: Experiment) -> SafeString:
        return _pre(obj.error or "-")

    @admin.display(description="report as text")
    def report_text(self, obj: Experiment) -> SafeString:
        if not obj.report.get("arms"):
            return _pre("-")
        try:
            return _pre(experiments.format_report(obj.report))
        except (KeyError, TypeError, ValueError, IndexError):  # a report stored in an older shape
            return _pretty_json(obj.report)

    def report_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The report with its tables and charts; while the runs are open, their progress."""
        experiment = self.get_object(request, unquote(object_id))
        if experiment is None:
            raise Http404(f"no experiment with id {object_id!r}")
        if not self.has_view_permission(request, experiment):
            raise PermissionDenied
        report = experiment.report if isinstance(experiment.report, dict) else {}
        done, total, runs_done, runs = experiments.experiment_progress(experiment)
        try:
            json_url = reverse("api:experiment-report", args=[experiment.name])
        except NoReverseMatch:
            json_url = ""
        context: dict[str, Any] = {
            **self.admin_site.each_context(request),
            "title": f"Experiment {experiment.name}: report",
            "opts": self.opts,
            "original": experiment,
            "experiment": experiment,
            "arms": experiment.arms.select_related("stack", "run", "reference").order_by("position"),
            "report": report,
            "has_report": bool(report.get("arms")),
            "progress": {"done": done, "total": total, "runs_done": runs_done, "runs": runs},
            "json_url": json_url,
        }
        if context["has_report"]:
            context.update(report_context(report))
        return TemplateResponse(request, "admin/registry/experiment/report.html", context)


# --- schedules and their runs --------------------------------------------------------------------------------------


def _drop_periodic_tasks(schedules: list[EvaluationSchedule]) -> None:
    from django_celery_beat.models import PeriodicTask

    names = [f"{experiments.PERIODIC_TASK_PREFIX}{s.name}" for s in schedules]
    ids = [s.periodic_task_id for s in schedules if s.periodic_task_id]
    PeriodicTask.objects.filter(Q(name__in=names) | Q(pk__in=ids)).delete()


@admin.register(EvaluationSchedule)
class EvaluationScheduleAdmin(DeletesReadOnlyChildren, AuditedModelAdmin):
    """Saving a schedule keeps its Celery beat task in step; deleting it removes the task."""

    read_only_children = (ScheduledRun,)
    list_display = (
        "name",
        "stack",
        "dataset",
        "metric",
        "when",
        "on_label_move",
        "enabled",
        "last_run",
        "regression_count",
        "created_at",
    )
    list_filter = ("enabled", "on_label_move", "metric", "dataset")
    search_fields = ("name", "stack__name", "dataset__name")
    list_select_related = ("stack", "dataset")
    autocomplete_fields = ("stack", "dataset")
    actions = ("fire_now",)
    fields = (
        "name",
        "stack",
        "dataset",
        "metric",
        "every_seconds",
        "crontab",
        "on_label_move",
        "alpha",
        "tolerance",
        "enabled",
        "periodic_task",
        "created_at",
        "scheduled_runs_link",
    )

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        # The beat task is named after the schedule: a rename would leave the old task behind.
        fixed = ("periodic_task", "created_at", "scheduled_runs_link")
        return fixed if obj is None else ("name", *fixed)

    def get_queryset(self, request: HttpRequest) -> QuerySet[EvaluationSchedule]:
        return (
            super()
            .get_queryset(request)
            .annotate(regressions=Count("scheduled_runs", filter=Q(scheduled_runs__regression=True)))
        )

    def save_model(self, request: HttpRequest, obj: EvaluationSchedule, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        experiments.sync_periodic_task(obj)

    def delete_model(self, request: HttpRequest, obj: EvaluationSchedule) -> None:
        _drop_periodic_tasks([obj])
        super().delete_model(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[EvaluationSchedule]) -> None:
        _drop_periodic_tasks(list(queryset))
        super().delete_queryset(request, queryset)

    @admin.display(description="when")
    def when(self, obj: EvaluationSchedule) -> str:
        if obj.every_seconds:
            return f"every {obj.every_seconds} s"
        if obj.crontab.strip():
            return f"cron {obj.crontab}"
        return "on label move only" if obj.on_label_move else "-"

    @admin.display(description="last run")
    def last_run(self, obj: EvaluationSchedule) -> str:
        last = obj.scheduled_runs.select_related("run").first()
        if last is None:
            return "-"
        flag = " — regression" if last.regression else ""
        return format_html("{} ({}){}", _link(last.run, f"run {last.run_id}"), last.run.status, flag)

    @admin.display(description="regressions", ordering="regressions")
    def regression_count(self, obj: EvaluationSchedule) -> str:
        count = int(getattr(obj, "regressions", 0))
        if not count:
            return "0"
        return _changelist_link(ScheduledRun, str(count), schedule__id__exact=obj.pk, regression__exact=1)

    @admin.display(description="scheduled runs")
    def scheduled_runs_link(self, obj: EvaluationSchedule) -> str:
        if obj.pk is None:
            return "-"
        return _changelist_link(ScheduledRun, "all runs of this schedule", schedule__id__exact=obj.pk)

    @admin.action(description="Fire the selected schedules now")
    def fire_now(self, request: HttpRequest, queryset: QuerySet[EvaluationSchedule]) -> None:
        queued: list[str] = []
        skipped: list[str] = []
        for schedule in queryset.order_by("name"):
            run = experiments.fire_schedule(schedule.pk, ScheduledRun.Trigger.MANUAL)
            (queued if run is not None else skipped).append(f"{schedule.name}" + (f" (run {run.pk})" if run else ""))
        if queued:
            self.message_user(request, f"Queued: {', '.join(queued)}.", messages.SUCCESS)
        if skipped:
            self.message_user(
                request,
                f"Not fired (disabled, or its last run is still open): {', '.join(skipped)}.",
                messages.WARNING,
            )


@admin.register(ScheduledRun)
class ScheduledRunAdmin(ReadOnlyAdmin):
    """Every firing of every schedule, newest first; filter on `regression` to see the regressions."""

    list_display = (
        "created_at",
        "schedule",
        "run_link",
        "run_status",
        "trigger",
        "previous_link",
        "delta",
        "p",
        "regression",
        "compared",
    )
    list_filter = ("regression", "compared", "trigger", "schedule")
    search_fields = ("schedule__name", "schedule__stack__name", "schedule__dataset__name")
    list_select_related = ("schedule", "run", "previous")
    date_hierarchy = "created_at"
    fields = (
        "schedule",
        "run_link",
        "run_status",
        "previous_link",
        "trigger",
        "created_at",
        "compared",
        "regression",
        "delta",
        "p",
        "comparison_json",
    )
    readonly_fields = fields

    @admin.display(description="run", ordering="run")
    def run_link(self, obj: ScheduledRun) -> str:
        return _link(obj.run, f"run {obj.run_id}")

    @admin.display(description="status")
    def run_status(self, obj: ScheduledRun) -> str:
        return obj.run.status

    @admin.display(description="compared with")
    def previous_link(self, obj: ScheduledRun) -> str:
        return _link(obj.previous, f"run {obj.previous_id}") if obj.previous_id else "-"

    @admin.display(description="Δ (pts)")
    def delta(self, obj: ScheduledRun) -> str:
        c = obj.comparison or {}
        if "delta" not in c:
            return "-"
        return f"{charts.pts(c.get('delta'))} {_interval(c.get('ci'), charts.pts)}"

    @admin.display(description="p")
    def p(self, obj: ScheduledRun) -> str:
        return charts.p_value((obj.comparison or {}).get("p_value"))

    @admin.display(description="comparison")
    def comparison_json(self, obj: ScheduledRun) -> SafeString:
        return _pretty_json(obj.comparison)
