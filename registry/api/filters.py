"""Query-string filters for the list endpoints (django-filter); a bad value is a 400, never a server error."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import django_filters as filters
from django import forms
from django.db.models import Q, QuerySet

from registry.models import (
    ApiToken,
    AuditEntry,
    Dataset,
    DatasetItem,
    EvaluationRun,
    FineTune,
    FineTuneJob,
    ItemResult,
    LabelMove,
    LabelPolicy,
    ModelArtifact,
    Prompt,
    PromptVersion,
    ScalingConfig,
    Stack,
)

BIG = 2**62


class BoundedIntegerField(forms.IntegerField):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("min_value", 0)
        kwargs.setdefault("max_value", BIG)
        super().__init__(*args, **kwargs)


class UTCDateTimeField(forms.DateTimeField):
    """An ISO 8601 date-time, normalised to UTC (PostgreSQL refuses offsets beyond +-15:59)."""

    def to_python(self, value: Any) -> datetime | None:
        if value in self.empty_values:
            return None
        try:
            parsed = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
        except ValueError:
            raise forms.ValidationError("enter an ISO 8601 date-time, e.g. 2026-01-31T12:00:00Z") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        try:
            return parsed.astimezone(UTC)
        except OverflowError:
            raise forms.ValidationError("the date-time is out of range") from None


class UTCDateTimeFilter(filters.Filter):
    field_class = UTCDateTimeField


class IntFilter(filters.NumberFilter):
    """An integer within the database's range (NumberFilter alone takes any decimal)."""

    field_class = BoundedIntegerField


