"""API views: thin wrappers that parse, check the role, call the registry's domain functions and audit."""

from __future__ import annotations

import hashlib
import io
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Max, Model, QuerySet
from django.http import HttpResponseBase, StreamingHttpResponse
from django.shortcuts import get_object_or_404
from django.utils.http import parse_etags, quote_etag
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import exceptions, mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fulcrum import metrics
from registry import access, diffing, promotion, reports
from registry.datasets import DatasetImportError, import_dataset
from registry.models import (
    ANY_VERSION,
    ApiToken,
    AuditEntry,
    Dataset,
    EvaluationRun,
    FineTune,
    FineTuneJob,
    ItemResult,
    LabelMove,
    LabelPolicy,
    ModelArtifact,
    Prompt,
    PromptLabel,
    PromptVersion,
    Role,
    ScalingConfig,
    Stack,
    Tag,
    canonical_hash,
)
from registry.prompting import PromptTemplateError

from . import filters
from . import serializers as s
from .errors import Conflict, Gone
from .permissions import actor, request_token

NAME_RE = r"[-a-zA-Z0-9_]{1,100}"
LABEL_RE = r"[a-z0-9][a-z0-9_-]{0,49}"
NUMBER_RE = r"[0-9]{1,9}"
ID_RE = r"[0-9]{1,18}"
MAX_UPLOAD_BYTES = getattr(settings, "FULCRUM_MAX_UPLOAD_BYTES", 20 * 1024 * 1024)

ERRORS = {
    400: OpenApiResponse(description="bad input: see errors[].field and errors[].message"),
    401: OpenApiResponse(description="not authenticated"),
    403: OpenApiResponse(description="the role or the token's scope does not allow it"),
    404: OpenApiResponse(description="not found"),
}


class PayloadTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "the upload is too large"
    default_code = "too_large"


def _nul_path(value: Any, path: str = "") -> str | None:
    """Where in a parsed body a string holds U+0000, or None."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict) or hasattr(value, "lists"):
        items = value.lists() if hasattr(value, "lists") else value.items()
        for key, item in items:
            name = f"{path}.{key}" if path else str(key)
            if "\x00" in str(key):
                return name.replace("\x00", "")
            found = _nul_path(item, name)
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _nul_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


class Base:
    # Shared by every view: refuses NUL characters (U+0000) in the query string and the body, which PostgreSQL
    # can neither store nor compare. (A comment, not a docstring: view docstrings become schema descriptions.)

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        where = _nul_path(request.query_params)
        if where is None and request.method not in ("GET", "HEAD", "OPTIONS"):
            where = _nul_path(request.data)
        if where is not None:
            raise exceptions.ValidationError({where or "body": "contains a NUL character (U+0000)"})
        super().initial(request, *args, **kwargs)  # type: ignore[misc]


class AuditedViewSet(Base, viewsets.GenericViewSet):
    """Creates, updates and deletes through the serializer, each recorded in the audit log in one transaction."""

    audit_type = ""
    action_roles: dict[str, str] = {}

    def record(self, verb: str, obj: Model | None = None, **details: Any) -> None:
        access.record(actor(self.request), f"{self.audit_type}.{verb}", obj, **details)

    def perform_create(self, serializer: serializers.BaseSerializer) -> None:
        with transaction.atomic():
            instance = serializer.save()
            self.record("create", instance, fields=sorted(serializer.validated_data))

    def perform_update(self, serializer: serializers.BaseSerializer) -> None:
        with transaction.atomic():
            instance = serializer.save()
            self.record("update", instance, fields=sorted(serializer.validated_data))

    def perform_destroy(self, instance: Model) -> None:
        with transaction.atomic():
            self.record("delete", instance)
            instance.delete()


class CrudViewSet(
    AuditedViewSet,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
):
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]


# --- prompts ------------------------------------------------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(summary="List prompts (filter by tag, label; search with q)"),
    destroy=extend_schema(summary="Delete a prompt with all its versions and labels (admin)"),
)
class PromptViewSet(CrudViewSet):
    serializer_class = s.PromptSerializer
    filterset_class = filters.PromptFilter
    lookup_field = "name"
    lookup_value_regex = NAME_RE
    audit_type = "prompt"
    ordering_fields = ["name", "created_at"]

    def get_queryset(self) -> QuerySet[Prompt]:
        return (
            Prompt.objects.annotate(latest_number=Max("versions__number"), number_of_versions=Count("versions"))
            .prefetch_related("tags", "labels__version")
            .order_by("name")
        )

    @extend_schema(
        summary="What changed between two versions: template, system message, variables, examples, params",
        parameters=[s.DiffQuerySerializer],
        responses={200: OpenApiTypes.OBJECT, **ERRORS},
    )
    @action(detail=True, methods=["get"])
    def diff(self, request: Request, name: str) -> Response:
        prompt = self.get_object()
        query = s.DiffQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        versions = {v.number: v for v in prompt.versions.filter(number__in=query.validated_data.values())}
        picked = []
        for field in ("from_version", "to_version"):
            number = query.validated_data[field]
            if number not in versions:
                raise exceptions.ValidationError({field: f"prompt {prompt.name!r} has no version {number}"})
            picked.append(versions[number])
        return Response(diffing.diff_versions(*picked))


def _filtered(filterset: type[Any], request: Request, queryset: QuerySet[Any]) -> QuerySet[Any]:
    """Apply a FilterSet to a queryset of another model than the view's; 400 on a bad value."""
    bound = filterset(request.query_params, queryset=queryset, request=request)
    if not bound.is_valid():
        raise exceptions.ValidationError(bound.errors)
    return bound.qs  # type: ignore[no-any-return]


