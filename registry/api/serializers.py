"""Serializers: the API's shapes, with every limit and check the registry needs before it writes."""

from __future__ import annotations

import json
import math
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models, transaction
from rest_framework import serializers
from rest_framework.validators import UniqueValidator

from registry.datasets import FORMATS
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
    PromptLabel,
    PromptVersion,
    ScalingConfig,
    Stack,
    Tag,
)

MAX_TEXT = 100_000  # characters in a template, system message or description
MAX_JSON_BYTES = 200_000  # serialised size of examples, params, metadata, hyperparameters
MAX_EXAMPLES = 100
MAX_VARIABLES = 50
MAX_TAGS = 20
MAX_UPLOAD_CHARS = 20_000_000
INT32_MAX = 2**31 - 1


def _check_json_value(value: Any, path: str = "") -> None:
    if isinstance(value, str) and "\x00" in value:
        raise serializers.ValidationError(f"{path or 'value'} contains a NUL character (U+0000)")
    if isinstance(value, float) and not math.isfinite(value):
        raise serializers.ValidationError(f"{path or 'value'} is not a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_json_value(key, path)
            _check_json_value(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_value(item, f"{path}[{index}]")


class SafeJSONField(serializers.JSONField):
    """JSON that PostgreSQL can store and the API can render again: no NUL, no NaN, bounded size, and of the
    expected top-level type."""

    def __init__(self, *, kind: type | None = None, max_bytes: int = MAX_JSON_BYTES, **kwargs: Any) -> None:
        self.kind = kind
        self.max_bytes = max_bytes
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> Any:
        value = super().to_internal_value(data)
        if self.kind is not None and not isinstance(value, self.kind):
            raise serializers.ValidationError(f"must be a JSON {'object' if self.kind is dict else 'array'}")
        _check_json_value(value)
        try:
            size = len(json.dumps(value, ensure_ascii=False, allow_nan=False))
        except ValueError:
            raise serializers.ValidationError("is not valid JSON") from None
        if size > self.max_bytes:
            raise serializers.ValidationError(f"is {size} characters of JSON; the limit is {self.max_bytes}")
        return value


class TagsField(serializers.ListField):
    child = serializers.RegexField(r"^" + Tag.NAME_RE.pattern + r"\Z", max_length=50)

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("required", False)
        kwargs.setdefault("max_length", MAX_TAGS)
        kwargs.setdefault("help_text", "lower-case tags, e.g. team-search")
        super().__init__(**kwargs)

    def to_representation(self, data: Any) -> list[str]:
        if isinstance(data, models.Manager):
            return [tag.name for tag in data.all()]
        return list(data)


class TaggedSerializer(serializers.ModelSerializer):
    """Saves `tags` (a list of names) after the instance, creating tags that are new."""

    def _save_tags(self, instance: models.Model, tags: list[str] | None) -> None:
        if tags is not None:
            instance.tags.set(Tag.get_many(tags))  # type: ignore[attr-defined]

    def create(self, validated_data: dict[str, Any]) -> Any:
        tags = validated_data.pop("tags", None)
        with transaction.atomic():
            instance = super().create(validated_data)
            self._save_tags(instance, tags)
        return instance

    def update(self, instance: Any, validated_data: dict[str, Any]) -> Any:
        tags = validated_data.pop("tags", None)
        with transaction.atomic():
            instance = super().update(instance, validated_data)
            self._save_tags(instance, tags)
        return instance


class CleanedSerializer(serializers.ModelSerializer):
    """Runs the model's own clean() (and field validation) on the would-be instance before saving."""

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        model = self.Meta.model
        instance = model(**{k: v for k, v in attrs.items() if k not in ("tags",)})
        if self.instance is not None:
            for field in model._meta.concrete_fields:
                if field.name not in attrs:
                    setattr(instance, field.attname, getattr(self.instance, field.attname))
            instance.pk = self.instance.pk
        exclude = [f.name for f in model._meta.concrete_fields if f.name not in attrs and self.instance is None]
        try:
            instance.full_clean(exclude=exclude, validate_unique=False, validate_constraints=False)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(
                exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
            ) from None
        return attrs


# --- prompts ---------------------------------------------------------------------------------------------------


class PromptSerializer(TaggedSerializer):
    tags = TagsField()
    description = serializers.CharField(max_length=MAX_TEXT, required=False, allow_blank=True)
    labels = serializers.SerializerMethodField(help_text="label name -> version number")
    latest_version = serializers.SerializerMethodField()
    version_count = serializers.SerializerMethodField()

    class Meta:
        model = Prompt
        fields = ["name", "description", "tags", "labels", "latest_version", "version_count", "created_at"]
        read_only_fields = ["created_at"]

    def validate_name(self, value: str) -> str:
        if self.instance is not None and value != self.instance.name:
            raise serializers.ValidationError("a prompt's name cannot change: clients fetch it by name")
        return value

    def get_labels(self, obj: Prompt) -> dict[str, int]:
        return {label.name: label.version.number for label in obj.labels.all()}

    def get_latest_version(self, obj: Prompt) -> int | None:
        if hasattr(obj, "latest_number"):
            return obj.latest_number  # type: ignore[no-any-return]
        return obj.versions.aggregate(latest=models.Max("number"))["latest"]  # type: ignore[no-any-return]

    def get_version_count(self, obj: Prompt) -> int:
        if hasattr(obj, "number_of_versions"):
            return int(obj.number_of_versions)
        return obj.versions.count()


class VersionNumberField(serializers.IntegerField):
    """A version given and shown by its number."""

    def to_representation(self, value: Any) -> int:
        return int(value.number if isinstance(value, PromptVersion) else value)


def _content_field(message: str) -> str:
    """The version field a PromptVersion.validate_content message is about."""
    for prefix, field in (
        ("system message", "system_message"),
        ("example", "examples"),
        ("unknown parameter", "params"),
        ("variables", "variables"),
    ):
        if message.startswith(prefix):
            return field
    return "template"


class PromptVersionSerializer(serializers.ModelSerializer):
    prompt = serializers.SlugRelatedField(slug_field="name", read_only=True)
    template = serializers.CharField(max_length=MAX_TEXT, trim_whitespace=False)
    system_message = serializers.CharField(max_length=MAX_TEXT, required=False, allow_blank=True, trim_whitespace=False)
    variables = serializers.ListField(
        child=serializers.CharField(max_length=100), max_length=MAX_VARIABLES, required=False, default=list
    )
    examples = SafeJSONField(kind=list, required=False, default=list, help_text='[{"inputs": {...}, "output": "..."}]')
    params = SafeJSONField(
        kind=dict, required=False, default=dict, help_text="temperature, top_p, top_k, max_new_tokens"
    )
    commit_message = serializers.CharField(max_length=10_000, required=False, allow_blank=True)
    parent = VersionNumberField(
        required=False, allow_null=True, min_value=1, max_value=INT32_MAX, help_text="parent version number"
    )
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    labels = serializers.SerializerMethodField()

    class Meta:
        model = PromptVersion
        fields = [
            "prompt",
            "number",
            "template",
            "system_message",
            "variables",
            "examples",
            "params",
            "commit_message",
            "parent",
            "content_hash",
            "created_by",
            "created_at",
            "labels",
        ]
        read_only_fields = ["number", "content_hash", "created_at"]

    def get_labels(self, obj: PromptVersion) -> list[str]:
        return sorted(label.name for label in obj.labels.all())

    def validate_examples(self, value: list[Any]) -> list[Any]:
        if len(value) > MAX_EXAMPLES:
            raise serializers.ValidationError(f"at most {MAX_EXAMPLES} examples")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        prompt: Prompt = self.context["prompt"]
        number = attrs.pop("parent", None)
        parent = None
        if number is not None:
            parent = prompt.versions.filter(number=number).first()
            if parent is None:
                raise serializers.ValidationError({"parent": f"prompt {prompt.name!r} has no version {number}"})
        attrs["parent_version"] = parent
        try:
            PromptVersion.validate_content(
                attrs["template"],
                attrs.get("system_message", ""),
                attrs.get("examples", []),
                attrs.get("variables", []),
                attrs.get("params", {}),
            )
        except DjangoValidationError as exc:
            raise serializers.ValidationError({_content_field(exc.messages[0]): exc.messages}) from None
        return attrs

    def create(self, validated_data: dict[str, Any]) -> PromptVersion:
        prompt: Prompt = self.context["prompt"]
        version, created = prompt.create_version(
            template=validated_data["template"],
            variables=validated_data.get("variables", []),
            system_message=validated_data.get("system_message", ""),
            examples=validated_data.get("examples", []),
            params=validated_data.get("params", {}),
            commit_message=validated_data.get("commit_message", ""),
            parent=validated_data.get("parent_version"),
            created_by=self.context.get("user"),
        )
        self.created = created
        return version


class LabelSerializer(serializers.ModelSerializer):
    prompt = serializers.SlugRelatedField(slug_field="name", read_only=True)
    version = serializers.SerializerMethodField()
    content_hash = serializers.SerializerMethodField()

    class Meta:
        model = PromptLabel
        fields = ["prompt", "name", "version", "content_hash", "moved_at"]

    def get_version(self, obj: PromptLabel) -> int:
        return obj.version.number

    def get_content_hash(self, obj: PromptLabel) -> str:
        return obj.version.content_hash


class LabelMoveInputSerializer(serializers.Serializer):
    version = serializers.IntegerField(min_value=1, max_value=INT32_MAX, help_text="the version number to point at")
    reason = serializers.CharField(max_length=2000, required=False, allow_blank=True, default="")
    expected_version = serializers.IntegerField(
        min_value=1,
        max_value=INT32_MAX,
        required=False,
        allow_null=True,
        help_text="move only if the label still points at this version (null: only if the label is new)",
    )


class LabelRollbackInputSerializer(serializers.Serializer):
    to_version = serializers.IntegerField(
        min_value=1,
        max_value=INT32_MAX,
        required=False,
        allow_null=True,
        help_text="a version the label held before; default: the one before its latest move",
    )
    reason = serializers.CharField(max_length=2000, required=False, allow_blank=True, default="")
    expected_version = serializers.IntegerField(min_value=1, max_value=INT32_MAX, required=False, allow_null=True)


class LabelMoveSerializer(serializers.ModelSerializer):
    prompt = serializers.SerializerMethodField()
    label = serializers.SerializerMethodField()
    from_version = serializers.SerializerMethodField()
    to_version = serializers.SerializerMethodField()
    moved_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = LabelMove
        fields = ["id", "prompt", "label", "from_version", "to_version", "moved_by", "moved_at", "reason"]

    def get_prompt(self, obj: LabelMove) -> str:
        return obj.label.prompt.name

    def get_label(self, obj: LabelMove) -> str:
        return obj.label.name

    def get_from_version(self, obj: LabelMove) -> int | None:
        return obj.from_version.number if obj.from_version else None

    def get_to_version(self, obj: LabelMove) -> int:
        return obj.to_version.number


class LabelPolicySerializer(CleanedSerializer):
    prompt = serializers.SlugRelatedField(
        slug_field="name", queryset=Prompt.objects.all(), required=False, allow_null=True
    )
    label = serializers.RegexField(r"^" + PromptLabel.NAME_RE.pattern + r"\Z", max_length=50, required=False)

    class Meta:
        model = LabelPolicy
        fields = [
            "id",
            "prompt",
            "label",
            "required_role",
            "gate_dataset",
            "gate_metric",
            "higher_is_better",
            "tolerance",
        ]
        validators: list[Any] = []

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        prompt = attrs.get("prompt", self.instance.prompt if self.instance else None)
        label = attrs.get("label", self.instance.label if self.instance else "production")
        clash = LabelPolicy.objects.filter(prompt=prompt, label=label)
        if self.instance is not None:
            clash = clash.exclude(pk=self.instance.pk)
        if clash.exists():
            raise serializers.ValidationError({"label": f"a policy for {label!r} on {prompt or 'every prompt'} exists"})
        return attrs


class DiffQuerySerializer(serializers.Serializer):
    from_version = serializers.IntegerField(min_value=1, max_value=INT32_MAX)
    to_version = serializers.IntegerField(min_value=1, max_value=INT32_MAX)


class ServeQuerySerializer(serializers.Serializer):
    label = serializers.RegexField(r"^" + PromptLabel.NAME_RE.pattern + r"\Z", max_length=50, required=False)
    version = serializers.IntegerField(min_value=1, max_value=INT32_MAX, required=False)
    inputs = SafeJSONField(
        kind=dict,
        binary=True,
        required=False,
        max_bytes=50_000,
        help_text='JSON object of template variables; when given, the response carries the rendered "messages"',
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "label" in attrs and "version" in attrs:
            raise serializers.ValidationError("give a label or a version, not both")
        return attrs


class ServedPromptSerializer(serializers.Serializer):
    prompt = serializers.CharField()
    label = serializers.CharField(allow_null=True)
    version = serializers.IntegerField()
    content_hash = serializers.CharField()
    template = serializers.CharField()
    system_message = serializers.CharField()
    examples = serializers.JSONField()
    variables = serializers.ListField(child=serializers.CharField())
    params = serializers.JSONField()
    messages = serializers.ListField(child=serializers.DictField(child=serializers.CharField()), required=False)


# --- artifacts, fine-tunes, scaling ----------------------------------------------------------------------------


class ArtifactSerializer(TaggedSerializer, CleanedSerializer):
    tags = TagsField()
    metadata = SafeJSONField(kind=dict, required=False, default=dict)
    sha256 = serializers.RegexField(
        r"^[0-9a-f]{64}\Z",
        help_text="sha256 over the ONNX files",
        validators=[UniqueValidator(ModelArtifact.objects.all(), message="an artifact with this sha256 exists")],
    )
    source_sha256 = serializers.RegexField(r"^[0-9a-f]{64}\Z")
    price_per_1k_tokens = serializers.DecimalField(max_digits=12, decimal_places=6, min_value=0, required=False)
    parameter_count = serializers.IntegerField(min_value=0, max_value=2**62, required=False)
    size_bytes = serializers.IntegerField(min_value=0, max_value=2**62, required=False)

    IMMUTABLE = (
        "sha256",
        "path",
        "parameter_count",
        "dtype",
        "quantisation",
        "size_bytes",
        "source_kind",
        "source_path",
        "source_sha256",
        "parent",
    )

    class Meta:
        model = ModelArtifact
        fields = [
            "id",
            "name",
            "sha256",
            "path",
            "parameter_count",
            "dtype",
            "quantisation",
            "size_bytes",
            "source_kind",
            "source_path",
            "source_sha256",
            "parent",
            "price_per_1k_tokens",
            "metadata",
            "tags",
            "created_at",
        ]
        read_only_fields = ["created_at"]

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if self.instance is not None:
            changed = [name for name in self.IMMUTABLE if name in attrs and attrs[name] != getattr(self.instance, name)]
            if changed:
                raise serializers.ValidationError(
                    {
                        name: "an artifact's files and provenance cannot change; register a new artifact"
                        for name in changed
                    }
                )
        return super().validate(attrs)


class FineTuneSerializer(CleanedSerializer):
    name = serializers.RegexField(
        r"^[-\w.]{1,200}\Z",
        max_length=200,
        validators=[UniqueValidator(FineTune.objects.all(), message="a fine-tune with this name exists")],
    )
    training_dataset_hash = serializers.RegexField(r"^[0-9a-f]{64}\Z")
    hyperparameters = SafeJSONField(kind=dict, required=False, default=dict)

    class Meta:
        model = FineTune
        fields = [
            "id",
            "name",
            "base_artifact",
            "result_artifact",
            "training_dataset_hash",
            "method",
            "hyperparameters",
            "job",
            "training_dataset",
            "seed",
            "device",
            "final_loss",
            "training_seconds",
            "worker_seconds",
            "cost",
            "created_at",
        ]
        # What a job measured is its record: shown, never written through the API.
        read_only_fields = [
            "job",
            "training_dataset",
            "seed",
            "device",
            "final_loss",
            "training_seconds",
            "worker_seconds",
            "cost",
            "created_at",
        ]

    LINEAGE = ("base_artifact", "result_artifact", "training_dataset_hash", "method", "hyperparameters")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if self.instance is not None and self.instance.job_id:
            changed = [name for name in self.LINEAGE if name in attrs and attrs[name] != getattr(self.instance, name)]
            if changed:
                raise serializers.ValidationError(
                    {name: "this fine-tune was registered by its job: its lineage cannot change" for name in changed}
                )
        return super().validate(attrs)


class FineTuneJobSerializer(serializers.ModelSerializer):
    prompt = serializers.SerializerMethodField()
    prompt_version = serializers.SerializerMethodField()
    progress = serializers.FloatField(read_only=True)
    fine_tune = serializers.SerializerMethodField(help_text="the registered fine-tune's name, once it succeeded")
    result_artifact = serializers.SerializerMethodField(help_text="the registered result artifact's id")
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    loss_curve = serializers.JSONField(read_only=True, help_text="[[step, loss of that step's batch], ...]")
    hyperparameters = serializers.JSONField(read_only=True)

    class Meta:
        model = FineTuneJob
        fields = [
            "id",
            "name",
            "status",
            "base_artifact",
            "dataset",
            "prompt",
            "prompt_version",
            "method",
            "hyperparameters",
            "seed",
            "spec_hash",
            "steps_done",
            "steps_total",
            "progress",
            "initial_loss",
            "final_loss",
            "loss_curve",
            "cancel_requested",
            "device",
            "training_seconds",
            "worker_seconds",
            "worker",
            "error",
            "fine_tune",
            "result_artifact",
            "created_by",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields

    def get_prompt(self, obj: FineTuneJob) -> str:
        return obj.prompt_version.prompt.name

    def get_prompt_version(self, obj: FineTuneJob) -> int:
        return obj.prompt_version.number

    def get_fine_tune(self, obj: FineTuneJob) -> str | None:
        fine_tune = getattr(obj, "fine_tune", None)
        return fine_tune.name if fine_tune is not None else None

    def get_result_artifact(self, obj: FineTuneJob) -> int | None:
        fine_tune = getattr(obj, "fine_tune", None)
        return fine_tune.result_artifact_id if fine_tune is not None else None


class FineTuneJobCreateSerializer(serializers.Serializer):
    name = serializers.RegexField(r"^[-\w.]{1,200}\Z", max_length=200, help_text="the resulting fine-tune's name")
    base_artifact = serializers.PrimaryKeyRelatedField(
        queryset=ModelArtifact.objects.all(), help_text="imported from GGUF or a Hugging Face folder, or a fine-tune"
    )
    dataset = serializers.PrimaryKeyRelatedField(
        queryset=Dataset.objects.all(), help_text="training pairs: inputs -> expected answer"
    )
    prompt = serializers.SlugRelatedField(slug_field="name", queryset=Prompt.objects.all())
    prompt_version = serializers.IntegerField(
        min_value=1, max_value=INT32_MAX, required=False, help_text="renders the inputs; or give prompt_label"
    )
    prompt_label = serializers.RegexField(
        r"^" + PromptLabel.NAME_RE.pattern + r"\Z", max_length=50, required=False, help_text="resolved now"
    )
    method = serializers.ChoiceField(choices=FineTuneJob.Method.choices, default=FineTuneJob.Method.LORA)
    hyperparameters = SafeJSONField(
        kind=dict,
        required=False,
        default=dict,
        max_bytes=10_000,
        help_text="steps or epochs, batch_size, learning_rate, warmup_steps, weight_decay, max_grad_norm, max_length; "
        "LoRA: lora_r, lora_alpha, lora_dropout, target_modules",
    )
    seed = serializers.IntegerField(min_value=0, max_value=INT32_MAX, default=0)
    start = serializers.BooleanField(default=True, help_text="queue it for a training worker at once")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        prompt: Prompt = attrs["prompt"]
        if ("prompt_version" in attrs) == ("prompt_label" in attrs):
            raise serializers.ValidationError(
                {"prompt_version": "give exactly one of prompt_version (a version number) or prompt_label"}
            )
        if "prompt_version" in attrs:
            version = prompt.versions.filter(number=attrs["prompt_version"]).first()
            if version is None:
                raise serializers.ValidationError(
                    {"prompt_version": f"prompt {prompt.name!r} has no version {attrs['prompt_version']}"}
                )
        else:
            try:
                version = prompt.version_for_label(attrs["prompt_label"])
            except PromptLabel.DoesNotExist as exc:
                raise serializers.ValidationError({"prompt_label": str(exc)}) from None
        attrs["version"] = version
        return attrs


class ScalingConfigSerializer(CleanedSerializer):
    n_samples = serializers.IntegerField(min_value=1, max_value=64, required=False)
    temperature = serializers.FloatField(min_value=0, max_value=100, required=False)
    top_p = serializers.FloatField(min_value=0, max_value=1, required=False)
    top_k = serializers.IntegerField(min_value=0, max_value=1_000_000, required=False)
    seed = serializers.IntegerField(min_value=0, max_value=INT32_MAX, required=False)

    class Meta:
        model = ScalingConfig
        fields = ["id", "name", "n_samples", "temperature", "top_p", "top_k", "aggregation", "seed"]


# --- stacks ---------------------------------------------------------------------------------------------------


class StackSerializer(TaggedSerializer):
    tags = TagsField()
    description = serializers.CharField(max_length=MAX_TEXT, required=False, allow_blank=True)
    prompt = serializers.SlugRelatedField(slug_field="name", queryset=Prompt.objects.all())
    prompt_version = VersionNumberField(
        min_value=1, max_value=INT32_MAX, required=False, allow_null=True, help_text="pin this version number"
    )
    prompt_label = serializers.RegexField(
        r"^" + PromptLabel.NAME_RE.pattern + r"\Z",
        max_length=50,
        required=False,
        allow_blank=True,
        help_text="or follow this label",
    )
    scaling = serializers.SlugRelatedField(slug_field="name", queryset=ScalingConfig.objects.all())
    fine_tune = serializers.SlugRelatedField(
        slug_field="name", queryset=FineTune.objects.all(), required=False, allow_null=True
    )
    resolved_version = serializers.SerializerMethodField(help_text="the version a run would use now")

    class Meta:
        model = Stack
        fields = [
            "id",
            "name",
            "description",
            "tags",
            "prompt",
            "prompt_version",
            "prompt_label",
            "resolved_version",
            "scaling",
            "fine_tune",
            "artifact",
            "created_at",
        ]
        read_only_fields = ["created_at"]

    def to_representation(self, instance: Stack) -> dict[str, Any]:
        data = super().to_representation(instance)
        pinned = instance.prompt_version
        data["prompt"] = pinned.prompt.name if pinned else (instance.prompt.name if instance.prompt else None)
        return data

    def get_resolved_version(self, obj: Stack) -> int | None:
        try:
            return obj.resolve_prompt_version().number
        except PromptLabel.DoesNotExist:
            return None

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        inst = self.instance
        prompt = attrs.get("prompt") or (inst.prompt_version.prompt if inst and inst.prompt_version else None)
        prompt = prompt or (inst.prompt if inst else None)
        number = attrs.pop("prompt_version", None) if "prompt_version" in attrs else None
        label = attrs.get("prompt_label", "")
        if inst is not None and "prompt_version" not in self.initial_data and "prompt_label" not in attrs:
            number = inst.prompt_version.number if inst.prompt_version else None
            label = inst.prompt_label
        if bool(number) == bool(label):
            raise serializers.ValidationError(
                {"prompt_version": "give exactly one of prompt_version (a version number) or prompt_label"}
            )
        if number:
            version = prompt.versions.filter(number=number).first() if prompt else None
            if version is None:
                raise serializers.ValidationError({"prompt_version": f"prompt {prompt} has no version {number}"})
            attrs.update(prompt_version=version, prompt=None, prompt_label="")
        else:
            attrs.update(prompt_version=None, prompt=prompt, prompt_label=label)
        fine_tune = attrs.get("fine_tune", inst.fine_tune if inst else None)
        if fine_tune is not None and fine_tune.result_artifact_id is None:
            raise serializers.ValidationError({"fine_tune": f"fine-tune {fine_tune} has no result artifact yet"})
        return attrs


# --- datasets ---------------------------------------------------------------------------------------------------


class DatasetSerializer(TaggedSerializer):
    tags = TagsField()
    description = serializers.CharField(max_length=MAX_TEXT, required=False, allow_blank=True)

    class Meta:
        model = Dataset
        fields = [
            "id",
            "name",
            "description",
            "scorer",
            "scorer_pattern",
            "content_hash",
            "item_count",
            "tags",
            "created_at",
        ]
        read_only_fields = ["name", "scorer", "scorer_pattern", "content_hash", "item_count", "created_at"]


class DatasetUploadSerializer(serializers.Serializer):
    file = serializers.FileField(required=False, help_text="JSONL (one object a line) or CSV with a header row")
    content = serializers.CharField(
        required=False,
        max_length=MAX_UPLOAD_CHARS,
        trim_whitespace=False,
        help_text="the file's text, instead of a file upload",
    )
    format = serializers.ChoiceField(choices=FORMATS, required=False, help_text="default: from the file name")
    name = serializers.SlugField(max_length=100)
    scorer = serializers.ChoiceField(choices=Dataset.Scorer.choices, default=Dataset.Scorer.EXACT)
    scorer_pattern = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")
    description = serializers.CharField(max_length=MAX_TEXT, required=False, allow_blank=True, default="")
    tags = TagsField()

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("file" in attrs) == ("content" in attrs):
            raise serializers.ValidationError({"file": "send a file or its content, exactly one"})
        if "content" in attrs and "format" not in attrs:
            raise serializers.ValidationError({"format": "name the format (jsonl or csv) when sending content"})
        return attrs


class DatasetItemSerializer(serializers.ModelSerializer):
    class Meta:
        model = DatasetItem
        fields = ["id", "index", "key", "inputs", "expected", "kind"]


# --- evaluation runs ----------------------------------------------------------------------------------------------


class RunSerializer(serializers.ModelSerializer):
    stack = serializers.SlugRelatedField(slug_field="name", read_only=True)
    prompt = serializers.SerializerMethodField()
    prompt_version = serializers.SerializerMethodField()
    progress = serializers.FloatField(read_only=True)
    summary = serializers.JSONField(read_only=True)

    class Meta:
        model = EvaluationRun
        fields = [
            "id",
            "stack",
            "dataset",
            "prompt",
            "prompt_version",
            "artifact",
            "status",
            "items_total",
            "items_done",
            "progress",
            "provider",
            "summary",
            "error",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields

    def get_prompt(self, obj: EvaluationRun) -> str:
        return obj.prompt_version.prompt.name

    def get_prompt_version(self, obj: EvaluationRun) -> int:
        return obj.prompt_version.number


class RunCreateSerializer(serializers.Serializer):
    stack = serializers.SlugRelatedField(slug_field="name", queryset=Stack.objects.all())
    dataset = serializers.PrimaryKeyRelatedField(queryset=Dataset.objects.all())
    start = serializers.BooleanField(default=True, help_text="queue it for the workers at once")


class CompareQuerySerializer(serializers.Serializer):
    a = serializers.IntegerField(min_value=1, max_value=2**62, help_text="the baseline run")
    b = serializers.IntegerField(min_value=1, max_value=2**62, help_text="the run compared with it")


class ExportQuerySerializer(serializers.Serializer):
    format = serializers.ChoiceField(choices=["csv", "json"], default="json")


class ItemResultSerializer(serializers.ModelSerializer):
    item = serializers.CharField(source="item.key", read_only=True)
    index = serializers.IntegerField(source="item.index", read_only=True)
    kind = serializers.CharField(source="item.kind", read_only=True)
    expected = serializers.CharField(source="item.expected", read_only=True)

    class Meta:
        model = ItemResult
        fields = [
            "item",
            "index",
            "kind",
            "expected",
            "answer",
            "score",
            "refused",
            "prompt_tokens",
            "generated_tokens",
            "latency_s",
            "worker",
            "rendered_prompt",
            "samples",
        ]


# --- access ------------------------------------------------------------------------------------------------------


class TokenSerializer(serializers.ModelSerializer):
    user = serializers.SlugRelatedField(slug_field="username", read_only=True)
    active = serializers.BooleanField(source="is_active", read_only=True)
    name = serializers.CharField(max_length=100)

    class Meta:
        model = ApiToken
        fields = [
            "id",
            "name",
            "prefix",
            "scope",
            "user",
            "active",
            "created_at",
            "expires_at",
            "last_used_at",
            "revoked_at",
        ]
        read_only_fields = ["prefix", "user", "created_at", "last_used_at", "revoked_at"]


class NewTokenSerializer(TokenSerializer):
    token = serializers.CharField(read_only=True, help_text="the secret: shown once, store it now")

    class Meta(TokenSerializer.Meta):
        fields = [*TokenSerializer.Meta.fields, "token"]


class AuditEntrySerializer(serializers.ModelSerializer):
    token = serializers.SerializerMethodField()

    class Meta:
        model = AuditEntry
        fields = [
            "id",
            "at",
            "username",
            "via",
            "token",
            "action",
            "object_type",
            "object_id",
            "object_repr",
            "details",
        ]

    def get_token(self, obj: AuditEntry) -> str | None:
        return obj.token.prefix if obj.token_id and obj.token else None


class TagSerializer(serializers.ModelSerializer):
    class Meta:
        model = Tag
        fields = ["name"]


class MeSerializer(serializers.Serializer):
    username = serializers.CharField()
    role = serializers.CharField(allow_null=True)
    token_scope = serializers.CharField(allow_null=True)
