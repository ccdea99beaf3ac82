"""Admin for the registry.

Records that are history stay history here: prompt versions are created through Prompt.create_version and are
never edited, labels move through Prompt.move_label so every move is recorded, dataset items and evaluation
results are read-only, and artifacts keep their checksums and provenance read-only.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count, Model, QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.safestring import SafeString

from . import access, diffing, promotion, prompting, reports
from .datasets import DatasetImportError, ItemRecord, check_target, find_conflict, parse_dataset, store_dataset
from .models import (
    ApiToken,
    AuditEntry,
    Dataset,
    DatasetItem,
    EvaluationRun,
    FineTune,
    ItemResult,
    LabelConflict,
    LabelMove,
    LabelPolicy,
    ModelArtifact,
    Prompt,
    PromptLabel,
    PromptVersion,
    ScalingConfig,
    Stack,
    Tag,
)

# Inlines show at most this many rows; the full list is one click away in the child's changelist.
INLINE_ROW_LIMIT = 100


# --- Helpers ------------------------------------------------------------------------------------------------


def _change_url(obj: Model) -> str:
    opts = obj._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])


def _link(obj: Model | None, text: object = None) -> str:
    if obj is None:
        return "-"
    return format_html('<a href="{}">{}</a>', _change_url(obj), obj if text is None else text)


def _changelist_link(model: type[Model], text: str, **filters: int | str) -> str:
    opts = model._meta
    url = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
    return format_html('<a href="{}?{}">{}</a>', url, urlencode(filters), text)


def _pre(text: str) -> SafeString:
    return format_html('<pre style="white-space: pre-wrap; margin: 0">{}</pre>', text)


def _pretty_json(value: Any) -> SafeString:
    return _pre(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True))


def _adopt(obj: Any, stored: Any) -> None:
    """Make the admin's unsaved `obj` the row a domain function stored, so the admin's log entry and redirect
    that follow `save_model` point at that row."""
    for field in type(stored)._meta.concrete_fields:
        setattr(obj, field.attname, getattr(stored, field.attname))
    obj._state.adding = False
    obj._state.db = stored._state.db


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class AuditedModelAdmin(admin.ModelAdmin):
    """Bulk deletions are logged by the admin with bulk_create, which sends no signal: record them here.

    Single additions, changes and deletions reach the audit log through registry/signals.py.
    """

    def log_deletions(self, request: HttpRequest, queryset: Any) -> Any:
        objects = list(queryset)
        entries = super().log_deletions(request, queryset)
        if len(objects) > 1:
            actor = access.Actor(user=request.user, via="admin")
            for obj in objects:
                access.record(actor, f"{obj._meta.model_name}.delete", obj)
        return entries


def _actor(request: HttpRequest) -> access.Actor:
    return access.Actor(user=request.user, via="admin")


class FirstRowsFormSet(BaseInlineFormSet):
    """An inline formset over the first INLINE_ROW_LIMIT rows only, so big datasets and runs stay viewable."""

    def get_queryset(self) -> QuerySet[Any]:
        if not hasattr(self, "_first_rows"):
            rows = super().get_queryset()
            self._first_rows = rows.filter(pk__in=rows.values("pk")[:INLINE_ROW_LIMIT])
        return self._first_rows


class ReadOnlyTabularInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ReadOnlyAdmin(AuditedModelAdmin):
    """Viewable, never added, edited or deleted one by one; rows go when their parent is deleted."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class LabelNameFilter(admin.AllValuesFieldListFilter):
    """Filter by label name, titled "label" rather than the field's bare "name"."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.title = "label"


class DeletesReadOnlyChildren:
    """For a parent admin whose delete cascades to rows of a ReadOnlyAdmin: those rows may go with it."""

    read_only_children: tuple[type[Model], ...] = ()

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> Any:
        deleted, model_count, perms_needed, protected = super().get_deleted_objects(  # type: ignore[misc]
            objs, request
        )
        perms_needed -= {str(model._meta.verbose_name) for model in self.read_only_children}
        return deleted, model_count, perms_needed, protected


# --- Prompt layer -------------------------------------------------------------------------------------------


def _diff_url(prompt: Prompt, a: int, b: int) -> str:
    url = reverse("admin:registry_prompt_diff", args=[prompt.pk])
    return f"{url}?{urlencode({'a': a, 'b': b})}"


class PromptVersionInline(ReadOnlyTabularInline):
    model = PromptVersion
    fk_name = "prompt"
    fields = ("number", "commit_message", "short_hash", "labels_here", "diff", "parent", "created_by", "created_at")
    readonly_fields = fields
    ordering = ("-number",)
    verbose_name_plural = "version history"

    @admin.display(description="content hash")
    def short_hash(self, obj: PromptVersion) -> str:
        return obj.content_hash[:12]

    @admin.display(description="labels")
    def labels_here(self, obj: PromptVersion) -> str:
        return ", ".join(sorted(label.name for label in obj.labels.all())) or "-"

    @admin.display(description="diff")
    def diff(self, obj: PromptVersion) -> str:
        base = obj.parent if obj.parent_id and obj.parent else None
        if base is None:
            base = obj.prompt.versions.filter(number__lt=obj.number).order_by("-number").first()
        if base is None:
            return "-"
        return format_html(
            '<a href="{}">v{} → v{}</a>', _diff_url(obj.prompt, base.number, obj.number), base.number, obj.number
        )

    def get_queryset(self, request: HttpRequest) -> QuerySet[PromptVersion]:
        return (
            super()
            .get_queryset(request)
            .select_related("prompt", "parent__prompt", "created_by")
            .prefetch_related("labels")
        )


class PromptLabelInline(ReadOnlyTabularInline):
    model = PromptLabel
    fields = ("name", "version", "moved_at", "history")
    readonly_fields = fields

    @admin.display(description="history")
    def history(self, obj: PromptLabel) -> str:
        url = reverse("admin:registry_promptlabel_history", args=[obj.pk])
        return format_html('<a href="{}">history and rollback</a>', url)

    def get_queryset(self, request: HttpRequest) -> QuerySet[PromptLabel]:
        return super().get_queryset(request).select_related("prompt", "version__prompt")


@admin.register(Prompt)
class PromptAdmin(DeletesReadOnlyChildren, AuditedModelAdmin):
    read_only_children = (LabelMove,)
    list_display = ("name", "description_short", "version_count", "label_summary", "created_at")
    list_filter = (("labels__name", LabelNameFilter), "created_at")
    search_fields = ("name", "description")
    readonly_fields = ("created_at", "new_version", "compare")
    fields = ("name", "description", "tags", "created_at", "new_version", "compare")
    autocomplete_fields = ("tags",)
    inlines = (PromptLabelInline, PromptVersionInline)

    def get_urls(self) -> list[URLPattern]:
        return [
            path("<path:object_id>/diff/", self.admin_site.admin_view(self.diff_view), name="registry_prompt_diff"),
            *super().get_urls(),
        ]

    def diff_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Side-by-side diff of two versions (?a=&b=, default: the two newest)."""
        prompt = self.get_object(request, object_id)
        if prompt is None or not self.has_view_permission(request, prompt):
            raise PermissionDenied
        versions = list(prompt.versions.order_by("-number"))
        if not versions:
            raise PermissionDenied("this prompt has no versions yet")
        by_number = {v.number: v for v in versions}

        def pick(name: str, default: PromptVersion) -> PromptVersion:
            raw = request.GET.get(name, "")
            return by_number.get(int(raw), default) if raw.isdigit() and len(raw) < 10 else default

        b = pick("b", versions[0])
        a = pick("a", versions[1] if len(versions) > 1 else versions[0])
        diff = diffing.diff_versions(a, b)
        context = {
            **self.admin_site.each_context(request),
            "title": f"{prompt.name}: v{a.number} → v{b.number}",
            "opts": self.opts,
            "original": prompt,
            "prompt": prompt,
            "versions": versions,
            "a": a,
            "b": b,
            "diff": diff,
            "template_rows": diffing.side_by_side(a.template, b.template),
            "system_rows": diffing.side_by_side(a.system_message, b.system_message),
            "a_examples": json.dumps(a.examples, indent=2, ensure_ascii=False, sort_keys=True),
            "b_examples": json.dumps(b.examples, indent=2, ensure_ascii=False, sort_keys=True),
            "examples_rows": diffing.side_by_side(
                json.dumps(a.examples, indent=2, ensure_ascii=False, sort_keys=True),
                json.dumps(b.examples, indent=2, ensure_ascii=False, sort_keys=True),
            ),
            "params_rows": diffing.side_by_side(
                json.dumps(a.params, indent=2, ensure_ascii=False, sort_keys=True),
                json.dumps(b.params, indent=2, ensure_ascii=False, sort_keys=True),
            ),
        }
        return TemplateResponse(request, "admin/registry/prompt/diff.html", context)

    @admin.display(description="compare versions")
    def compare(self, obj: Prompt) -> str:
        if obj.pk is None or obj.versions.count() < 1:
            return "-"
        return format_html('<a href="{}">side-by-side diff</a>', reverse("admin:registry_prompt_diff", args=[obj.pk]))

    def get_queryset(self, request: HttpRequest) -> QuerySet[Prompt]:
        return (
            super()
            .get_queryset(request)
            .annotate(version_count=Count("versions", distinct=True))
            .prefetch_related("labels__version")
        )

    @admin.display(description="description")
    def description_short(self, obj: Prompt) -> str:
        return _short(obj.description)

    @admin.display(description="versions", ordering="version_count")
    def version_count(self, obj: Prompt) -> int:
        return int(getattr(obj, "version_count", 0))

    @admin.display(description="labels")
    def label_summary(self, obj: Prompt) -> str:
        return ", ".join(f"{label.name} → v{label.version.number}" for label in obj.labels.all()) or "-"

    @admin.display(description="new version")
    def new_version(self, obj: Prompt) -> str:
        if obj.pk is None:
            return "-"
        latest = obj.versions.order_by("-number").first()
        url = reverse("admin:registry_promptversion_add")
        if latest is None:
            return format_html('<a href="{}?{}">Add the first version</a>', url, urlencode({"prompt": obj.pk}))
        return format_html(
            '<a href="{}?{}">Add a version based on v{}</a>',
            url,
            urlencode({"from_version": latest.pk}),
            latest.number,
        )