def _prompt_or_404(name: str) -> Prompt:
    return get_object_or_404(Prompt, name=name)


def _version_or_gone(prompt: Prompt, number: int) -> PromptVersion:
    version = prompt.versions.filter(number=number).select_related("prompt").first()
    if version is not None:
        return version
    if 0 < number <= prompt.version_counter:
        raise Gone(f"version {number} of prompt {prompt.name!r} was deleted", code="version_gone")
    raise exceptions.NotFound(f"prompt {prompt.name!r} has no version {number}")


@extend_schema_view(
    list=extend_schema(summary="A prompt's versions, newest first"),
    create=extend_schema(
        summary="Store a new immutable version (identical content returns the stored version with 200)",
        responses={201: s.PromptVersionSerializer, 200: s.PromptVersionSerializer, **ERRORS},
    ),
    retrieve=extend_schema(responses={200: s.PromptVersionSerializer, 410: OpenApiResponse(description="deleted")}),
    destroy=extend_schema(summary="Delete a version no label, stack or run uses (admin)"),
)
class PromptVersionViewSet(
    AuditedViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, mixins.DestroyModelMixin
):
    serializer_class = s.PromptVersionSerializer
    filterset_class = filters.PromptVersionFilter
    lookup_field = "number"
    lookup_value_regex = NUMBER_RE
    audit_type = "version"
    ordering_fields = ["number", "created_at"]

    def get_queryset(self) -> QuerySet[PromptVersion]:
        return (
            PromptVersion.objects.filter(prompt__name=self.kwargs.get("prompt_name", ""))
            .select_related("prompt", "parent", "created_by")
            .prefetch_related("labels")
            .order_by("-number")
        )

    def get_object(self) -> PromptVersion:
        prompt = _prompt_or_404(self.kwargs["prompt_name"])
        version = _version_or_gone(prompt, int(self.kwargs["number"]))
        self.check_object_permissions(self.request, version)
        return version

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        _prompt_or_404(kwargs["prompt_name"])
        return super().list(request, *args, **kwargs)

    def get_serializer_context(self) -> dict[str, Any]:
        context = super().get_serializer_context()
        if self.action == "create":
            context["prompt"] = _prompt_or_404(self.kwargs["prompt_name"])
            context["user"] = self.request.user
        return context

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        with transaction.atomic():
            version = serializer.save()
            if serializer.created:
                self.record("create", version, prompt=version.prompt.name, number=version.number)
        code = status.HTTP_201_CREATED if serializer.created else status.HTTP_200_OK
        return Response(self.get_serializer(version).data, status=code)


