"""/api/optimisations/: prompt optimisation jobs — create (and queue), list, read with progress, cancel, report.

Thin like the other views: the serializers check the input, registry/optimisation/jobs.py does the work and
records the audit entries. Creating a job needs the editor role; asking it to move a label also needs the role
that label's policy names (checked now, and again when the label would move).
"""

from __future__ import annotations

from typing import Any

import django_filters as filters
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import exceptions, mixins, serializers, status
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from registry.models import (
    Dataset,
    Experiment,
    OptimisationCandidate,
    OptimisationJob,
    Prompt,
    PromptLabel,
    Stack,
)
from registry.optimisation import jobs, reporting

from .errors import Conflict
from .filters import IntFilter, NameFilter
from .permissions import actor
from .serializers import INT32_MAX
from .views import ERRORS, AuditedViewSet

NAME_RE = r"[-a-zA-Z0-9_]{1,100}"
LABEL_RE = r"^[a-z0-9][a-z0-9_-]{0,49}$"


class OptimisationFilter(filters.FilterSet):
    status = filters.ChoiceFilter(choices=OptimisationJob.Status.choices)
    dataset = IntFilter(field_name="dataset_id")
    prompt = NameFilter(field_name="start_version__prompt__name")
    base_stack = NameFilter(field_name="base_stack__name")

    class Meta:
        model = OptimisationJob
        fields: list[str] = []


class CandidateSerializer(serializers.ModelSerializer):
    version = serializers.SerializerMethodField()
    stack = serializers.CharField(source="stack.name", read_only=True)
    parent = serializers.SerializerMethodField()
    scores = serializers.JSONField(read_only=True)
    params = serializers.JSONField(read_only=True)
    safety = serializers.JSONField(read_only=True)

    class Meta:
        model = OptimisationCandidate
        fields = [
            "position",
            "family",
            "operator",
            "params",
            "parent",
            "version",
            "stack",
            "scores",
            "last_rung",
            "items_evaluated",
            "tokens",
            "safety",
        ]
        read_only_fields = fields

    def get_version(self, obj: OptimisationCandidate) -> str:
        return str(obj.version)

    def get_parent(self, obj: OptimisationCandidate) -> int | None:
        return obj.parent.position if obj.parent is not None else None


class OptimisationSerializer(serializers.ModelSerializer):
    base_stack = serializers.SlugRelatedField(slug_field="name", read_only=True)
    prompt = serializers.SerializerMethodField()
    start_version = serializers.SerializerMethodField()
    winner = serializers.SerializerMethodField()
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    progress = serializers.SerializerMethodField()
    split_sizes = serializers.SerializerMethodField()
    operators = serializers.JSONField(read_only=True)

    class Meta:
        model = OptimisationJob
        fields = [
            "id",
            "name",
            "description",
            "status",
            "phase",
            "prompt",
            "start_version",
            "base_stack",
            "dataset",
            "metric",
            "holdout_fraction",
            "split_seed",
            "pool_size",
            "split_sizes",
            "budget_items",
            "budget_tokens",
            "operators",
            "max_candidates",
            "eta",
            "first_items",
            "examples_k",
            "meta_proposals",
            "seed",
            "safety_dataset",
            "min_refusal_rate",
            "min_answer_rate",
            "alpha",
            "confidence",
            "resamples",
            "move_label",
            "label_moved",
            "winner",
            "progress",
            "cancel_requested",
            "error",
            "created_by",
            "created_via",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields

    def get_prompt(self, obj: OptimisationJob) -> str:
        return obj.start_version.prompt.name

    def get_start_version(self, obj: OptimisationJob) -> int:
        return obj.start_version.number

    def get_winner(self, obj: OptimisationJob) -> int | None:
        return obj.winner.number if obj.winner is not None else None

    def get_split_sizes(self, obj: OptimisationJob) -> dict[str, int]:
        return {part: len((obj.split or {}).get(part, [])) for part in ("search", "pool", "holdout")}

    def get_progress(self, obj: OptimisationJob) -> dict[str, Any]:
        done, planned, where = reporting.progress(obj)
        return {"items_done": done, "items_planned": planned, "where": where, "spent": reporting.spent(obj)}


class OptimisationDetailSerializer(OptimisationSerializer):
    candidates = CandidateSerializer(many=True, read_only=True)

    class Meta(OptimisationSerializer.Meta):
        fields = [*OptimisationSerializer.Meta.fields, "candidates"]
        read_only_fields = fields


class OptimisationCreateSerializer(serializers.Serializer):
    name = serializers.SlugField(max_length=100)
    description = serializers.CharField(required=False, allow_blank=True, max_length=10_000, default="")
    base_stack = serializers.SlugRelatedField(
        slug_field="name",
        queryset=Stack.objects.all(),
        help_text="its scaling, fine-tune and artifact run every candidate",
    )
    prompt = serializers.SlugRelatedField(
        slug_field="name", queryset=Prompt.objects.all(), required=False, help_text="default: the base stack's prompt"
    )
    start_version = serializers.IntegerField(
        required=False, min_value=1, max_value=INT32_MAX, help_text="default: the version the base stack runs now"
    )
    dataset = serializers.PrimaryKeyRelatedField(queryset=Dataset.objects.all())
    metric = serializers.ChoiceField(choices=Experiment.Metric.choices, default=Experiment.Metric.ACCURACY)
    holdout_fraction = serializers.FloatField(default=0.5, min_value=0.05, max_value=0.95)
    split_seed = serializers.IntegerField(default=0, min_value=0, max_value=INT32_MAX)
    pool_size = serializers.IntegerField(default=8, min_value=0, max_value=1000)
    budget_items = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=INT32_MAX)
    budget_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=2**62)
    operators = serializers.ListField(
        child=serializers.ChoiceField(choices=list(OptimisationJob.FAMILIES)),
        min_length=1,
        max_length=len(OptimisationJob.FAMILIES),
        default=list(OptimisationJob.FAMILIES),
    )
    max_candidates = serializers.IntegerField(default=8, min_value=1, max_value=64)
    eta = serializers.IntegerField(default=2, min_value=2, max_value=16)
    first_items = serializers.IntegerField(default=8, min_value=1, max_value=10_000)
    examples_k = serializers.IntegerField(default=3, min_value=1, max_value=16)
    meta_proposals = serializers.IntegerField(default=4, min_value=0, max_value=32)
    seed = serializers.IntegerField(default=0, min_value=0, max_value=INT32_MAX)
    safety_dataset = serializers.PrimaryKeyRelatedField(queryset=Dataset.objects.all(), required=False, allow_null=True)
    min_refusal_rate = serializers.FloatField(required=False, allow_null=True, min_value=0, max_value=1)
    min_answer_rate = serializers.FloatField(required=False, allow_null=True, min_value=0, max_value=1)
    alpha = serializers.FloatField(default=0.05, min_value=0.0001, max_value=0.5)
    confidence = serializers.FloatField(default=0.95, min_value=0.5, max_value=0.999)
    resamples = serializers.IntegerField(default=10_000, min_value=100, max_value=100_000)
    move_label = serializers.RegexField(LABEL_RE, required=False, allow_blank=True, default="", max_length=50)
    start = serializers.BooleanField(default=True, help_text="queue it for the workers at once")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        stack: Stack = attrs["base_stack"]
        prompt: Prompt | None = attrs.pop("prompt", None)
        number: int | None = attrs.pop("start_version", None)
        try:
            running = stack.resolve_prompt_version()
        except PromptLabel.DoesNotExist as exc:
            running = None
            if prompt is None or number is None:
                raise serializers.ValidationError({"base_stack": str(exc)}) from None
        if prompt is None:
            assert running is not None
            prompt = running.prompt
        if number is not None:
            version = prompt.versions.filter(number=number).first()
            if version is None:
                raise serializers.ValidationError({"start_version": f"prompt {prompt.name!r} has no version {number}"})
        elif running is not None and running.prompt_id == prompt.pk:
            version = running
        else:
            version = prompt.versions.order_by("-number").first()
            if version is None:
                raise serializers.ValidationError({"prompt": f"prompt {prompt.name!r} has no versions"})
        attrs["start_version"] = version
        return attrs


