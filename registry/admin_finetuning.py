"""Admin for fine-tune jobs: start one (the add form), watch it (status, progress, loss curve), cancel it.

The add form checks what the API checks (hyperparameters, a base with trainable weights, data that renders through
the prompt version) and hands the job to workers/finetuning.py, which queues it on the training queue; an
identical request joins the job that trains or trained it. The change page is read-only and reloads while the job
is open; its loss curve is an inline SVG from registry/charts.py.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from . import access, charts
from .admin import AuditedModelAdmin, _adopt, _link, _pre, _pretty_json
from .models import FineTune, FineTuneJob

HYPERPARAMETER_HELP = (
    "JSON object; empty for the defaults. steps or epochs, batch_size, learning_rate, warmup_steps, weight_decay, "
    'max_grad_norm, max_length; LoRA: lora_r, lora_alpha, lora_dropout, target_modules (e.g. ["q_proj", "v_proj"])'
)


class FineTuneJobAddForm(forms.ModelForm):
    hyperparameters = forms.JSONField(required=False, initial=dict, help_text=HYPERPARAMETER_HELP)

    class Meta:
        model = FineTuneJob
        fields = ("name", "base_artifact", "dataset", "prompt_version", "method", "hyperparameters", "seed")

    def clean_hyperparameters(self) -> dict[str, Any]:
        value = self.cleaned_data.get("hyperparameters")
        if value in (None, ""):
            return {}
        if not isinstance(value, dict):
            raise ValidationError("hyperparameters must be a JSON object")
        return value

    def clean(self) -> dict[str, Any]:
        from workers import finetuning

        data = super().clean() or {}
        dataset, version, name = data.get("dataset"), data.get("prompt_version"), data.get("name")
        if dataset is not None and version is not None:
            try:
                finetuning.training_examples(dataset, version)
            except finetuning.FineTuneError as exc:
                self.add_error(exc.field if exc.field in self.fields else None, str(exc))
        if name and FineTune.objects.filter(name=name).exists():
            self.add_error("name", f"a fine-tune named {name!r} exists; choose another name")
        return data


@admin.register(FineTuneJob)
class FineTuneJobAdmin(AuditedModelAdmin):
    """Jobs are started here or through the API or `manage.py fine_tune`, and run by training workers."""

    form = FineTuneJobAddForm
    list_display = (
        "id",
        "name",
        "status",
        "progress_bar",
        "method_code",
        "base_artifact",
        "dataset",
        "losses",
        "device",
        "training_time",
        "created_at",
    )
    list_filter = ("status", "method", "device")
    search_fields = ("name", "base_artifact__name", "dataset__name", "spec_hash", "error")
    list_select_related = ("base_artifact", "dataset", "prompt_version__prompt")
    date_hierarchy = "created_at"
    actions = ("cancel_selected",)
    change_form_template = "admin/registry/finetunejob/change_form.html"
    fieldsets = (
        (None, {"fields": ("name", "status", "progress_bar", "error_text")}),
        ("Loss", {"fields": ("loss_chart", "losses")}),
        (
            "Request",
            {"fields": ("base_artifact", "dataset", "prompt_version", "method", "hyperparameters_json", "seed")},
        ),
        ("Result", {"fields": ("result", "device", "training_time", "worker_time", "worker", "spec_hash")}),
        ("Times", {"fields": ("created_by", "created_at", "started_at", "finished_at", "heartbeat_at")}),
    )
    readonly_fields = (
        "name",
        "status",
        "progress_bar",
        "error_text",
        "loss_chart",
        "losses",
        "base_artifact",
        "dataset",
        "prompt_version",
        "method",
        "hyperparameters_json",
        "seed",
        "result",
        "device",
        "training_time",
        "worker_time",
        "worker",
        "spec_hash",
        "created_by",
        "created_at",
        "started_at",
        "finished_at",
        "heartbeat_at",
    )
    add_fieldsets = (
        (
            None,
            {
                "fields": ("name", "base_artifact", "dataset", "prompt_version", "method", "hyperparameters", "seed"),
                "description": "The base needs trainable weights (imported from GGUF or a Hugging Face folder, or a "
                "fine-tune). Each dataset item's inputs are rendered through the prompt version, as an evaluation "
                "would; its expected answer is the target. The job runs on a worker consuming the training queue "
                "(manage.py worker --train).",
            },
        ),
    )

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        return self.add_fieldsets if obj is None else self.fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return () if obj is None else self.readonly_fields

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # a job is a record of what ran: read-only once started

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm("registry.change_finetunejob"))

    def save_model(self, request: HttpRequest, obj: FineTuneJob, form: Any, change: bool) -> None:
        from workers import finetuning

        with transaction.atomic():
            job, created = finetuning.create_job(
                name=obj.name,
                base_artifact=obj.base_artifact,
                dataset=obj.dataset,
                prompt_version=obj.prompt_version,
                method=obj.method,
                hyperparameters=form.cleaned_data.get("hyperparameters") or {},
                seed=obj.seed,
                created_by=request.user,
            )
            queued = finetuning.start_job(job)
        _adopt(obj, job)
        if not created:
            self.message_user(
                request,
                f"An identical fine-tune is {job.status} as job {job.pk} ({job.name}): it is reused, not trained "
                "again.",
                messages.INFO,
            )
        elif queued:
            self.message_user(request, f"Job {job.pk} queued for a training worker.", messages.INFO)

    # -- cancelling ----------------------------------------------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "<path:object_id>/cancel/",
                self.admin_site.admin_view(self.cancel_view),
                name="registry_finetunejob_cancel",
            ),
            *super().get_urls(),
        ]

    def _cancel(self, request: HttpRequest, job: FineTuneJob) -> bool:
        from workers import finetuning

        with transaction.atomic():
            if not finetuning.cancel_job(job):
                return False
            access.record(access.Actor(user=request.user, via="admin"), "finetunejob.cancel", job)
        return True

    def cancel_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_cancel_permission(request):
            raise PermissionDenied
        job = self.get_object(request, unquote(object_id))
        if job is None:
            raise Http404(f"no fine-tune job {object_id}")
        if self._cancel(request, job):
            job.refresh_from_db()
            done = "cancelled" if job.status == FineTuneJob.Status.CANCELLED else "asked to stop (within a step)"
            self.message_user(request, f"Job {job.pk} {done}.", messages.SUCCESS)
        else:
            self.message_user(request, f"Job {job.pk} is already {job.status}.", messages.WARNING)
        return HttpResponseRedirect(reverse("admin:registry_finetunejob_change", args=[job.pk]))

    @admin.action(description="Cancel the selected jobs", permissions=["cancel"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[FineTuneJob]) -> None:
        cancelled = sum(self._cancel(request, job) for job in queryset)
        skipped = queryset.count() - cancelled
        self.message_user(
            request, f"{cancelled} job(s) cancelled or asked to stop; {skipped} had already finished.", messages.INFO
        )

    # -- display -------------------------------------------------------------------------------------------------------

    @admin.display(description="progress")
    def progress_bar(self, obj: FineTuneJob) -> str:
        return format_html(
            '<progress value="{}" max="{}"></progress> {} / {} steps ({}%){}',
            obj.steps_done,
            max(obj.steps_total, 1),
            obj.steps_done,
            obj.steps_total or "?",
            round(obj.progress * 100),
            " - cancel requested" if obj.cancel_requested and not obj.is_finished else "",
        )

    @admin.display(description="method", ordering="method")
    def method_code(self, obj: FineTuneJob) -> str:
        """The short code (lora, full) keeps the list narrow; the form shows the long description."""
        return obj.method

    @admin.display(description="loss before -> after")
    def losses(self, obj: FineTuneJob) -> str:
        if obj.initial_loss is None:
            last = obj.loss_curve[-1][1] if obj.loss_curve else None
            return "-" if last is None else f"last step {last:.3f}"
        after = "-" if obj.final_loss is None else f"{obj.final_loss:.3f}"
        return f"{obj.initial_loss:.3f} -> {after}"

    @admin.display(description="loss curve")
    def loss_chart(self, obj: FineTuneJob) -> SafeString:
        return mark_safe(  # noqa: S308 - charts.loss_chart escapes every text it draws
            charts.loss_chart(
                obj.loss_curve, initial=obj.initial_loss, final=obj.final_loss, total_steps=obj.steps_total
            )
        )

    @admin.display(description="training", ordering="training_seconds")
    def training_time(self, obj: FineTuneJob) -> str:
        return f"{obj.training_seconds:.1f} s" if obj.training_seconds else "-"

    @admin.display(description="worker time", ordering="worker_seconds")
    def worker_time(self, obj: FineTuneJob) -> str:
        return f"{obj.worker_seconds:.1f} s" if obj.worker_seconds else "-"

    @admin.display(description="hyperparameters")
    def hyperparameters_json(self, obj: FineTuneJob) -> SafeString:
        return _pretty_json(obj.hyperparameters)

    @admin.display(description="error")
    def error_text(self, obj: FineTuneJob) -> SafeString:
        return _pre(obj.error or "-")

    @admin.display(description="registered result")
    def result(self, obj: FineTuneJob) -> str:
        fine_tune = FineTune.objects.filter(job=obj).select_related("result_artifact").first()
        if fine_tune is None:
            return "-"
        return format_html_join(
            ", ",
            "{}",
            ((_link(fine_tune),), (_link(fine_tune.result_artifact),), (f"cost {fine_tune.cost}",)),
        )