@extend_schema_view(
    list=extend_schema(summary="A prompt's labels"),
    retrieve=extend_schema(summary="One label: the version it points at"),
    destroy=extend_schema(summary="Remove a label (the label's policy role, else editor)"),
)
class LabelViewSet(AuditedViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin):
    serializer_class = s.LabelSerializer
    lookup_field = "name"
    lookup_value_regex = LABEL_RE
    audit_type = "label"
    delete_role = Role.EDITOR
    filterset_class = None

    def get_queryset(self) -> QuerySet[PromptLabel]:
        return (
            PromptLabel.objects.filter(prompt__name=self.kwargs.get("prompt_name", ""))
            .select_related("prompt", "version")
            .order_by("name")
        )

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        _prompt_or_404(kwargs["prompt_name"])
        return super().list(request, *args, **kwargs)

    def destroy(self, request: Request, prompt_name: str, name: str) -> Response:
        label = self.get_object()
        actor(request).require(promotion.required_role(label.prompt, name), f"remove the {name!r} label")
        with transaction.atomic():
            self.record("delete", label, object_repr=f"{prompt_name}:{name}", version=label.version.number)
            label.delete()
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        summary="Point the label at a version (created if new); protected labels need their role and gate",
        request=s.LabelMoveInputSerializer,
        responses={200: s.LabelMoveSerializer, 409: OpenApiResponse(description="moved meanwhile or gate failed")},
    )
    @action(detail=True, methods=["post"])
    def move(self, request: Request, prompt_name: str, name: str) -> Response:
        prompt = _prompt_or_404(prompt_name)
        body = s.LabelMoveInputSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        version = prompt.versions.filter(number=data["version"]).first()
        if version is None:
            raise exceptions.ValidationError({"version": f"prompt {prompt.name!r} has no version {data['version']}"})
        move = promotion.move_label(
            prompt,
            name,
            version,
            actor=actor(request),
            reason=data["reason"],
            expected=self._expected(prompt, data),
        )
        return Response(s.LabelMoveSerializer(move).data)

    @extend_schema(
        summary="Move the label back to the version before its latest move, or to a version it held before",
        request=s.LabelRollbackInputSerializer,
        responses={200: s.LabelMoveSerializer, 409: OpenApiResponse(description="moved meanwhile")},
    )
    @action(detail=True, methods=["post"])
    def rollback(self, request: Request, prompt_name: str, name: str) -> Response:
        prompt = _prompt_or_404(prompt_name)
        body = s.LabelRollbackInputSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        target = None
        if data.get("to_version") is not None:
            target = prompt.versions.filter(number=data["to_version"]).first()
            if target is None:
                raise exceptions.ValidationError(
                    {"to_version": f"prompt {prompt.name!r} has no version {data['to_version']}"}
                )
        move = promotion.rollback_label(
            prompt,
            name,
            actor=actor(request),
            to_version=target,
            reason=data["reason"],
            expected=self._expected(prompt, data),
        )
        return Response(s.LabelMoveSerializer(move).data)

    @extend_schema(summary="Every move of the label, newest first", responses={200: s.LabelMoveSerializer(many=True)})
    @action(detail=True, methods=["get"], filterset_class=None)
    def history(self, request: Request, prompt_name: str, name: str) -> Response:
        label = self.get_object()
        moves = label.moves.select_related("label__prompt", "from_version", "to_version", "moved_by").order_by(
            "-moved_at", "-id"
        )
        page = self.paginate_queryset(moves)
        data = s.LabelMoveSerializer(page if page is not None else moves, many=True).data
        return self.get_paginated_response(data) if page is not None else Response(data)

    @staticmethod
    def _expected(prompt: Prompt, data: dict[str, Any]) -> Any:
        if "expected_version" not in data:
            return ANY_VERSION
        number = data["expected_version"]
        if number is None:
            return None
        expected = prompt.versions.filter(number=number).first()
        if expected is None:
            raise exceptions.ValidationError({"expected_version": f"prompt {prompt.name!r} has no version {number}"})
        return expected