class PromptVersionAddForm(forms.ModelForm):
    variables = forms.CharField(
        required=False,
        help_text="Comma-separated names the template may read, e.g. <code>question, context</code>.",
    )

    class Meta:
        model = PromptVersion
        fields = (
            "prompt",
            "parent",
            "template",
            "system_message",
            "variables",
            "examples",
            "params",
            "commit_message",
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "parent" in self.fields:
            self.fields["parent"].help_text = "Leave empty for the prompt's latest version."

    def clean_variables(self) -> list[str]:
        raw = self.cleaned_data.get("variables") or ""
        return [name.strip() for name in raw.split(",") if name.strip()]

    def clean_examples(self) -> list[Any]:
        examples = self.cleaned_data.get("examples")
        if examples in (None, ""):
            return []
        if not isinstance(examples, list):
            raise ValidationError('examples must be a JSON list of {"inputs": {...}, "output": "..."}')
        return examples

    def clean_params(self) -> dict[str, Any]:
        params = self.cleaned_data.get("params")
        if params in (None, ""):
            return {}
        if not isinstance(params, dict):
            raise ValidationError("params must be a JSON object")
        return params

    def clean(self) -> dict[str, Any]:
        cleaned: dict[str, Any] = super().clean() or {}
        prompt, parent = cleaned.get("prompt"), cleaned.get("parent")
        if prompt is not None and parent is not None and parent.prompt_id != prompt.pk:
            self.add_error("parent", f"{parent} belongs to another prompt than {prompt}")
        if self.errors:
            return cleaned
        try:
            PromptVersion.validate_content(
                cleaned.get("template") or "",
                cleaned.get("system_message") or "",
                cleaned.get("examples") or [],
                cleaned.get("variables") or [],
                cleaned.get("params") or {},
            )
        except ValidationError as exc:
            raise ValidationError(exc.messages) from None
        return cleaned


@admin.register(PromptVersion)
class PromptVersionAdmin(DeletesReadOnlyChildren, AuditedModelAdmin):
    """Versions are immutable: the add page stores one through Prompt.create_version, every other page only
    shows it."""

    read_only_children = (LabelMove,)
    form = PromptVersionAddForm
    list_display = (
        "__str__",
        "prompt",
        "number",
        "commit_short",
        "short_hash",
        "parent",
        "created_by",
        "created_at",
    )
    list_filter = ("prompt", "created_at")
    search_fields = ("prompt__name", "commit_message", "template", "content_hash")
    list_select_related = ("prompt", "parent__prompt", "created_by")
    autocomplete_fields = ("parent",)
    date_hierarchy = "created_at"
    view_fieldsets = (
        (
            None,
            {
                "fields": (
                    "prompt",
                    "number",
                    "parent",
                    "commit_message",
                    "created_by",
                    "created_at",
                    "content_hash",
                    "labels_here",
                    "new_version",
                )
            },
        ),
        (
            "Content",
            {"fields": ("template_source", "system_source", "variables", "examples_json", "params_json")},
        ),
        ("Preview (first example's inputs)", {"fields": ("preview",)}),
    )

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ((None, {"fields": PromptVersionAddForm.Meta.fields}),)
        return self.view_fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ()
        return [name for _, options in self.view_fieldsets for name in options["fields"]]

    def get_changeform_initial_data(self, request: HttpRequest) -> dict[str, Any]:
        initial: dict[str, Any] = dict(super().get_changeform_initial_data(request))
        source_pk = request.GET.get("from_version", "")
        source = PromptVersion.objects.filter(pk=source_pk).first() if source_pk.isdigit() else None
        if source is not None:
            initial.update(
                prompt=source.prompt_id,
                parent=source.pk,
                template=source.template,
                system_message=source.system_message,
                variables=", ".join(source.variables),
                examples=source.examples,
                params=source.params,
            )
        return initial

    def save_model(self, request: HttpRequest, obj: PromptVersion, form: Any, change: bool) -> None:
        if change:
            raise PermissionDenied("prompt versions are immutable")
        version, created = obj.prompt.create_version(
            template=obj.template,
            variables=list(obj.variables),
            system_message=obj.system_message,
            examples=list(obj.examples or []),
            params=dict(obj.params or {}),
            commit_message=obj.commit_message,
            parent=obj.parent,
            created_by=request.user,
        )
        # The admin goes on with `obj` (log entry, redirect): make it the stored version.
        _adopt(obj, version)
        if not created:
            self.message_user(
                request,
                f"Identical content is already stored as {version}; no new version was created.",
                messages.WARNING,
            )

    @admin.display(description="message")
    def commit_short(self, obj: PromptVersion) -> str:
        return _short(obj.commit_message, 60)

    @admin.display(description="content hash")
    def short_hash(self, obj: PromptVersion) -> str:
        return obj.content_hash[:12]

    @admin.display(description="template")
    def template_source(self, obj: PromptVersion) -> SafeString:
        return _pre(obj.template)

    @admin.display(description="system message")
    def system_source(self, obj: PromptVersion) -> SafeString:
        return _pre(obj.system_message or "-")

    @admin.display(description="examples")
    def examples_json(self, obj: PromptVersion) -> SafeString:
        return _pretty_json(obj.examples)

    @admin.display(description="params")
    def params_json(self, obj: PromptVersion) -> SafeString:
        return _pretty_json(obj.params)

    @admin.display(description="labels on this version")
    def labels_here(self, obj: PromptVersion) -> str:
        labels = list(obj.labels.all())
        return format_html_join(", ", "{}", ((_link(label, label.name),) for label in labels)) or "-"

    @admin.display(description="new version")
    def new_version(self, obj: PromptVersion) -> str:
        url = reverse("admin:registry_promptversion_add")
        return format_html(
            '<a href="{}?{}">Add a version based on this one</a>', url, urlencode({"from_version": obj.pk})
        )

    @admin.display(description="rendered messages")
    def preview(self, obj: PromptVersion) -> SafeString:
        inputs = obj.examples[0]["inputs"] if obj.examples else {name: f"<{name}>" for name in obj.variables}
        try:
            return _pretty_json(obj.render_messages(inputs))
        except prompting.PromptTemplateError as exc:
            return _pre(f"cannot render: {exc}")


class PromptLabelForm(forms.ModelForm):
    reason = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="Kept in the label's history.",
    )

    class Meta:
        model = PromptLabel
        fields = ("prompt", "name", "version")
        help_texts = {"name": "Lower-case letters, digits, '-' or '_', e.g. prod or staging."}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk is not None and "version" in self.fields:
            field = self.fields["version"]
            assert isinstance(field, forms.ModelChoiceField)
            field.queryset = PromptVersion.objects.filter(prompt_id=self.instance.prompt_id).select_related("prompt")

    def clean_name(self) -> str:
        name: str = self.cleaned_data["name"]
        if not PromptLabel.NAME_RE.fullmatch(name):
            raise ValidationError("use lower-case letters, digits, '-' or '_' (at most 50, starting alphanumeric)")
        return name

    request_user: Any = None  # set by PromptLabelAdmin.get_form

    def clean(self) -> dict[str, Any]:
        cleaned: dict[str, Any] = super().clean() or {}
        prompt = cleaned.get("prompt") or (self.instance.prompt if self.instance.prompt_id else None)
        version = cleaned.get("version")
        if prompt is not None and version is not None and version.prompt_id != prompt.pk:
            self.add_error("version", f"{version} is not a version of prompt {prompt}")
        name = cleaned.get("name") or self.instance.name
        if self.errors or prompt is None or version is None or not name or self.request_user is None:
            return cleaned
        # The same checks promotion.move_label makes, shown as form errors instead of a 403 page.
        try:
            access.require_role(self.request_user, promotion.required_role(prompt, name), action=f"move {name!r}")
        except access.AccessDenied as exc:
            raise ValidationError(str(exc)) from None
        current = PromptLabel.objects.filter(prompt=prompt, name=name).select_related("version").first()
        gate = promotion.check_gate(promotion.policy_for(prompt, name), version, current.version if current else None)
        if not gate.passed:
            self.add_error("version", f"promotion gate: {gate.message}")
        return cleaned