class NameFilter(filters.CharFilter):
    """An exact name of at most 200 characters."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", 200)
        super().__init__(*args, **kwargs)


class TaggedFilterSet(filters.FilterSet):
    tag = NameFilter(field_name="tags__name", distinct=True, help_text="has this tag")


class PromptFilter(TaggedFilterSet):
    label = NameFilter(field_name="labels__name", distinct=True, help_text="has a label of this name")
    q = filters.CharFilter(method="search", max_length=200, help_text="in the name or description")

    class Meta:
        model = Prompt
        fields: list[str] = []

    def search(self, queryset: QuerySet[Prompt], name: str, value: str) -> QuerySet[Prompt]:
        return queryset.filter(Q(name__icontains=value) | Q(description__icontains=value))


class PromptVersionFilter(filters.FilterSet):
    label = NameFilter(field_name="labels__name", distinct=True, help_text="a label points at it")
    created_by = NameFilter(field_name="created_by__username")

    class Meta:
        model = PromptVersion
        fields: list[str] = []


class LabelMoveFilter(filters.FilterSet):
    prompt = NameFilter(field_name="label__prompt__name")
    label = NameFilter(field_name="label__name")
    moved_by = NameFilter(field_name="moved_by__username")

    class Meta:
        model = LabelMove
        fields: list[str] = []


class LabelPolicyFilter(filters.FilterSet):
    prompt = NameFilter(field_name="prompt__name")
    label = NameFilter(field_name="label")

    class Meta:
        model = LabelPolicy
        fields: list[str] = []


class ArtifactFilter(TaggedFilterSet):
    source_kind = filters.ChoiceFilter(choices=ModelArtifact.SourceKind.choices)
    dtype = NameFilter()
    quantisation = NameFilter()
    parent = IntFilter(field_name="parent_id")

    class Meta:
        model = ModelArtifact
        fields: list[str] = []


class FineTuneFilter(filters.FilterSet):
    artifact = IntFilter(method="by_artifact", help_text="as base or as result")
    method = NameFilter()

    class Meta:
        model = FineTune
        fields: list[str] = []

    def by_artifact(self, queryset: QuerySet[FineTune], name: str, value: Any) -> QuerySet[FineTune]:
        return queryset.filter(Q(base_artifact_id=value) | Q(result_artifact_id=value))


class FineTuneJobFilter(filters.FilterSet):
    status = filters.ChoiceFilter(choices=FineTuneJob.Status.choices)
    method = filters.ChoiceFilter(choices=FineTuneJob.Method.choices)
    base_artifact = IntFilter(field_name="base_artifact_id")
    dataset = IntFilter(field_name="dataset_id")
    name = NameFilter()

    class Meta:
        model = FineTuneJob
        fields: list[str] = []


class ScalingConfigFilter(filters.FilterSet):
    aggregation = filters.ChoiceFilter(choices=ScalingConfig.Aggregation.choices)
    n_samples = IntFilter()

    class Meta:
        model = ScalingConfig
        fields: list[str] = []


class StackFilter(TaggedFilterSet):
    prompt = NameFilter(method="by_prompt", help_text="pins or follows this prompt")
    artifact = IntFilter(field_name="artifact_id")
    scaling = NameFilter(field_name="scaling__name")
    fine_tune = NameFilter(field_name="fine_tune__name")

    class Meta:
        model = Stack
        fields: list[str] = []

    def by_prompt(self, queryset: QuerySet[Stack], name: str, value: str) -> QuerySet[Stack]:
        return queryset.filter(Q(prompt__name=value) | Q(prompt_version__prompt__name=value))


class DatasetFilter(TaggedFilterSet):
    name = NameFilter()
    scorer = filters.ChoiceFilter(choices=Dataset.Scorer.choices)

    class Meta:
        model = Dataset
        fields: list[str] = []


class DatasetItemFilter(filters.FilterSet):
    kind = filters.ChoiceFilter(choices=DatasetItem.Kind.choices)

    class Meta:
        model = DatasetItem
        fields: list[str] = []


class RunFilter(filters.FilterSet):
    stack = NameFilter(field_name="stack__name")
    dataset = IntFilter(field_name="dataset_id")
    dataset_name = NameFilter(field_name="dataset__name")
    artifact = IntFilter(field_name="artifact_id")
    prompt = NameFilter(field_name="prompt_version__prompt__name")
    prompt_version = IntFilter(field_name="prompt_version__number")
    status = filters.ChoiceFilter(choices=EvaluationRun.Status.choices)

    class Meta:
        model = EvaluationRun
        fields: list[str] = []


class ItemResultFilter(filters.FilterSet):
    kind = filters.ChoiceFilter(field_name="item__kind", choices=DatasetItem.Kind.choices)
    refused = filters.BooleanFilter()
    correct = filters.BooleanFilter(method="by_correct", help_text="score 1 (true) or 0 (false)")

    class Meta:
        model = ItemResult
        fields: list[str] = []

    def by_correct(self, queryset: QuerySet[ItemResult], name: str, value: bool | None) -> QuerySet[ItemResult]:
        if value is None:
            return queryset
        return queryset.filter(score=1.0 if value else 0.0)


class TokenFilter(filters.FilterSet):
    active = filters.BooleanFilter(method="by_active")
    scope = filters.ChoiceFilter(choices=ApiToken.Scope.choices)

    class Meta:
        model = ApiToken
        fields: list[str] = []

    def by_active(self, queryset: QuerySet[ApiToken], name: str, value: bool | None) -> QuerySet[ApiToken]:
        if value is None:
            return queryset
        return queryset.filter(revoked_at__isnull=value)


class AuditFilter(filters.FilterSet):
    action = NameFilter()
    object_type = NameFilter()
    object_id = NameFilter()
    user = NameFilter(field_name="username")
    via = filters.ChoiceFilter(choices=[("api", "api"), ("admin", "admin"), ("cli", "cli")])
    since = UTCDateTimeFilter(field_name="at", lookup_expr="gte", help_text="ISO 8601")
    until = UTCDateTimeFilter(field_name="at", lookup_expr="lt", help_text="ISO 8601")

    class Meta:
        model = AuditEntry
        fields: list[str] = []