@extend_schema_view(list=extend_schema(summary="Label moves across prompts (filter by prompt, label, moved_by)"))
class LabelMoveViewSet(Base, viewsets.ReadOnlyModelViewSet):
    serializer_class = s.LabelMoveSerializer
    filterset_class = filters.LabelMoveFilter
    lookup_value_regex = ID_RE
    queryset = LabelMove.objects.select_related("label__prompt", "from_version", "to_version", "moved_by").order_by(
        "-moved_at", "-id"
    )


@extend_schema_view(list=extend_schema(summary="Who may move which label, and the promotion gate (admin writes)"))
class LabelPolicyViewSet(CrudViewSet):
    serializer_class = s.LabelPolicySerializer
    filterset_class = filters.LabelPolicyFilter
    lookup_value_regex = ID_RE
    audit_type = "policy"
    write_role = Role.ADMIN
    queryset = LabelPolicy.objects.select_related("prompt").order_by("label", "id")


# --- serving ------------------------------------------------------------------------------------------------------


class ServeView(Base, APIView):
    """A prompt by label (default production) or version number, raw or rendered; revalidate with its ETag.

    Nothing is cached on the server: every request reads the label, so a label move or a deleted version is
    visible on the very next request.
    """

    @extend_schema(
        summary="Fetch a prompt by label or version for serving (ETag / If-None-Match)",
        parameters=[
            s.ServeQuerySerializer,
            OpenApiParameter("If-None-Match", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False),
        ],
        responses={
            200: s.ServedPromptSerializer,
            304: OpenApiResponse(description="not modified"),
            404: OpenApiResponse(description="no such prompt, label or version"),
            410: OpenApiResponse(description="the version was deleted"),
            400: OpenApiResponse(description="bad input"),
        },
    )
    def get(self, request: Request, name: str) -> Response:
        query = s.ServeQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        data = query.validated_data
        label: str | None = None
        if "version" in data:
            version = _version_or_gone(_prompt_or_404(name), data["version"])
        else:
            label = data.get("label", "production")
            try:
                row = PromptLabel.objects.select_related("version__prompt").get(prompt__name=name, name=label)
            except PromptLabel.DoesNotExist:
                if not Prompt.objects.filter(name=name).exists():
                    raise exceptions.NotFound(f"no prompt named {name!r}") from None
                raise exceptions.NotFound(f"prompt {name!r} has no label {label!r}", code="label_not_found") from None
            version = row.version
        inputs = data.get("inputs")
        tag = version.content_hash
        if inputs is not None:
            tag = hashlib.sha256(f"{version.content_hash}:{canonical_hash(inputs)}".encode()).hexdigest()
        etag = quote_etag(tag)
        headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Prompt-Version": str(version.number)}
        wanted = request.headers.get("If-None-Match", "")
        if wanted:
            tags = parse_etags(wanted)
            if "*" in tags or any(t.removeprefix("W/") == etag for t in tags):
                metrics.record_prompt_fetch(label, not_modified=True)
                return Response(status=status.HTTP_304_NOT_MODIFIED, headers=headers)
        body: dict[str, Any] = {
            "prompt": version.prompt.name,
            "label": label,
            "version": version.number,
            "content_hash": version.content_hash,
            "template": version.template,
            "system_message": version.system_message,
            "examples": version.examples,
            "variables": version.variables,
            "params": version.params,
        }
        if inputs is not None:
            try:
                body["messages"] = version.render_messages(inputs)
            except PromptTemplateError as exc:
                raise exceptions.ValidationError({"inputs": str(exc)}) from None
        metrics.record_prompt_fetch(label, not_modified=False)
        return Response(body, headers=headers)