class LabelMoveInline(ReadOnlyTabularInline):
    model = LabelMove
    fields = ("moved_at", "from_version", "to_version", "moved_by", "reason")
    readonly_fields = fields
    show_change_link = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[LabelMove]:
        return super().get_queryset(request).select_related("from_version__prompt", "to_version__prompt", "moved_by")


@admin.register(PromptLabel)
class PromptLabelAdmin(DeletesReadOnlyChildren, AuditedModelAdmin):
    """Adding or editing a label moves it through Prompt.move_label, which records the move."""

    read_only_children = (LabelMove,)
    form = PromptLabelForm
    list_display = ("__str__", "prompt", "name", "version", "moved_at")
    list_filter = ("name", "prompt")
    search_fields = ("name", "prompt__name")
    list_select_related = ("prompt", "version__prompt")
    inlines = (LabelMoveInline,)

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return ("prompt", "name", "version", "reason", "moved_at", "history_link")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return ("prompt", "name", "moved_at", "history_link") if obj is not None else ("moved_at", "history_link")

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        form = super().get_form(request, obj, change, **kwargs)
        return type(form.__name__, (form,), {"request_user": request.user})

    def save_model(self, request: HttpRequest, obj: PromptLabel, form: Any, change: bool) -> None:
        if change and "version" not in form.changed_data:
            return
        try:
            move = promotion.move_label(
                obj.prompt, obj.name, obj.version, actor=_actor(request), reason=form.cleaned_data.get("reason", "")
            )
        except (promotion.GateFailed, LabelConflict) as exc:  # only when something changed since the form checked
            raise PermissionDenied(str(exc)) from None
        obj.pk = move.label.pk
        obj.moved_at = move.label.moved_at
        obj._state.adding = False

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "<path:object_id>/history/",
                self.admin_site.admin_view(self.label_history_view),
                name="registry_promptlabel_history",
            ),
            *super().get_urls(),
        ]

    def label_history_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Every move of the label; POST {to_version} rolls back to a version it held (one click per row)."""
        label = self.get_object(request, object_id)
        if label is None or not self.has_view_permission(request, label):
            raise PermissionDenied
        here = reverse("admin:registry_promptlabel_history", args=[label.pk])
        if request.method == "POST":
            number = request.POST.get("to_version", "")
            target = label.prompt.versions.filter(number=int(number)).first() if number.isdigit() else None
            try:
                if target is None:
                    raise ValidationError(f"no version {number!r} of {label.prompt}")
                move = promotion.rollback_label(
                    label.prompt,
                    label.name,
                    actor=_actor(request),
                    to_version=target,
                    reason=request.POST.get("reason", "")[:2000],
                    expected=label.version,
                )
                self.message_user(request, f"Rolled {label.prompt}:{label.name} back to v{move.to_version.number}.")
            except (access.AccessDenied, ValidationError, LabelConflict, promotion.GateFailed) as exc:
                text = "; ".join(exc.messages) if isinstance(exc, ValidationError) else str(exc)
                self.message_user(request, f"Rollback refused: {text}", messages.ERROR)
            return HttpResponseRedirect(here)
        moves = list(label.moves.select_related("from_version", "to_version", "moved_by").order_by("-moved_at", "-id"))
        role = promotion.required_role(label.prompt, label.name)
        context = {
            **self.admin_site.each_context(request),
            "title": f"History of {label.prompt.name}:{label.name}",
            "opts": self.opts,
            "original": label,
            "label": label,
            "moves": moves,
            "held": {m.to_version_id for m in moves},
            "required_role": role,
            "may_move": access.has_role(request.user, role),
        }
        return TemplateResponse(request, "admin/registry/promptlabel/history.html", context)

    @admin.display(description="history")
    def history_link(self, obj: PromptLabel) -> str:
        if obj.pk is None:
            return "-"
        url = reverse("admin:registry_promptlabel_history", args=[obj.pk])
        return format_html('<a href="{}">every move, with one-click rollback</a>', url)


@admin.register(LabelMove)
class LabelMoveAdmin(ReadOnlyAdmin):
    """History of label moves; written by Prompt.move_label only."""

    list_display = ("moved_at", "label", "from_version", "to_version", "moved_by", "reason_short")
    list_filter = (("label__name", LabelNameFilter), "label__prompt", "moved_at")
    search_fields = ("label__name", "label__prompt__name", "reason")
    list_select_related = (
        "label__prompt",
        "label__version",
        "from_version__prompt",
        "to_version__prompt",
        "moved_by",
    )
    date_hierarchy = "moved_at"

    @admin.display(description="reason")
    def reason_short(self, obj: LabelMove) -> str:
        return _short(obj.reason, 60)


# --- Architecture, fine-tune and scaling layers -------------------------------------------------------------


@admin.register(ModelArtifact)
class ModelArtifactAdmin(AuditedModelAdmin):
    """Artifacts are registered by the import code, which computes their checksums; here they are inspected
    and given a display name, a price and notes."""

    list_display = (
        "name",
        "dtype",
        "quantisation",
        "short_sha",
        "size",
        "parameters",
        "source_kind",
        "parent",
        "created_at",
    )
    list_filter = ("source_kind", "dtype", "quantisation")
    search_fields = ("name", "sha256", "source_sha256", "path", "source_path")
    list_select_related = ("parent",)
    fieldsets = (
        (None, {"fields": ("name", "price_per_1k_tokens", "metadata")}),
        (
            "Files",
            {"fields": ("sha256", "path", "size", "parameters", "dtype", "quantisation", "created_at")},
        ),
        (
            "Provenance",
            {"fields": ("source_kind", "source_path", "source_sha256", "parent", "derived", "fine_tunes")},
        ),
        ("Chat template", {"fields": ("chat_template_source",), "classes": ("collapse",)}),
    )
    readonly_fields = (
        "sha256",
        "path",
        "size",
        "parameters",
        "dtype",
        "quantisation",
        "created_at",
        "source_kind",
        "source_path",
        "source_sha256",
        "parent",
        "derived",
        "fine_tunes",
        "chat_template_source",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="sha256", ordering="sha256")
    def short_sha(self, obj: ModelArtifact) -> str:
        return obj.sha256[:12]

    @admin.display(description="size", ordering="size_bytes")
    def size(self, obj: ModelArtifact) -> str:
        return f"{human_size(obj.size_bytes)} ({obj.size_bytes:,} bytes)"

    @admin.display(description="parameters", ordering="parameter_count")
    def parameters(self, obj: ModelArtifact) -> str:
        return f"{obj.parameter_count:,}"

    @admin.display(description="derived artifacts")
    def derived(self, obj: ModelArtifact) -> str:
        variants = list(obj.variants.all())
        return format_html_join(", ", "{}", ((_link(v),) for v in variants)) or "-"

    @admin.display(description="fine-tunes (as base / as result)")
    def fine_tunes(self, obj: ModelArtifact) -> str:
        related = list(obj.fine_tunes.all()) + list(obj.produced_by.all())
        return format_html_join(", ", "{}", ((_link(ft),) for ft in related)) or "-"

    @admin.display(description="chat template")
    def chat_template_source(self, obj: ModelArtifact) -> SafeString:
        return _pre(obj.chat_template or "-")


@admin.register(FineTune)
class FineTuneAdmin(AuditedModelAdmin):
    """Fine-tunes a job ran are registered by the job, with what it measured (read-only here); one made elsewhere
    can be recorded by hand."""

    list_display = (
        "name",
        "base_artifact",
        "result_artifact",
        "method",
        "dataset_hash",
        "device",
        "training_seconds",
        "cost",
        "created_at",
    )
    list_filter = ("method", "device", "created_at")
    search_fields = ("name", "training_dataset_hash", "base_artifact__name", "result_artifact__name")
    list_select_related = ("base_artifact", "result_artifact")
    autocomplete_fields = ("base_artifact", "result_artifact")
    readonly_fields = (
        "job_link",
        "training_dataset",
        "seed",
        "device",
        "final_loss",
        "worker_seconds",
        "cost",
        "created_at",
    )

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is not None and obj.job_id:  # registered by its job: the lineage is a record, not a setting
            lineage = ("base_artifact", "result_artifact", "training_dataset_hash", "method", "hyperparameters")
            return (*self.readonly_fields, *lineage, "training_seconds")
        return self.readonly_fields

    @admin.display(description="job")
    def job_link(self, obj: FineTune) -> str:
        return _link(obj.job) if obj.job_id else "- (recorded by hand)"

    @admin.display(description="training data", ordering="training_dataset_hash")
    def dataset_hash(self, obj: FineTune) -> str:
        return obj.training_dataset_hash[:12]


@admin.register(ScalingConfig)
class ScalingConfigAdmin(AuditedModelAdmin):
    list_display = ("name", "n_samples", "temperature", "top_p", "top_k", "aggregation", "seed")
    list_filter = ("aggregation", "n_samples")
    search_fields = ("name",)


# --- Stacks, datasets, evaluations --------------------------------------------------------------------------


@admin.register(Stack)
class StackAdmin(AuditedModelAdmin):
    list_display = ("name", "prompt_display", "scaling", "fine_tune", "artifact", "created_at")
    list_filter = ("scaling", "artifact", "fine_tune")
    search_fields = ("name", "description", "prompt__name", "prompt_version__prompt__name", "prompt_label")
    list_select_related = ("prompt_version__prompt", "prompt", "scaling", "fine_tune", "artifact")
    autocomplete_fields = ("prompt_version", "prompt", "scaling", "fine_tune", "artifact", "tags")
    readonly_fields = ("resolved_prompt", "created_at", "layers")
    fieldsets = (
        ("The four layers", {"fields": ("layers",)}),
        (None, {"fields": ("name", "description", "tags", "created_at")}),
        (
            "Prompt",
            {
                "fields": ("prompt_version", "prompt", "prompt_label", "resolved_prompt"),
                "description": "Pin one prompt version, or name a prompt and a label to follow.",
            },
        ),
        ("Model", {"fields": ("scaling", "fine_tune", "artifact")}),
    )

    @admin.display(description="prompt")
    def prompt_display(self, obj: Stack) -> str:
        return obj.describe_prompt()

    @admin.display(description="layers")
    def layers(self, obj: Stack) -> SafeString:
        """Prompt, inference scaling, fine-tune and architecture, cheapest lever first."""
        if obj.pk is None:
            return format_html("{}", "Saved stacks show their four layers here.")
        try:
            resolved = obj.resolve_prompt_version()
            prompt_now = format_html("{} now", _link(resolved))
        except PromptLabel.DoesNotExist as exc:
            resolved, prompt_now = None, format_html("{}", str(exc))
        scaling = obj.scaling
        fine_tune = obj.fine_tune
        artifact = obj.effective_artifact()
        cards = [
            (
                "prompt",
                _link(obj.prompt_version) if obj.prompt_version_id else f"follows {obj.describe_prompt()}",
                prompt_now
                if resolved is None or not obj.prompt_version_id
                else format_html("{} variables, {} examples", len(resolved.variables), len(resolved.examples)),
            ),
            (
                "inference scaling",
                _link(scaling, scaling.name),
                f"N={scaling.n_samples}, T={scaling.temperature:g}, top-p {scaling.top_p:g}, {scaling.aggregation}",
            ),
            (
                "fine-tune",
                _link(fine_tune, fine_tune.name) if fine_tune else "none",
                f"{fine_tune.method} on {fine_tune.base_artifact.name}" if fine_tune else "base weights",
            ),
            (
                "architecture",
                _link(artifact, artifact.name),
                f"{artifact.dtype}{'/' + artifact.quantisation if artifact.quantisation else ''}, "
                f"{human_size(artifact.size_bytes)}, {artifact.parameter_count:,} parameters",
            ),
        ]
        return format_html(
            '<div class="fulcrum-layers" style="display:flex;gap:12px;flex-wrap:wrap">{}</div>',
            format_html_join(
                "",
                '<div class="fulcrum-layer" style="border:1px solid var(--hairline-color,#ccc);border-radius:6px;'
                'padding:8px 12px;min-width:180px"><div style="font-size:11px;text-transform:uppercase;'
                'color:var(--body-quiet-color,#666)">{}</div><div style="font-weight:bold;margin:4px 0">{}</div>'
                "<div>{}</div></div>",
                cards,
            ),
        )

    @admin.display(description="prompt version now")
    def resolved_prompt(self, obj: Stack) -> str:
        if obj.pk is None:
            return "-"
        try:
            return _link(obj.resolve_prompt_version())
        except PromptLabel.DoesNotExist as exc:
            return str(exc)


class DatasetItemInline(ReadOnlyTabularInline):
    model = DatasetItem
    formset = FirstRowsFormSet
    fields = ("index", "key", "inputs", "expected", "kind")
    readonly_fields = fields
    verbose_name_plural = f"dataset items (first {INLINE_ROW_LIMIT})"


class DatasetUploadForm(forms.ModelForm):
    file = forms.FileField(help_text="JSONL (one object a line) or CSV with a header row.")
    format = forms.ChoiceField(choices=[("", "from the file name"), ("jsonl", "JSONL"), ("csv", "CSV")], required=False)

    class Meta:
        model = Dataset
        fields = ("name", "scorer", "scorer_pattern", "description")

    items: list[ItemRecord]

    def clean(self) -> dict[str, Any]:
        cleaned: dict[str, Any] = super().clean() or {}
        if self.errors:
            return cleaned
        scoring = {"scorer": cleaned["scorer"], "scorer_pattern": cleaned.get("scorer_pattern") or ""}
        try:
            check_target(cleaned["name"], **scoring)
            self.items = parse_dataset(cleaned["file"], fmt=cleaned.get("format") or None)
        except DatasetImportError as exc:
            raise ValidationError(str(exc)) from None
        conflict = find_conflict(self.items, name=cleaned["name"], **scoring)
        if conflict is not None:
            pattern = f" and pattern {conflict.scorer_pattern!r}" if conflict.scorer_pattern else ""
            raise ValidationError(
                f"{conflict} already holds this content with scorer {conflict.scorer!r}{pattern}; "
                "score it the same way or pick another name"
            )
        return cleaned


@admin.register(Dataset)
class DatasetAdmin(DeletesReadOnlyChildren, AuditedModelAdmin):
    """Datasets are added by uploading a file; once stored, only the description changes."""

    read_only_children = (DatasetItem, ItemResult)
    list_display = ("name", "scorer", "item_count", "short_hash", "run_count", "created_at")
    list_filter = ("scorer", "created_at")
    search_fields = ("name", "description", "content_hash")
    inlines = (DatasetItemInline,)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Dataset]:
        return super().get_queryset(request).annotate(run_count=Count("runs"))

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        if obj is None:
            kwargs["form"] = DatasetUploadForm
        return super().get_form(request, obj, change, **kwargs)

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ("file", "format", "name", "scorer", "scorer_pattern", "description")
        return (
            "name",
            "scorer",
            "scorer_pattern",
            "description",
            "content_hash",
            "item_count",
            "all_items",
            "created_at",
        )

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ()
        return ("name", "scorer", "scorer_pattern", "content_hash", "item_count", "all_items", "created_at")

    def get_inlines(self, request: HttpRequest, obj: Any) -> Any:
        return self.inlines if obj is not None else ()

    def save_model(self, request: HttpRequest, obj: Dataset, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        try:
            dataset, created = store_dataset(
                form.items,
                name=obj.name,
                scorer=obj.scorer,
                scorer_pattern=obj.scorer_pattern,
                description=obj.description,
            )
        except DatasetImportError as exc:  # only when a concurrent import got there first
            raise PermissionDenied(str(exc)) from None
        _adopt(obj, dataset)
        if not created:
            self.message_user(
                request,
                f"{dataset} already holds exactly these items; nothing new was stored.",
                messages.WARNING,
            )

    @admin.display(description="content hash")
    def short_hash(self, obj: Dataset) -> str:
        return obj.content_hash[:12]

    @admin.display(description="runs", ordering="run_count")
    def run_count(self, obj: Dataset) -> int:
        return int(getattr(obj, "run_count", 0))

    @admin.display(description="items")
    def all_items(self, obj: Dataset) -> str:
        return _changelist_link(DatasetItem, f"all {obj.item_count} items", dataset__id__exact=obj.pk)


@admin.register(DatasetItem)
class DatasetItemAdmin(ReadOnlyAdmin):
    list_display = ("key", "dataset", "index", "kind", "expected_short", "inputs_short")
    list_filter = ("kind", "dataset")
    search_fields = ("key", "expected", "dataset__name")
    list_select_related = ("dataset",)
    fields = ("dataset", "index", "key", "kind", "expected", "inputs_json")
    readonly_fields = fields

    @admin.display(description="expected")
    def expected_short(self, obj: DatasetItem) -> str:
        return _short(obj.expected, 40)

    @admin.display(description="inputs")
    def inputs_short(self, obj: DatasetItem) -> str:
        return _short(json.dumps(obj.inputs, ensure_ascii=False), 80)

    @admin.display(description="inputs")
    def inputs_json(self, obj: DatasetItem) -> SafeString:
        return _pretty_json(obj.inputs)


class ItemResultInline(ReadOnlyTabularInline):
    model = ItemResult
    formset = FirstRowsFormSet
    fields = (
        "item",
        "answer",
        "score",
        "refused",
        "prompt_tokens",
        "generated_tokens",
        "latency_s",
        "worker",
    )
    readonly_fields = fields
    verbose_name_plural = f"item results (first {INLINE_ROW_LIMIT})"

    def get_queryset(self, request: HttpRequest) -> QuerySet[ItemResult]:
        return super().get_queryset(request).select_related("item__dataset")


@admin.register(EvaluationRun)
class EvaluationRunAdmin(DeletesReadOnlyChildren, AuditedModelAdmin):
    """Runs are started from stacks and filled in by workers; here they are watched and inspected."""

    read_only_children = (ItemResult,)
    list_display = (
        "id",
        "stack",
        "dataset",
        "prompt_version",
        "status",
        "progress_bar",
        "provider",
        "created_at",
        "finished_at",
    )
    list_filter = ("status", "provider", "dataset", "stack")
    search_fields = ("stack__name", "dataset__name", "prompt_version__prompt__name", "error")
    list_select_related = ("stack", "dataset", "prompt_version__prompt", "artifact")
    date_hierarchy = "created_at"
    inlines = (ItemResultInline,)
    fieldsets = (
        (None, {"fields": ("stack", "dataset", "item_subset", "prompt_version", "artifact")}),
        (
            "Progress",
            {
                "fields": (
                    "status",
                    "progress_bar",
                    "provider",
                    "created_at",
                    "started_at",
                    "finished_at",
                    "duration",
                )
            },
        ),
        ("Outcome", {"fields": ("metrics_table", "compare_with", "summary_json", "error_text", "all_results")}),
    )
    readonly_fields = (
        "stack",
        "dataset",
        "item_subset",
        "prompt_version",
        "artifact",
        "status",
        "progress_bar",
        "provider",
        "created_at",
        "started_at",
        "finished_at",
        "duration",
        "metrics_table",
        "compare_with",
        "summary_json",
        "error_text",
        "all_results",
    )
    # Reloads every few seconds while the run is pending or running.
    change_form_template = "admin/registry/evaluationrun/change_form.html"
    actions = ("compare_selected",)

    def get_urls(self) -> list[URLPattern]:
        return [
            path("compare/", self.admin_site.admin_view(self.compare_view), name="registry_evaluationrun_compare"),
            *super().get_urls(),
        ]

    @admin.display(description="items")
    def item_subset(self, obj: EvaluationRun) -> str:
        if not obj.item_keys:
            return "every item of the dataset"
        keys = ", ".join(obj.item_keys[:12]) + (", …" if len(obj.item_keys) > 12 else "")
        return f"{len(obj.item_keys)} of the dataset's items (an optimisation split): {keys}"

    @admin.action(description="Compare the two selected runs")
    def compare_selected(self, request: HttpRequest, queryset: QuerySet[EvaluationRun]) -> HttpResponse | None:
        runs = list(queryset.order_by("created_at", "id")[:3])
        if len(runs) != 2:
            self.message_user(request, "Select exactly two runs to compare.", messages.WARNING)
            return None
        url = reverse("admin:registry_evaluationrun_compare")
        return HttpResponseRedirect(f"{url}?{urlencode({'a': runs[0].pk, 'b': runs[1].pk})}")

    def compare_view(self, request: HttpRequest) -> HttpResponse:
        """Two runs on one dataset: metric deltas, a chart, and the items on which they disagree."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        ids = [request.GET.get(k, "") for k in ("a", "b")]
        runs = {
            r.pk: r
            for r in EvaluationRun.objects.select_related("stack", "dataset", "prompt_version__prompt").filter(
                pk__in=[int(i) for i in ids if i.isdigit() and len(i) < 18]
            )
        }
        context: dict[str, Any] = {**self.admin_site.each_context(request), "opts": self.opts, "title": "Compare runs"}
        if len(ids) == 2 and all(i.isdigit() and int(i) in runs for i in ids):
            a, b = runs[int(ids[0])], runs[int(ids[1])]
            context.update(a=a, b=b, title=f"Run {a.pk} vs run {b.pk} on {a.dataset.name}")
            try:
                comparison = reports.compare_runs(a, b)
            except ValidationError as exc:
                context["error"] = "; ".join(exc.messages)
            else:
                context.update(comparison=comparison, chart=_comparison_chart(comparison["metrics"]))
            context["others"] = EvaluationRun.objects.filter(dataset_id=a.dataset_id).select_related("stack")[:50]
        else:
            context["others"] = EvaluationRun.objects.select_related("stack", "dataset")[:50]
            if any(ids):
                context["error"] = "pick two existing runs"
        return TemplateResponse(request, "admin/registry/evaluationrun/compare.html", context)

    @admin.display(description="metrics")
    def metrics_table(self, obj: EvaluationRun) -> SafeString:
        rows = [
            (k, f"{v:.4g}" if isinstance(v, float) else v)
            for k, v in sorted(obj.summary.items())
            if not isinstance(v, dict | list)
        ]
        if not rows:
            return format_html("{}", "-")
        return format_html(
            '<table class="fulcrum-metrics"><tbody>{}</tbody></table>',
            format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows),
        )

    @admin.display(description="compare with")
    def compare_with(self, obj: EvaluationRun) -> str:
        others = EvaluationRun.objects.filter(dataset_id=obj.dataset_id).exclude(pk=obj.pk).select_related("stack")[:10]
        url = reverse("admin:registry_evaluationrun_compare")
        links = (
            (f"{url}?{urlencode({'a': other.pk, 'b': obj.pk})}", f"run {other.pk} ({other.stack})") for other in others
        )
        return format_html_join(", ", '<a href="{}">{}</a>', links) or "-"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="progress")
    def progress_bar(self, obj: EvaluationRun) -> str:
        return format_html(
            '<progress value="{}" max="{}"></progress> {} / {} ({}%)',
            obj.items_done,
            max(obj.items_total, 1),
            obj.items_done,
            obj.items_total,
            round(obj.progress * 100),
        )

    @admin.display(description="duration")
    def duration(self, obj: EvaluationRun) -> str:
        if obj.started_at is None:
            return "-"
        end = obj.finished_at
        if end is None:
            return "running"
        return f"{(end - obj.started_at).total_seconds():.1f} s"

    @admin.display(description="summary")
    def summary_json(self, obj: EvaluationRun) -> SafeString:
        return _pretty_json(obj.summary)

    @admin.display(description="error")
    def error_text(self, obj: EvaluationRun) -> SafeString:
        return _pre(obj.error or "-")

    @admin.display(description="results")
    def all_results(self, obj: EvaluationRun) -> str:
        return _changelist_link(ItemResult, "all item results", run__id__exact=obj.pk)


