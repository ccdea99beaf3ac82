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
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.safestring import SafeString

from . import prompting
from .datasets import DatasetImportError, ItemRecord, check_target, find_conflict, parse_dataset, store_dataset
from .models import (
    Dataset,
    DatasetItem,
    EvaluationRun,
    FineTune,
    ItemResult,
    LabelMove,
    ModelArtifact,
    Prompt,
    PromptLabel,
    PromptVersion,
    ScalingConfig,
    Stack,
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


class ReadOnlyAdmin(admin.ModelAdmin):
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


class PromptVersionInline(ReadOnlyTabularInline):
    model = PromptVersion
    fk_name = "prompt"
    fields = ("number", "commit_message", "short_hash", "parent", "created_by", "created_at")
    readonly_fields = fields
    ordering = ("-number",)

    @admin.display(description="content hash")
    def short_hash(self, obj: PromptVersion) -> str:
        return obj.content_hash[:12]

    def get_queryset(self, request: HttpRequest) -> QuerySet[PromptVersion]:
        return super().get_queryset(request).select_related("prompt", "parent__prompt", "created_by")


class PromptLabelInline(ReadOnlyTabularInline):
    model = PromptLabel
    fields = ("name", "version", "moved_at")
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[PromptLabel]:
        return super().get_queryset(request).select_related("prompt", "version__prompt")


@admin.register(Prompt)
class PromptAdmin(DeletesReadOnlyChildren, admin.ModelAdmin):
    read_only_children = (LabelMove,)
    list_display = ("name", "description_short", "version_count", "label_summary", "created_at")
    list_filter = (("labels__name", LabelNameFilter), "created_at")
    search_fields = ("name", "description")
    readonly_fields = ("created_at", "new_version")
    fields = ("name", "description", "created_at", "new_version")
    inlines = (PromptLabelInline, PromptVersionInline)

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
class PromptVersionAdmin(DeletesReadOnlyChildren, admin.ModelAdmin):
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
        for field in PromptVersion._meta.concrete_fields:
            setattr(obj, field.attname, getattr(version, field.attname))
        obj._state.adding = False
        obj._state.db = version._state.db
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

    def clean(self) -> dict[str, Any]:
        cleaned: dict[str, Any] = super().clean() or {}
        prompt = cleaned.get("prompt") or (self.instance.prompt if self.instance.prompt_id else None)
        version = cleaned.get("version")
        if prompt is not None and version is not None and version.prompt_id != prompt.pk:
            self.add_error("version", f"{version} is not a version of prompt {prompt}")
        return cleaned


class LabelMoveInline(ReadOnlyTabularInline):
    model = LabelMove
    fields = ("moved_at", "from_version", "to_version", "moved_by", "reason")
    readonly_fields = fields
    show_change_link = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[LabelMove]:
        return super().get_queryset(request).select_related("from_version__prompt", "to_version__prompt", "moved_by")


@admin.register(PromptLabel)
class PromptLabelAdmin(DeletesReadOnlyChildren, admin.ModelAdmin):
    """Adding or editing a label moves it through Prompt.move_label, which records the move."""

    read_only_children = (LabelMove,)
    form = PromptLabelForm
    list_display = ("__str__", "prompt", "name", "version", "moved_at")
    list_filter = ("name", "prompt")
    search_fields = ("name", "prompt__name")
    list_select_related = ("prompt", "version__prompt")
    inlines = (LabelMoveInline,)

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return ("prompt", "name", "version", "reason", "moved_at")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return ("prompt", "name", "moved_at") if obj is not None else ("moved_at",)

    def save_model(self, request: HttpRequest, obj: PromptLabel, form: Any, change: bool) -> None:
        if change and "version" not in form.changed_data:
            return
        move = obj.prompt.move_label(
            obj.name, obj.version, user=request.user, reason=form.cleaned_data.get("reason", "")
        )
        obj.pk = move.label.pk
        obj.moved_at = move.label.moved_at
        obj._state.adding = False


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
class ModelArtifactAdmin(admin.ModelAdmin):
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
class FineTuneAdmin(admin.ModelAdmin):
    list_display = ("name", "base_artifact", "result_artifact", "method", "dataset_hash", "created_at")
    list_filter = ("method", "created_at")
    search_fields = ("name", "training_dataset_hash", "base_artifact__name", "result_artifact__name")
    list_select_related = ("base_artifact", "result_artifact")
    autocomplete_fields = ("base_artifact", "result_artifact")
    readonly_fields = ("created_at",)

    @admin.display(description="training data", ordering="training_dataset_hash")
    def dataset_hash(self, obj: FineTune) -> str:
        return obj.training_dataset_hash[:12]


@admin.register(ScalingConfig)
class ScalingConfigAdmin(admin.ModelAdmin):
    list_display = ("name", "n_samples", "temperature", "top_p", "top_k", "aggregation", "seed")
    list_filter = ("aggregation", "n_samples")
    search_fields = ("name",)


# --- Stacks, datasets, evaluations --------------------------------------------------------------------------


@admin.register(Stack)
class StackAdmin(admin.ModelAdmin):
    list_display = ("name", "prompt_display", "scaling", "fine_tune", "artifact", "created_at")
    list_filter = ("scaling", "artifact", "fine_tune")
    search_fields = ("name", "description", "prompt__name", "prompt_version__prompt__name", "prompt_label")
    list_select_related = ("prompt_version__prompt", "prompt", "scaling", "fine_tune", "artifact")
    autocomplete_fields = ("prompt_version", "prompt", "scaling", "fine_tune", "artifact")
    readonly_fields = ("resolved_prompt", "created_at")
    fieldsets = (
        (None, {"fields": ("name", "description", "created_at")}),
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
class DatasetAdmin(DeletesReadOnlyChildren, admin.ModelAdmin):
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
        for field in Dataset._meta.concrete_fields:
            setattr(obj, field.attname, getattr(dataset, field.attname))
        obj._state.adding = False
        obj._state.db = dataset._state.db
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
class EvaluationRunAdmin(DeletesReadOnlyChildren, admin.ModelAdmin):
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
        (None, {"fields": ("stack", "dataset", "prompt_version", "artifact")}),
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
        ("Outcome", {"fields": ("summary_json", "error_text", "all_results")}),
    )
    readonly_fields = (
        "stack",
        "dataset",
        "prompt_version",
        "artifact",
        "status",
        "progress_bar",
        "provider",
        "created_at",
        "started_at",
        "finished_at",
        "duration",
        "summary_json",
        "error_text",
        "all_results",
    )

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