# --- artifacts, fine-tunes, scaling, stacks ---------------------------------------------------------------------


@extend_schema_view(list=extend_schema(summary="Model artifacts (filter by tag, source_kind, dtype, parent)"))
class ArtifactViewSet(CrudViewSet):
    serializer_class = s.ArtifactSerializer
    filterset_class = filters.ArtifactFilter
    lookup_value_regex = ID_RE
    audit_type = "artifact"
    action_roles = {"create": Role.ADMIN}
    queryset = ModelArtifact.objects.prefetch_related("tags").order_by("name", "-created_at", "id")


class FineTuneViewSet(CrudViewSet):
    serializer_class = s.FineTuneSerializer
    filterset_class = filters.FineTuneFilter
    lookup_value_regex = ID_RE
    audit_type = "finetune"
    queryset = FineTune.objects.order_by("name")


@extend_schema_view(
    list=extend_schema(summary="Fine-tune jobs, newest first (filter by status, method, base_artifact, name)"),
    retrieve=extend_schema(summary="One job: status, progress, loss curve, time, device and the registered result"),
    create=extend_schema(
        summary="Start a fine-tune: checked now (hyperparameters, trainable base, data), trained by a worker on the "
        "training queue; an identical request returns the job that trains or trained it (200)",
        request=s.FineTuneJobCreateSerializer,
        responses={201: s.FineTuneJobSerializer, 200: s.FineTuneJobSerializer, **ERRORS},
    ),
)
class FineTuneJobViewSet(AuditedViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin):
    serializer_class = s.FineTuneJobSerializer
    filterset_class = filters.FineTuneJobFilter
    lookup_value_regex = ID_RE
    audit_type = "finetunejob"
    queryset = FineTuneJob.objects.select_related(
        "prompt_version__prompt", "created_by", "fine_tune", "base_artifact", "dataset"
    ).order_by("-created_at", "-id")

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        from workers import finetuning

        body = s.FineTuneJobCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        try:
            with transaction.atomic():
                job, created = finetuning.create_job(
                    name=data["name"],
                    base_artifact=data["base_artifact"],
                    dataset=data["dataset"],
                    prompt_version=data["version"],
                    method=data["method"],
                    hyperparameters=data["hyperparameters"],
                    seed=data["seed"],
                    created_by=request.user,
                )
                queued = finetuning.start_job(job) if data["start"] else False
                if created:
                    self.record(
                        "create",
                        job,
                        base_artifact=job.base_artifact_id,
                        dataset=job.dataset_id,
                        prompt_version=str(job.prompt_version),
                        method=job.method,
                        spec_hash=job.spec_hash,
                        started=queued,
                    )
        except finetuning.FineTuneError as exc:
            raise exceptions.ValidationError({exc.field: str(exc)}) from None
        code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        return Response(self.get_serializer(job).data, status=code)

    @extend_schema(
        summary="Queue a pending job again (safe: a job already claimed ignores the message)",
        request=None,
        responses={200: s.FineTuneJobSerializer, 409: OpenApiResponse()},
    )
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str) -> Response:
        from workers import finetuning

        job = self.get_object()
        with transaction.atomic():
            if not finetuning.start_job(job):
                raise Conflict(
                    f"fine-tune job {job.pk} is {job.status}; only a pending job can be started", code="not_pending"
                )
            self.record("start", job)
        return Response(self.get_serializer(job).data)

    @extend_schema(
        summary="Cancel a job: a pending one at once, a running one within a training step; nothing is registered",
        request=None,
        responses={200: s.FineTuneJobSerializer, 409: OpenApiResponse()},
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str) -> Response:
        from workers import finetuning

        job = self.get_object()
        with transaction.atomic():
            if not finetuning.cancel_job(job):
                raise Conflict(f"fine-tune job {job.pk} is already {job.status}", code="finished")
            self.record("cancel", job)
        job.refresh_from_db()
        return Response(self.get_serializer(job).data)