@extend_schema_view(
    list=extend_schema(summary="Prompt optimisation jobs (filter by status, dataset, prompt, base_stack)"),
    retrieve=extend_schema(summary="A job with its progress and every candidate (origin, scores per rung)"),
    create=extend_schema(
        summary="Create an optimisation job and queue it (editor; move_label also needs that label's role)",
        request=OptimisationCreateSerializer,
        responses={201: OptimisationDetailSerializer, **ERRORS},
    ),
)
class OptimisationViewSet(AuditedViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin):
    serializer_class = OptimisationSerializer
    filterset_class = OptimisationFilter
    lookup_field = "name"
    lookup_value_regex = NAME_RE
    audit_type = "optimisation"

    def get_queryset(self) -> QuerySet[OptimisationJob]:
        return OptimisationJob.objects.select_related(
            "base_stack", "start_version__prompt", "winner", "created_by", "dataset"
        ).order_by("-created_at", "-id")

    def get_serializer_class(self) -> type[serializers.BaseSerializer]:
        return OptimisationDetailSerializer if self.action == "retrieve" else OptimisationSerializer

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        body = OptimisationCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = dict(body.validated_data)
        start = data.pop("start")
        name = data.pop("name")
        if OptimisationJob.objects.filter(name=name).exists():
            raise exceptions.ValidationError({"name": f"an optimisation job named {name!r} exists"})
        try:
            with transaction.atomic():
                job = jobs.create_job(name, actor=actor(request), **data)
                if start:
                    jobs.start_job(job)
        except jobs.OptimisationError as exc:
            raise exceptions.ValidationError({exc.field or "non_field_errors": str(exc)}) from None
        except DjangoValidationError as exc:
            if hasattr(exc, "error_dict"):
                raise exceptions.ValidationError(exc.message_dict) from None
            raise exceptions.ValidationError({"non_field_errors": "; ".join(exc.messages)}) from None
        job = self.get_queryset().get(pk=job.pk)
        return Response(OptimisationDetailSerializer(job).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Cancel a job and the open runs only it uses",
        request=None,
        responses={200: OptimisationSerializer, 409: OpenApiResponse(description="already finished")},
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, name: str) -> Response:
        job = self.get_object()
        if not jobs.request_cancel(job, actor(request)):
            raise Conflict(f"optimisation {job.name} is already {job.status}", code="finished")
        job = self.get_queryset().get(pk=job.pk)
        return Response(OptimisationSerializer(job).data)

    @extend_schema(
        summary="The report: candidates tried and their scores, budget spent, the held-out comparison",
        responses={200: OpenApiTypes.OBJECT},
    )
    @action(detail=True, methods=["get"], filterset_class=None, pagination_class=None)
    def report(self, request: Request, name: str) -> Response:
        job = self.get_object()
        report = job.report if job.is_finished and job.report else reporting.build_report(job)
        return Response(
            {"name": job.name, "status": job.status, "report": report, "text": reporting.format_report(report)}
        )