def _comparison_chart(metrics: list[dict[str, Any]]) -> SafeString:
    """An inline SVG bar chart of the rates (metrics between 0 and 1) of two runs side by side."""
    rates = [m for m in metrics if all(isinstance(m[k], int | float) and 0 <= m[k] <= 1 for k in ("a", "b"))]
    if not rates:
        return format_html("{}", "")
    bar, gap, height, label_width = 14, 14, 160, 170
    width = label_width + 320
    rows = []
    for index, metric in enumerate(rates):
        y = index * (2 * bar + gap)
        rows.append(
            format_html(
                '<text x="0" y="{}" font-size="12" fill="currentColor">{}</text>'
                '<rect class="bar-a" x="{}" y="{}" width="{}" height="{}" fill="#79aec8"></rect>'
                '<text x="{}" y="{}" font-size="11" fill="currentColor">{}</text>'
                '<rect class="bar-b" x="{}" y="{}" width="{}" height="{}" fill="#417690"></rect>'
                '<text x="{}" y="{}" font-size="11" fill="currentColor">{}</text>',
                y + bar + 4,
                metric["metric"],
                label_width,
                y,
                round(300 * metric["a"], 1),
                bar,
                label_width + round(300 * metric["a"], 1) + 4,
                y + bar - 3,
                f"a {metric['a']:.3f}",
                label_width,
                y + bar,
                round(300 * metric["b"], 1),
                bar,
                label_width + round(300 * metric["b"], 1) + 4,
                y + 2 * bar - 3,
                f"b {metric['b']:.3f}",
            )
        )
    total = len(rates) * (2 * bar + gap)
    return format_html(
        '<svg class="fulcrum-chart" role="img" aria-label="metrics of run a and run b" width="{}" height="{}" '
        'viewBox="0 0 {} {}">{}</svg>',
        width + 60,
        max(total, height // 4),
        width + 60,
        max(total, height // 4),
        format_html_join("", "{}", ((row,) for row in rows)),
    )


@admin.register(ItemResult)
class ItemResultAdmin(ReadOnlyAdmin):
    list_display = (
        "run",
        "item_key",
        "answer_short",
        "score",
        "refused",
        "generated_tokens",
        "latency_s",
        "worker",
    )
    list_filter = ("refused", "worker", "run")
    search_fields = ("item__key", "answer", "rendered_prompt")
    list_select_related = ("run__stack", "run__dataset", "item")
    fields = (
        "run",
        "item",
        "answer",
        "score",
        "refused",
        "prompt_tokens",
        "generated_tokens",
        "latency_s",
        "worker",
        "created_at",
        "prompt_text",
        "samples_json",
    )
    readonly_fields = fields

    @admin.display(description="item", ordering="item__index")
    def item_key(self, obj: ItemResult) -> str:
        return obj.item.key

    @admin.display(description="answer")
    def answer_short(self, obj: ItemResult) -> str:
        return _short(obj.answer, 40)

    @admin.display(description="rendered prompt")
    def prompt_text(self, obj: ItemResult) -> SafeString:
        return _pre(obj.rendered_prompt)

    @admin.display(description="samples")
    def samples_json(self, obj: ItemResult) -> SafeString:
        return _pretty_json(obj.samples)


# --- Access: tokens, policies, audit log, tags -----------------------------------------------------------------


class ApiTokenAddForm(forms.ModelForm):
    class Meta:
        model = ApiToken
        fields = ("user", "name", "scope", "expires_at")


@admin.register(ApiToken)
class ApiTokenAdmin(AuditedModelAdmin):
    """Tokens are created here or through the API; the secret is shown once, in the message after saving."""

    list_display = (
        "name",
        "prefix",
        "user",
        "scope",
        "active",
        "created_at",
        "expires_at",
        "last_used_at",
        "revoked_at",
    )
    list_filter = ("scope", "revoked_at")
    search_fields = ("name", "prefix", "user__username")
    list_select_related = ("user",)
    actions = ("revoke",)
    readonly_fields = ("user", "name", "prefix", "scope", "created_at", "expires_at", "last_used_at", "revoked_at")

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiToken]:
        tokens = super().get_queryset(request)
        return tokens if access.has_role(request.user, "admin") else tokens.filter(user=request.user)

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        if obj is None:
            kwargs["form"] = ApiTokenAddForm
        return super().get_form(request, obj, change, **kwargs)

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return (
                ("user", "name", "scope", "expires_at")
                if access.has_role(request.user, "admin")
                else (
                    "name",
                    "scope",
                    "expires_at",
                )
            )
        return self.readonly_fields

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return () if obj is None else self.readonly_fields

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: ApiToken, form: Any, change: bool) -> None:
        user = obj.user if obj.user_id and access.has_role(request.user, "admin") else request.user
        if obj.scope == ApiToken.Scope.WRITE and not access.has_role(user, "editor"):
            raise PermissionDenied(f"{user} has no editor role: a write token would be useless")
        token, raw = access.create_token(user, obj.name, obj.scope, expires_at=obj.expires_at)
        _adopt(obj, token)
        self.message_user(request, f"Token {token.name}: {raw} — copy it now, it is not shown again.", messages.WARNING)

    @admin.display(boolean=True, description="active")
    def active(self, obj: ApiToken) -> bool:
        return obj.is_active

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        revoked = 0
        for token in queryset:
            if access.revoke_token(token):
                access.record(_actor(request), "token.revoke", token, owner=token.user.get_username())
                revoked += 1
        self.message_user(request, f"Revoked {revoked} token(s).")