class ScalingConfigViewSet(CrudViewSet):
    serializer_class = s.ScalingConfigSerializer
    filterset_class = filters.ScalingConfigFilter
    lookup_value_regex = ID_RE
    audit_type = "scaling"
    queryset = ScalingConfig.objects.order_by("n_samples", "name")


@extend_schema_view(list=extend_schema(summary="Stacks (filter by tag, prompt, artifact, scaling, fine_tune)"))
class StackViewSet(CrudViewSet):
    serializer_class = s.StackSerializer
    filterset_class = filters.StackFilter
    lookup_value_regex = ID_RE
    audit_type = "stack"
    queryset = (
        Stack.objects.select_related("prompt", "prompt_version__prompt", "scaling", "fine_tune", "artifact")
        .prefetch_related("tags")
        .order_by("name")
    )


# --- datasets ---------------------------------------------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(summary="Datasets (filter by tag, name, scorer)"),
    create=extend_schema(
        summary="Upload a JSONL or CSV dataset: the whole file is checked before anything is stored",
        request={"multipart/form-data": s.DatasetUploadSerializer, "application/json": s.DatasetUploadSerializer},
        responses={201: s.DatasetSerializer, 200: s.DatasetSerializer, 413: OpenApiResponse(), **ERRORS},
    ),
)
class DatasetViewSet(CrudViewSet):
    serializer_class = s.DatasetSerializer
    filterset_class = filters.DatasetFilter
    lookup_value_regex = ID_RE
    audit_type = "dataset"
    queryset = Dataset.objects.prefetch_related("tags").order_by("name", "-created_at", "id")

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        upload = s.DatasetUploadSerializer(data=request.data)
        upload.is_valid(raise_exception=True)
        data = upload.validated_data
        scoring = {"scorer": data["scorer"], "scorer_pattern": data.get("scorer_pattern", "")}
        source: Any = data.get("file")
        if source is None:
            source = io.StringIO(data["content"])
            source.name = f"content.{data['format']}"
        elif source.size > MAX_UPLOAD_BYTES:
            raise PayloadTooLarge(f"the file is {source.size} bytes; the limit is {MAX_UPLOAD_BYTES}")
        try:
            with transaction.atomic():
                dataset, created = import_dataset(
                    source,
                    name=data["name"],
                    fmt=data.get("format"),
                    description=data.get("description", ""),
                    **scoring,
                )
                if "tags" in data:
                    dataset.tags.set(Tag.get_many(data["tags"]))
                if created:
                    self.record("create", dataset, items=dataset.item_count, content_hash=dataset.content_hash)
        except DatasetImportError as exc:
            raise exceptions.ValidationError({"file": str(exc)}) from None
        code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        return Response(s.DatasetSerializer(dataset).data, status=code)

    @extend_schema(
        summary="A dataset's items",
        parameters=[OpenApiParameter("kind", OpenApiTypes.STR, enum=["", "harmful", "benign"])],
        responses={200: s.DatasetItemSerializer(many=True)},
    )
    @action(detail=True, methods=["get"], filterset_class=None)
    def items(self, request: Request, pk: str) -> Response:
        dataset = self.get_object()
        items = _filtered(filters.DatasetItemFilter, request, dataset.items.order_by("index"))
        page = self.paginate_queryset(items)
        return self.get_paginated_response(s.DatasetItemSerializer(page, many=True).data)


# --- evaluation runs ----------------------------------------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(summary="Evaluation runs (filter by stack, dataset, prompt, status)"),
    create=extend_schema(
        summary="Create a run of a stack on a dataset (prompt version and artifact pinned now) and queue it",
        request=s.RunCreateSerializer,
        responses={201: s.RunSerializer, **ERRORS},
    ),
)
class RunViewSet(
    AuditedViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, mixins.DestroyModelMixin
):
    serializer_class = s.RunSerializer
    filterset_class = filters.RunFilter
    lookup_value_regex = ID_RE
    audit_type = "run"
    queryset = EvaluationRun.objects.select_related("stack", "dataset", "prompt_version__prompt", "artifact").order_by(
        "-created_at", "-id"
    )

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        from workers import evaluation

        body = s.RunCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        stack, dataset = body.validated_data["stack"], body.validated_data["dataset"]
        try:
            with transaction.atomic():
                run = evaluation.create_run(stack, dataset)
                if body.validated_data["start"]:
                    evaluation.start_run(run)
                self.record("create", run, stack=stack.name, dataset=dataset.pk, started=body.validated_data["start"])
        except (evaluation.RunNotRunnable, PromptLabel.DoesNotExist) as exc:
            raise exceptions.ValidationError({"stack": str(exc)}) from None
        return Response(self.get_serializer(run).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Queue a pending run", request=None, responses={200: s.RunSerializer, 409: OpenApiResponse()}
    )
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str) -> Response:
        from workers import evaluation

        run = self.get_object()
        if run.status != EvaluationRun.Status.PENDING:
            raise Conflict(f"run {run.pk} is {run.status}; only a pending run can be started", code="not_pending")
        with transaction.atomic():
            evaluation.start_run(run)
            self.record("start", run)
        return Response(self.get_serializer(run).data)

    @extend_schema(summary="Cancel a run", request=None, responses={200: s.RunSerializer, 409: OpenApiResponse()})
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str) -> Response:
        from workers import evaluation

        run = self.get_object()
        with transaction.atomic():
            if not evaluation.cancel_run(run):
                raise Conflict(f"run {run.pk} is already {run.status}", code="finished")
            self.record("cancel", run)
        run.refresh_from_db()
        return Response(self.get_serializer(run).data)

    @extend_schema(
        summary="Per-item results",
        parameters=[
            OpenApiParameter("kind", OpenApiTypes.STR, enum=["", "harmful", "benign"]),
            OpenApiParameter("refused", OpenApiTypes.BOOL),
            OpenApiParameter("correct", OpenApiTypes.BOOL, description="score 1 (true) or 0 (false)"),
        ],
        responses={200: s.ItemResultSerializer(many=True)},
    )
    @action(detail=True, methods=["get"], filterset_class=None)
    def results(self, request: Request, pk: str) -> Response:
        run = self.get_object()
        results = _filtered(
            filters.ItemResultFilter,
            request,
            ItemResult.objects.filter(run=run).select_related("item").order_by("item__index"),
        )
        page = self.paginate_queryset(results)
        return self.get_paginated_response(s.ItemResultSerializer(page, many=True).data)

    @extend_schema(
        summary="All results as a CSV or JSON file",
        parameters=[s.ExportQuerySerializer],
        responses={(200, "text/csv"): OpenApiTypes.STR, (200, "application/json"): OpenApiTypes.OBJECT},
    )
    @action(detail=True, methods=["get"], filterset_class=None, pagination_class=None)
    def export(self, request: Request, pk: str) -> HttpResponseBase:
        run = self.get_object()
        query = s.ExportQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        disposition = f'attachment; filename="run-{run.pk}.{query.validated_data["format"]}"'
        if query.validated_data["format"] == "csv":
            response = StreamingHttpResponse(reports.export_csv(run), content_type="text/csv; charset=utf-8")
            response["Content-Disposition"] = disposition
            return response
        return Response(reports.export_json(run), headers={"Content-Disposition": disposition})

    @extend_schema(
        summary="Compare two runs on the same dataset: metric deltas (b - a) and per-item disagreements",
        parameters=[s.CompareQuerySerializer],
        responses={200: OpenApiTypes.OBJECT, **ERRORS},
    )
    @action(detail=False, methods=["get"], filterset_class=None, pagination_class=None)
    def compare(self, request: Request) -> Response:
        query = s.CompareQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        runs = {r.pk: r for r in self.get_queryset().filter(pk__in=query.validated_data.values())}
        for field in ("a", "b"):
            if query.validated_data[field] not in runs:
                raise exceptions.ValidationError({field: f"no run {query.validated_data[field]}"})
        return Response(reports.compare_runs(runs[query.validated_data["a"]], runs[query.validated_data["b"]]))