@admin.register(LabelPolicy)
class LabelPolicyAdmin(AuditedModelAdmin):
    list_display = ("label", "prompt", "required_role", "gate_dataset", "gate_metric", "higher_is_better", "tolerance")
    list_filter = ("label", "required_role")
    search_fields = ("label", "prompt__name", "gate_dataset")
    autocomplete_fields = ("prompt",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return access.has_role(request.user, "admin")

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return access.has_role(request.user, "admin")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return access.has_role(request.user, "admin")


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    """Every write through the API and the admin, newest first."""

    list_display = ("at", "username", "via", "action", "object_type", "object_link", "token")
    list_filter = ("via", "action", "object_type", "at")
    search_fields = ("username", "action", "object_repr", "object_id")
    list_select_related = ("token",)
    date_hierarchy = "at"
    fields = (
        "at",
        "username",
        "user",
        "via",
        "token",
        "action",
        "object_type",
        "object_id",
        "object_repr",
        "details_json",
    )
    readonly_fields = fields

    @admin.display(description="object")
    def object_link(self, obj: AuditEntry) -> str:
        return obj.object_repr or obj.object_id or "-"

    @admin.display(description="details")
    def details_json(self, obj: AuditEntry) -> SafeString:
        return _pretty_json(obj.details)


@admin.register(Tag)
class TagAdmin(AuditedModelAdmin):
    list_display = ("name",)
    search_fields = ("name",)


# Lever experiments, schedules and their report page; fine-tune jobs (start, watch, cancel); prompt optimisation
# jobs and their report page.
from . import admin_experiments, admin_finetuning, admin_optimisation  # noqa: E402,F401