# --- access -------------------------------------------------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(summary="Your API tokens (admins: ?all=true for everyone's)"),
    create=extend_schema(
        summary="Create a token: its secret is in the response once and never again",
        request=s.TokenSerializer,
        responses={201: s.NewTokenSerializer, **ERRORS},
    ),
    destroy=extend_schema(summary="Revoke a token"),
)
class TokenViewSet(
    AuditedViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, mixins.DestroyModelMixin
):
    serializer_class = s.TokenSerializer
    filterset_class = filters.TokenFilter
    lookup_value_regex = ID_RE
    audit_type = "token"
    write_role = Role.VIEWER
    delete_role = Role.VIEWER

    def get_queryset(self) -> QuerySet[ApiToken]:
        tokens = ApiToken.objects.select_related("user").order_by("-created_at", "-id")
        if getattr(self, "swagger_fake_view", False):
            return tokens.none()
        everyone = self.request.query_params.get("all", "").lower() in ("1", "true", "yes")
        if everyone and access.has_role(self.request.user, Role.ADMIN, request_token(self.request)):
            return tokens
        if self.action == "destroy" and access.has_role(self.request.user, Role.ADMIN, request_token(self.request)):
            return tokens
        return tokens.filter(user=self.request.user)

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        scope = serializer.validated_data.get("scope", ApiToken.Scope.READ)
        if scope == ApiToken.Scope.WRITE:
            actor(request).require(Role.EDITOR, "create a write token")
        with transaction.atomic():
            token, raw = access.create_token(
                request.user,
                serializer.validated_data["name"],
                scope,
                expires_at=serializer.validated_data.get("expires_at"),
            )
            self.record("create", token, scope=scope)
        data = dict(s.TokenSerializer(token).data)
        data["token"] = raw
        return Response(data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance: Model) -> None:
        assert isinstance(instance, ApiToken)
        with transaction.atomic():
            if access.revoke_token(instance):
                self.record("revoke", instance, owner=instance.user.get_username())


@extend_schema_view(list=extend_schema(summary="The audit log: every write, newest first"))
class AuditViewSet(Base, viewsets.ReadOnlyModelViewSet):
    serializer_class = s.AuditEntrySerializer
    filterset_class = filters.AuditFilter
    lookup_value_regex = ID_RE
    queryset = AuditEntry.objects.select_related("token").order_by("-at", "-id")


class TagViewSet(Base, viewsets.ReadOnlyModelViewSet):
    serializer_class = s.TagSerializer
    lookup_field = "name"
    lookup_value_regex = r"[a-z0-9][a-z0-9_.-]{0,49}"
    queryset = Tag.objects.order_by("name")
    filterset_class = None


class MeView(Base, APIView):
    @extend_schema(summary="Who the request authenticates as, and the role it acts with", responses=s.MeSerializer)
    def get(self, request: Request) -> Response:
        token = request_token(request)
        return Response(
            {
                "username": request.user.get_username(),
                "role": access.effective_role(request.user, token),
                "token_scope": token.scope if token else None,
            }
        )
