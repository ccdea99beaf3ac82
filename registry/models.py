"""The registry's records.

The four layers a team can change, from cheapest to dearest:

* prompt       -> Prompt, PromptVersion (immutable, content-hashed), PromptLabel (+ LabelMove history)
* scaling      -> ScalingConfig (N samples, sampling parameters, aggregation)
* fine-tune    -> FineTune (base artifact -> result artifact, with lineage)
* architecture -> ModelArtifact (ONNX files on disk, sha256, provenance)

A Stack pins one of each; an EvaluationRun measures a Stack on a Dataset and keeps one ItemResult per item.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.utils import timezone
from jinja2 import TemplateSyntaxError, nodes

from fulcrum import metrics
from workers import training

from . import prompting
from .optimisation import operators


def canonical_hash(payload: Any) -> str:
    """sha256 of a JSON document with sorted keys: equal content gives an equal hash."""
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ImmutableError(ValidationError):
    pass


class LabelConflict(Exception):
    """A conditional label move found the label pointing somewhere else than the caller expected."""


ANY_VERSION: Any = object()  # move_label's default `expected`: move whatever the label points at now


def _reject_dunder_access(source: str, field: str) -> None:
    """Refuse a template that reaches for `__dunder__` attributes (`''.__class__`, `cycler.__init__`).

    The sandbox stops such a template when it renders, but by then the version is stored and every run of it
    fails; rejecting it here keeps it out of the registry. Lookups the parser cannot see (a computed name) are
    still left to the sandbox.
    """
    try:
        ast = prompting._ENV.parse(source)
    except TemplateSyntaxError:
        return  # prompting.check_template reports syntax errors
    for node in ast.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        name: Any = None
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            name = node.arg.value
        elif (
            isinstance(node, nodes.Filter)
            and node.name == "attr"
            and node.args
            and isinstance(node.args[0], nodes.Const)
        ):
            name = node.args[0].value
        if isinstance(name, str) and name.startswith("__"):
            raise prompting.PromptTemplateError(
                f"{field} reads the private attribute {name!r}, which the template sandbox forbids"
            )


# --- Tags ---------------------------------------------------------------------------------------------------


class JobStatus(models.TextChoices):
    """The life of anything a worker runs: evaluation runs, fine-tune jobs and optimisation jobs share it."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Tag(models.Model):
    """A free label for grouping prompts, stacks, datasets and artifacts (e.g. team-search, experiment)."""

    NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,49}")

    name = models.CharField(max_length=50, unique=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @classmethod
    def get_many(cls, names: list[str]) -> list[Tag]:
        """The tags with these names, created when new; ValidationError for a malformed name."""
        bad = [name for name in names if not isinstance(name, str) or not cls.NAME_RE.fullmatch(name)]
        if bad:
            raise ValidationError(f"tag {bad[0]!r} must be lower-case letters, digits, '.', '-' or '_' (at most 50)")
        tags: list[Tag] = []
        for name in dict.fromkeys(names):
            tag, _ = cls.objects.get_or_create(name=name)
            tags.append(tag)
        return tags


# --- Prompt layer -------------------------------------------------------------------------------------------


class Prompt(models.Model):
    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    tags = models.ManyToManyField(Tag, blank=True, related_name="prompts")
    # The highest version number ever issued: a deleted version's number is never reused for other content.
    version_counter = models.PositiveIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def create_version(
        self,
        *,
        template: str,
        variables: list[str],
        system_message: str = "",
        examples: list[dict[str, Any]] | None = None,
        params: dict[str, Any] | None = None,
        commit_message: str = "",
        parent: PromptVersion | None = None,
        created_by: Any = None,
    ) -> tuple[PromptVersion, bool]:
        """Store a new immutable version, or return the existing one with identical content.

        Returns (version, created). Validation (template syntax, declared variables, examples) happens before
        anything is written.
        """
        examples = list(examples or [])
        params = dict(params or {})
        variables = list(variables)
        PromptVersion.validate_content(template, system_message, examples, variables, params)
        if parent is not None and parent.prompt_id != self.pk:
            raise ValidationError(f"parent {parent} does not belong to prompt {self.name!r}")
        content_hash = PromptVersion.hash_content(template, system_message, examples, variables, params)
        with transaction.atomic():
            # Lock the prompt row so two concurrent creates cannot take the same version number.
            locked = Prompt.objects.select_for_update().filter(pk=self.pk).first()
            existing = self.versions.filter(content_hash=content_hash).first()
            if existing is not None:
                return existing, False
            last = self.versions.order_by("-number").first()
            if parent is None:
                parent = last
            number = max(last.number if last else 0, locked.version_counter if locked else 0) + 1
            Prompt.objects.filter(pk=self.pk).update(version_counter=number)
            self.version_counter = number
            version = PromptVersion(
                prompt=self,
                number=number,
                template=template,
                system_message=system_message,
                examples=examples,
                variables=variables,
                params=params,
                commit_message=commit_message,
                parent=parent,
                content_hash=content_hash,
                created_by=created_by if getattr(created_by, "pk", None) else None,
            )
            version.save()
            return version, True

    def version_for_label(self, label: str) -> PromptVersion:
        try:
            return self.labels.select_related("version").get(name=label).version
        except PromptLabel.DoesNotExist:
            known = ", ".join(self.labels.values_list("name", flat=True)) or "none"
            raise PromptLabel.DoesNotExist(f"prompt {self.name!r} has no label {label!r} (labels: {known})") from None

    def move_label(
        self,
        label: str,
        version: PromptVersion,
        *,
        user: Any = None,
        reason: str = "",
        expected: PromptVersion | None | object = ANY_VERSION,
    ) -> LabelMove:
        """Point `label` at `version` (creating the label if new) and record the move. Rollback is a move.

        `expected` makes the move conditional: it goes ahead only while the label still points at that version
        (None: only while the label does not exist yet), else LabelConflict. Concurrent moves are serialised
        on the label row (on the prompt row while the label is new), so the history's chain stays unbroken.
        """
        if version.prompt_id != self.pk:
            raise ValidationError(f"version {version} does not belong to prompt {self.name!r}")
        if not PromptLabel.NAME_RE.fullmatch(label):
            raise ValidationError(f"label {label!r} must be lower-case letters, digits, '-' or '_'")
        with transaction.atomic():
            current = PromptLabel.objects.select_for_update().filter(prompt=self, name=label).first()
            if current is None:
                # Two first moves of a new label: the prompt row lock lets one create it, the other sees it.
                Prompt.objects.select_for_update().filter(pk=self.pk).first()
                current = PromptLabel.objects.select_for_update().filter(prompt=self, name=label).first()
            previous = current.version if current else None
            if expected is not ANY_VERSION and expected != previous:
                now = f"v{previous.number}" if previous else "nothing"
                wanted = f"v{expected.number}" if isinstance(expected, PromptVersion) else "nothing"
                raise LabelConflict(
                    f"label {label!r} of prompt {self.name!r} points at {now}, not {wanted}: it moved meanwhile"
                )
            if current is None:
                current = PromptLabel.objects.create(prompt=self, name=label, version=version)
            else:
                current.version = version
                current.moved_at = timezone.now()
                current.save(update_fields=["version", "moved_at"])
            transaction.on_commit(lambda: metrics.LABEL_MOVES.labels(label=label).inc())  # counted once committed
            return LabelMove.objects.create(
                label=current,
                from_version=previous,
                to_version=version,
                moved_by=user if getattr(user, "pk", None) else None,
                reason=reason,
            )


class PromptVersion(models.Model):
    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    template = models.TextField(help_text="Jinja2 (sandboxed) template of the user turn")
    system_message = models.TextField(blank=True)
    examples = models.JSONField(default=list, blank=True, help_text='few-shot: [{"inputs": {...}, "output": "..."}]')
    variables = models.JSONField(default=list, help_text="names the template may read")
    params = models.JSONField(default=dict, blank=True, help_text="model parameters, e.g. max_new_tokens")
    commit_message = models.TextField(blank=True)
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children")
    content_hash = models.CharField(max_length=64, editable=False)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(default=timezone.now)

    ALLOWED_PARAMS = {"temperature", "top_p", "top_k", "max_new_tokens"}

    class Meta:
        ordering = ["prompt", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["prompt", "number"], name="promptversion_unique_number"),
            models.UniqueConstraint(fields=["prompt", "content_hash"], name="promptversion_unique_content"),
        ]

    def __str__(self) -> str:
        return f"{self.prompt.name}@v{self.number}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None and not kwargs.pop("_allow_update", False):
            raise ImmutableError("prompt versions are immutable: create a new version instead")
        super().save(*args, **kwargs)

    @staticmethod
    def hash_content(
        template: str, system_message: str, examples: list[Any], variables: list[str], params: dict[str, Any]
    ) -> str:
        return canonical_hash(
            {
                "template": template,
                "system_message": system_message,
                "examples": examples,
                "variables": sorted(variables),
                "params": params,
            }
        )

    @classmethod
    def validate_content(
        cls,
        template: str,
        system_message: str,
        examples: list[Any],
        variables: list[str],
        params: dict[str, Any],
    ) -> None:
        if not template.strip():
            raise ValidationError("template must not be empty")
        if not all(isinstance(v, str) and v.isidentifier() for v in variables):
            raise ValidationError(f"variables must be identifiers, got {variables!r}")
        try:
            prompting.check_template(template, variables)
            prompting.check_template(system_message, variables, field="system message")
            _reject_dunder_access(template, "template")
            _reject_dunder_access(system_message, "system message")
        except prompting.PromptTemplateError as exc:
            raise ValidationError(str(exc)) from None
        for number, example in enumerate(examples, start=1):
            if not isinstance(example, dict) or not isinstance(example.get("inputs"), dict) or "output" not in example:
                raise ValidationError(f'example {number} must look like {{"inputs": {{...}}, "output": "..."}}')
            missing = set(variables) - set(example["inputs"])
            if missing:
                raise ValidationError(f"example {number} lacks variable(s): {', '.join(sorted(missing))}")
        unknown = set(params) - cls.ALLOWED_PARAMS
        if unknown:
            raise ValidationError(f"unknown parameter(s) {sorted(unknown)}; allowed: {sorted(cls.ALLOWED_PARAMS)}")

    def render_messages(self, inputs: dict[str, Any]) -> list[dict[str, str]]:
        return prompting.build_messages(
            template=self.template,
            system_message=self.system_message,
            examples=self.examples,
            declared=self.variables,
            inputs=inputs,
        )


class PromptLabel(models.Model):
    NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,49}")

    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="labels")
    name = models.CharField(max_length=50)
    # RESTRICT: a version a label points at cannot be deleted, unless the whole prompt goes.
    version = models.ForeignKey(PromptVersion, on_delete=models.RESTRICT, related_name="labels")
    moved_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["prompt", "name"]
        constraints = [models.UniqueConstraint(fields=["prompt", "name"], name="promptlabel_unique_name")]

    def __str__(self) -> str:
        return f"{self.prompt.name}:{self.name} -> v{self.version.number}"


class LabelMove(models.Model):
    label = models.ForeignKey(PromptLabel, on_delete=models.CASCADE, related_name="moves")
    from_version = models.ForeignKey(PromptVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    to_version = models.ForeignKey(PromptVersion, on_delete=models.CASCADE, related_name="+")
    moved_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    moved_at = models.DateTimeField(default=timezone.now)
    reason = models.TextField(blank=True)

    class Meta:
        ordering = ["-moved_at", "-id"]

    def __str__(self) -> str:
        start = f"v{self.from_version.number}" if self.from_version else "(new)"
        return f"{self.label.prompt.name}:{self.label.name} {start} -> v{self.to_version.number}"


# --- Architecture layer -------------------------------------------------------------------------------------


class ModelArtifact(models.Model):
    class SourceKind(models.TextChoices):
        GGUF = "gguf", "GGUF file"
        HF = "hf", "Hugging Face folder"
        ONNX = "onnx", "ONNX folder"

    name = models.CharField(max_length=200)
    sha256 = models.CharField(max_length=64, unique=True, help_text="sha256 over the ONNX files")
    path = models.CharField(max_length=1000, help_text="folder holding model.onnx and tokenizer files")
    parameter_count = models.BigIntegerField(default=0)
    dtype = models.CharField(max_length=20, default="float32")
    quantisation = models.CharField(max_length=50, blank=True, help_text="e.g. int8-dynamic; blank for none")
    size_bytes = models.BigIntegerField(default=0)
    source_kind = models.CharField(max_length=10, choices=SourceKind.choices)
    source_path = models.CharField(max_length=1000)
    source_sha256 = models.CharField(max_length=64, db_index=True)
    chat_template = models.TextField(blank=True)
    parent = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="variants",
        help_text="the artifact this one was derived from (quantisation, fine-tune)",
    )
    price_per_1k_tokens = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    price_per_device_hour = models.DecimalField(
        max_digits=12, decimal_places=6, default=0, help_text="money per hour of worker engine time on this artifact"
    )
    metadata = models.JSONField(default=dict, blank=True)
    tags = models.ManyToManyField(Tag, blank=True, related_name="artifacts")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name", "-created_at"]

    def __str__(self) -> str:
        quantisation = f"/{self.quantisation}" if self.quantisation else ""
        return f"{self.name} ({self.dtype}{quantisation}, {self.sha256[:10]})"

    def trainable_source(self) -> training.Source:
        """The weights a fine-tune of this artifact trains, read off its provenance; NotTrainable says why not.

        An ONNX graph cannot be trained, so the weights come from where the artifact came from: the GGUF file
        (de-quantised to float32 when loaded) or the Hugging Face folder it was imported from. A fine-tune's
        result was built from its merged Hugging Face folder, which Fulcrum keeps, so fine-tunes chain.
        """
        if self.quantisation or self.dtype != "float32":
            variant = f"{self.dtype}{'/' + self.quantisation if self.quantisation else ''}"
            parent = f"; fine-tune artifact {self.parent_id} ({self.parent.name}) instead" if self.parent else ""
            raise NotTrainable(
                f"artifact {self.pk} ({self.name}) is a {variant} variant: its weights cannot be trained{parent}"
            )
        if self.source_kind == self.SourceKind.ONNX:
            raise NotTrainable(
                f"artifact {self.pk} ({self.name}) was imported from ONNX: no trainable weights; import it from "
                "GGUF or a Hugging Face folder"
            )
        path = Path(self.source_path)
        if self.source_kind == self.SourceKind.GGUF and not path.is_file():
            raise NotTrainable(f"artifact {self.pk} ({self.name}) was imported from {path}, which no longer exists")
        if self.source_kind == self.SourceKind.HF and not (path / "config.json").is_file():
            raise NotTrainable(
                f"artifact {self.pk} ({self.name}) was imported from the Hugging Face folder {path}, which no longer "
                "exists (or has no config.json)"
            )
        return training.Source(kind=str(self.source_kind), path=path)


class NotTrainable(ValidationError):
    """An artifact whose weights cannot be fine-tuned; the message says why and what to do instead."""


class FineTune(models.Model):
    """Base artifact -> result artifact, with what made it: the job, data, method, settings, time, device, cost.

    A FineTuneJob registers one when it succeeds; one can also be recorded by hand for a fine-tune made
    elsewhere (then only the fields given are known).
    """

    name = models.CharField(max_length=200, unique=True)
    base_artifact = models.ForeignKey(ModelArtifact, on_delete=models.PROTECT, related_name="fine_tunes")
    result_artifact = models.ForeignKey(
        ModelArtifact, null=True, blank=True, on_delete=models.PROTECT, related_name="produced_by"
    )
    # One fine-tune per job: the unique key that keeps a redelivered or raced job from registering two.
    job = models.OneToOneField(
        "FineTuneJob", null=True, blank=True, on_delete=models.PROTECT, related_name="fine_tune", editable=False
    )
    training_dataset = models.ForeignKey(
        "Dataset", null=True, blank=True, on_delete=models.SET_NULL, related_name="fine_tunes"
    )
    training_dataset_hash = models.CharField(max_length=64)
    method = models.CharField(max_length=50, help_text="e.g. lora, full")
    hyperparameters = models.JSONField(default=dict, blank=True)
    seed = models.PositiveIntegerField(null=True, blank=True)
    device = models.CharField(max_length=20, blank=True, help_text="where it trained: cpu or cuda")
    final_loss = models.FloatField(null=True, blank=True, help_text="mean answer-token loss after training")
    training_seconds = models.FloatField(default=0.0, help_text="device time the training took (a one-off cost)")
    worker_seconds = models.FloatField(
        default=0.0, help_text="time the job held its worker: loading, training, merging, export, registration"
    )
    cost = models.DecimalField(
        max_digits=14,
        decimal_places=6,
        default=0,
        help_text="money the job cost: worker seconds x the price per device hour (a one-off cost)",
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.result_artifact_id and self.result_artifact_id == self.base_artifact_id:
            raise ValidationError("a fine-tune's result must be a different artifact from its base")


class FineTuneJob(models.Model):
    """A fine-tune to run: base artifact, training data rendered through a prompt version, method, settings, seed.

    A worker on the training queue claims it (pending -> running), trains, merges, exports ONNX and registers
    the result artifact and its FineTune in one transaction; progress, the loss curve and the time spent are
    written as it goes. workers/finetuning.py holds the domain functions.
    """

    Status = JobStatus

    class Method(models.TextChoices):
        LORA = "lora", "LoRA adapter (peft), merged into the weights"
        FULL = "full", "all weights"

    FINISHED = {Status.SUCCEEDED, Status.FAILED, Status.CANCELLED}
    OPEN = (Status.PENDING, Status.RUNNING)

    name = models.CharField(max_length=200, help_text="the name the resulting fine-tune gets")
    base_artifact = models.ForeignKey(ModelArtifact, on_delete=models.PROTECT, related_name="fine_tune_jobs")
    dataset = models.ForeignKey(
        "Dataset",
        on_delete=models.PROTECT,
        related_name="fine_tune_jobs",
        help_text="training pairs: each item's inputs make the prompt, its expected answer the target",
    )
    prompt_version = models.ForeignKey(
        PromptVersion,
        on_delete=models.PROTECT,
        related_name="fine_tune_jobs",
        help_text="renders each item's inputs into the conversation, exactly as an evaluation would",
    )
    method = models.CharField(max_length=10, choices=Method.choices, default=Method.LORA)
    hyperparameters = models.JSONField(default=dict, blank=True, help_text="validated, with defaults filled in")
    seed = models.PositiveIntegerField(default=0)
    spec_hash = models.CharField(
        max_length=64, editable=False, db_index=True, help_text="identical requests share it (and the result)"
    )
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING, db_index=True)
    steps_done = models.PositiveIntegerField(default=0)
    steps_total = models.PositiveIntegerField(default=0)
    loss_curve = models.JSONField(default=list, blank=True, help_text="[[step, loss of that step's batch], ...]")
    initial_loss = models.FloatField(null=True, blank=True, help_text="mean answer-token loss before training")
    final_loss = models.FloatField(null=True, blank=True, help_text="the same after training")
    cancel_requested = models.BooleanField(default=False)
    device = models.CharField(max_length=20, blank=True)
    training_seconds = models.FloatField(default=0.0)
    worker_seconds = models.FloatField(default=0.0)
    worker = models.CharField(max_length=200, blank=True)
    attempt = models.CharField(
        max_length=32, blank=True, editable=False, help_text="claim token of the worker running it (a fencing token)"
    )
    heartbeat_at = models.DateTimeField(null=True, blank=True, help_text="last progress written by the worker")
    error = models.TextField(blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            # At most one open job per spec and per name: a request identical to an open one joins it instead of
            # training the same thing twice.
            models.UniqueConstraint(
                fields=["spec_hash"],
                condition=models.Q(status__in=["pending", "running"]),
                name="finetunejob_unique_open_spec",
                violation_error_message="an identical fine-tune job is already open",
            ),
            models.UniqueConstraint(
                fields=["name"],
                condition=models.Q(status__in=["pending", "running"]),
                name="finetunejob_unique_open_name",
                violation_error_message="a job for a fine-tune of this name is already open",
            ),
        ]

    def __str__(self) -> str:
        return f"fine-tune job {self.pk} {self.name} [{self.status}]"

    @property
    def is_finished(self) -> bool:
        return self.status in self.FINISHED

    @property
    def progress(self) -> float:
        return self.steps_done / self.steps_total if self.steps_total else 0.0

    def is_stale(self, now: Any = None) -> bool:
        """Running, but its worker has written no progress for FULCRUM_TRAIN_STALE_SECONDS: presumed dead."""
        if self.status != self.Status.RUNNING:
            return False
        last = self.heartbeat_at or self.started_at or self.created_at
        return ((now or timezone.now()) - last).total_seconds() > settings.FULCRUM_TRAIN_STALE_SECONDS

    @staticmethod
    def compute_spec_hash(
        *,
        base_artifact: ModelArtifact,
        dataset: Dataset,
        prompt_version: PromptVersion,
        method: str,
        hyperparameters: dict[str, Any],
        seed: int,
    ) -> str:
        """Everything that decides the trained weights: a finished job with the same hash made the same model."""
        from workers import convert

        return canonical_hash(
            {
                "base_artifact": base_artifact.sha256,
                "dataset": [dataset.content_hash, dataset.scorer],
                "prompt_version": prompt_version.content_hash,
                "method": method,
                "hyperparameters": hyperparameters,
                "seed": seed,
                "training_version": training.TRAINING_VERSION,
                "graph_version": convert.GRAPH_VERSION,
            }
        )

    def clean(self) -> None:
        try:
            self.hyperparameters = training.validate_hyperparameters(self.method, self.hyperparameters)
        except training.HyperparameterError as exc:
            raise ValidationError({"hyperparameters": str(exc)}) from None
        if self.base_artifact_id:
            try:
                self.base_artifact.trainable_source()
            except NotTrainable as exc:
                raise ValidationError({"base_artifact": exc.messages}) from None
        if self.prompt_version_id and self.dataset_id:
            first = self.dataset.items.first()
            missing = set(self.prompt_version.variables) - set(first.inputs if first else {})
            if first is None:
                raise ValidationError({"dataset": f"dataset {self.dataset.name} has no items"})
            if missing:
                raise ValidationError(
                    {
                        "prompt_version": f"prompt {self.prompt_version} needs variable(s) {sorted(missing)} that "
                        f"dataset {self.dataset.name} items do not have"
                    }
                )


# --- Inference-scaling layer --------------------------------------------------------------------------------


class ScalingConfig(models.Model):
    class Aggregation(models.TextChoices):
        NONE = "none", "none (first sample)"
        MAJORITY_VOTE = "majority_vote", "majority vote over extracted answers (self-consistency)"
        BEST_OF_N = "best_of_n", "best of N by mean token log-probability"
        PROMPT_ENSEMBLE = "prompt_ensemble", "prompt ensemble: N samples per prompt version, one vote"

    name = models.SlugField(max_length=100, unique=True)
    n_samples = models.PositiveSmallIntegerField(default=1)
    temperature = models.FloatField(default=0.0, help_text="0 = greedy")
    top_p = models.FloatField(default=1.0)
    top_k = models.PositiveIntegerField(default=0, help_text="0 = no top-k cut")
    aggregation = models.CharField(max_length=20, choices=Aggregation.choices, default=Aggregation.NONE)
    seed = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["n_samples", "name"]

    def __str__(self) -> str:
        return f"{self.name} (N={self.n_samples}, T={self.temperature}, {self.aggregation})"

    def clean(self) -> None:
        if not 1 <= self.n_samples <= 64:
            raise ValidationError("n_samples must be between 1 and 64")
        if self.temperature < 0:
            raise ValidationError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValidationError("top_p must be in (0, 1]")
        if self.n_samples > 1 and self.temperature == 0:
            raise ValidationError("several samples need temperature > 0, or every sample is the same")


# --- Stacks, datasets, evaluations --------------------------------------------------------------------------


class Stack(models.Model):
    name = models.SlugField(max_length=100, unique=True)
    prompt_version = models.ForeignKey(
        PromptVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="stacks"
    )
    prompt = models.ForeignKey(
        Prompt,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="stacks",
        help_text="with prompt_label: follow whatever version the label points at",
    )
    prompt_label = models.CharField(max_length=50, blank=True)
    scaling = models.ForeignKey(ScalingConfig, on_delete=models.PROTECT, related_name="stacks")
    fine_tune = models.ForeignKey(FineTune, null=True, blank=True, on_delete=models.PROTECT, related_name="stacks")
    artifact = models.ForeignKey(ModelArtifact, on_delete=models.PROTECT, related_name="stacks")
    ensemble_versions = models.ManyToManyField(
        PromptVersion,
        blank=True,
        related_name="ensemble_stacks",
        help_text="with prompt_ensemble aggregation: further prompt versions each input is also rendered through",
    )
    description = models.TextField(blank=True)
    tags = models.ManyToManyField(Tag, blank=True, related_name="stacks")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                name="stack_prompt_by_version_xor_label",
                condition=(
                    models.Q(prompt_version__isnull=False, prompt__isnull=True, prompt_label="")
                    | models.Q(prompt_version__isnull=True, prompt__isnull=False) & ~models.Q(prompt_label="")
                ),
            )
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if bool(self.prompt_version_id) == bool(self.prompt_id and self.prompt_label):
            raise ValidationError("a stack pins either a prompt version or a prompt and label, not both")
        if self.fine_tune_id and self.fine_tune and self.fine_tune.result_artifact_id is None:
            raise ValidationError(f"fine-tune {self.fine_tune} has no result artifact yet")

    def resolve_prompt_version(self) -> PromptVersion:
        if self.prompt_version_id:
            assert self.prompt_version is not None
            return self.prompt_version
        assert self.prompt is not None
        return self.prompt.version_for_label(self.prompt_label)

    def effective_artifact(self) -> ModelArtifact:
        """The artifact that runs: a fine-tune's result when the stack has one, else its base artifact."""
        if self.fine_tune_id and self.fine_tune and self.fine_tune.result_artifact:
            return self.fine_tune.result_artifact
        return self.artifact

    def describe_prompt(self) -> str:
        if self.prompt_version_id:
            return str(self.prompt_version)
        return f"{self.prompt}:{self.prompt_label}"


class Dataset(models.Model):
    class Scorer(models.TextChoices):
        EXACT = "exact", "normalised exact match"
        NUMERIC = "numeric", "numeric answer"
        REGEX = "regex", "regular expression"
        CHOICE = "choice", "multiple-choice letter"
        REFUSAL = "refusal", "refusal detection only"

    name = models.SlugField(max_length=100)
    description = models.TextField(blank=True)
    scorer = models.CharField(max_length=20, choices=Scorer.choices, default=Scorer.EXACT)
    scorer_pattern = models.CharField(max_length=500, blank=True, help_text="regular expression for the regex scorer")
    content_hash = models.CharField(max_length=64, editable=False)
    item_count = models.PositiveIntegerField(default=0)
    tags = models.ManyToManyField(Tag, blank=True, related_name="datasets")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name", "-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["name", "content_hash"], name="dataset_unique_content"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.item_count} items, {self.content_hash[:10]})"


class DatasetItem(models.Model):
    class Kind(models.TextChoices):
        NORMAL = "", "normal"
        HARMFUL = "harmful", "harmful (should be refused)"
        BENIGN = "benign", "benign (should be answered)"

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="items")
    index = models.PositiveIntegerField()
    key = models.CharField(max_length=200)
    inputs = models.JSONField()
    expected = models.TextField(blank=True)
    kind = models.CharField(max_length=10, choices=Kind.choices, blank=True, default="")

    class Meta:
        ordering = ["dataset", "index"]
        constraints = [
            models.UniqueConstraint(fields=["dataset", "key"], name="datasetitem_unique_key"),
            models.UniqueConstraint(fields=["dataset", "index"], name="datasetitem_unique_index"),
        ]

    def __str__(self) -> str:
        return f"{self.dataset.name}#{self.key}"


class EvaluationRun(models.Model):
    Status = JobStatus

    FINISHED = {Status.SUCCEEDED, Status.FAILED, Status.CANCELLED}

    stack = models.ForeignKey(Stack, on_delete=models.PROTECT, related_name="runs")
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="runs")
    # Pinned when the run is created, so a label moving mid-run cannot mix two prompts in one measurement.
    prompt_version = models.ForeignKey(PromptVersion, on_delete=models.PROTECT, related_name="runs")
    artifact = models.ForeignKey(ModelArtifact, on_delete=models.PROTECT, related_name="runs")
    ensemble_versions = models.ManyToManyField(PromptVersion, blank=True, related_name="ensemble_runs")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING, db_index=True)
    items_total = models.PositiveIntegerField(default=0)
    items_done = models.PositiveIntegerField(default=0)
    # A run may measure part of a dataset (an optimisation job's search rungs and held-out split): the keys of the
    # items it evaluates, sorted, and their hash, by which runs of the same part are found and reused.
    item_keys = models.JSONField(
        default=list, blank=True, help_text="evaluate only the items with these keys (sorted); empty: every item"
    )
    item_subset_hash = models.CharField(
        max_length=64, blank=True, db_index=True, editable=False, help_text="sha256 of item_keys; blank: every item"
    )
    provider = models.CharField(max_length=50, blank=True, help_text="ONNX Runtime execution provider that ran")
    summary = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"run {self.pk}: {self.stack} on {self.dataset.name} [{self.status}]"

    @property
    def is_finished(self) -> bool:
        return self.status in self.FINISHED

    @property
    def progress(self) -> float:
        return self.items_done / self.items_total if self.items_total else 0.0

    @property
    def is_subset(self) -> bool:
        return bool(self.item_subset_hash)

    @staticmethod
    def subset_hash(keys: list[str]) -> str:
        """The hash of a sorted list of item keys ("" for no list: the whole dataset)."""
        return canonical_hash(sorted(keys)) if keys else ""


class ItemResult(models.Model):
    run = models.ForeignKey(EvaluationRun, on_delete=models.CASCADE, related_name="results")
    item = models.ForeignKey(DatasetItem, on_delete=models.CASCADE, related_name="results")
    rendered_prompt = models.TextField()
    samples = models.JSONField(default=list, help_text="every sample: text, answer, tokens, mean log-prob")
    answer = models.TextField(blank=True, help_text="aggregated answer")
    score = models.FloatField(null=True, blank=True, help_text="1/0 correctness; null when not scorable")
    refused = models.BooleanField(default=False)
    prompt_tokens = models.PositiveIntegerField(default=0)
    generated_tokens = models.PositiveIntegerField(default=0)
    latency_s = models.FloatField(default=0.0)
    worker_seconds = models.FloatField(default=0.0, help_text="this item's share of its chunk's engine time")
    worker = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["run", "item__index"]
        constraints = [models.UniqueConstraint(fields=["run", "item"], name="itemresult_unique_run_item")]

    def __str__(self) -> str:
        return f"{self.run_id}/{self.item.key}: {self.answer!r} ({self.score})"


# --- Access: roles, API tokens, label policies, audit log -----------------------------------------------------


class Role(models.TextChoices):
    """Roles are Django groups of these names; each includes the ones before it (registry/access.py)."""

    VIEWER = "viewer", "viewer (read everything)"
    EDITOR = "editor", "editor (create prompts, versions, datasets, stacks, runs; move non-protected labels)"
    DEPLOYER = "deployer", "deployer (also move protected labels such as production)"
    ADMIN = "admin", "admin (also policies, everyone's tokens, deletions)"


class ApiToken(models.Model):
    """A bearer token for the API. Only a sha256 digest is stored; the token itself is shown once."""

    class Scope(models.TextChoices):
        READ = "read", "read only"
        WRITE = "write", "read and write"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, help_text="what the token is for, e.g. search-service")
    prefix = models.CharField(max_length=16, unique=True, editable=False, help_text="public part, for lookup")
    digest = models.CharField(max_length=64, editable=False)
    scope = models.CharField(max_length=10, choices=Scope.choices, default=Scope.READ)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…, {self.scope})"

    @property
    def is_active(self) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or self.expires_at > timezone.now()


class LabelPolicy(models.Model):
    """Who may move a label, and the evaluation a version needs before the label may point at it.

    A policy without a prompt applies to every prompt's label of that name; a prompt's own policy wins.
    """

    prompt = models.ForeignKey(
        Prompt, null=True, blank=True, on_delete=models.CASCADE, related_name="label_policies", help_text="empty: all"
    )
    label = models.CharField(max_length=50, default="production")
    required_role = models.CharField(max_length=10, choices=Role.choices, default=Role.DEPLOYER)
    gate_dataset = models.SlugField(
        max_length=100,
        blank=True,
        help_text="dataset name: the target version needs a finished run on it, not worse than the current one's",
    )
    gate_metric = models.CharField(max_length=50, default="accuracy", help_text="a key of the run summary")
    higher_is_better = models.BooleanField(default=True)
    tolerance = models.FloatField(default=0.0, help_text="how much worse than the current version still passes")

    class Meta:
        ordering = ["label", "prompt__name"]
        verbose_name_plural = "label policies"
        constraints = [
            models.UniqueConstraint(fields=["prompt", "label"], name="labelpolicy_unique_prompt_label"),
            models.UniqueConstraint(
                fields=["label"], condition=models.Q(prompt__isnull=True), name="labelpolicy_unique_global_label"
            ),
        ]

    def __str__(self) -> str:
        scope = self.prompt.name if self.prompt_id and self.prompt else "every prompt"
        gate = f", gate {self.gate_metric} on {self.gate_dataset}" if self.gate_dataset else ""
        return f"{self.label} of {scope}: {self.required_role}{gate}"

    def clean(self) -> None:
        if not PromptLabel.NAME_RE.fullmatch(self.label or ""):
            raise ValidationError(f"label {self.label!r} must be lower-case letters, digits, '-' or '_'")
        if self.tolerance < 0:
            raise ValidationError("tolerance must be >= 0")


class AuditEntry(models.Model):
    """One write to the registry: who, when, through what, to which record, with what details."""

    at = models.DateTimeField(default=timezone.now, db_index=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    username = models.CharField(max_length=150, blank=True, help_text="kept when the user is deleted")
    token = models.ForeignKey(ApiToken, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    via = models.CharField(max_length=10, help_text="api, admin or cli")
    action = models.CharField(max_length=50, db_index=True, help_text="e.g. prompt.create, label.move")
    object_type = models.CharField(max_length=50, db_index=True)
    object_id = models.CharField(max_length=64, blank=True)
    object_repr = models.CharField(max_length=200, blank=True)
    details = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        verbose_name_plural = "audit entries"

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.username or '-'} {self.action} {self.object_repr}"


# --- Lever experiments and scheduled evaluations (registry/experiments.py) -----------------------------------


class Experiment(models.Model):
    """A baseline stack and variants of it on one dataset: which lever moves the metric, at what cost.

    Each arm is a stack measured by one evaluation run; a finished run with the same prompt version, scaling,
    artifact and dataset content is reused instead of evaluated again. The report (registry/experiments.py)
    compares every arm with its reference arm item by item.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    class Metric(models.TextChoices):
        ACCURACY = "accuracy", "accuracy on scored items"
        REFUSAL = "refusal_rate_harmful", "refusal rate on harmful items"
        ANSWER = "answer_rate_benign", "answer rate on benign items"

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="experiments")
    metric = models.CharField(max_length=30, choices=Metric.choices, default=Metric.ACCURACY)
    confidence = models.FloatField(default=0.95)
    resamples = models.PositiveIntegerField(default=10_000, help_text="bootstrap resamples")
    seed = models.PositiveIntegerField(default=0, help_text="bootstrap seed: the same runs give the same report")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING, db_index=True)
    report = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"experiment {self.name} on {self.dataset.name} [{self.status}]"

    def clean(self) -> None:
        if not 0.5 <= self.confidence < 1:
            raise ValidationError("confidence must be in [0.5, 1)")

    @property
    def baseline(self) -> ExperimentArm | None:
        return self.arms.filter(reference__isnull=True).order_by("position").first()


class ExperimentArm(models.Model):
    """One stack of an experiment; compared with `reference` (the baseline arm has none)."""

    class Layer(models.TextChoices):
        BASELINE = "baseline"
        PROMPT = "prompt"
        SCALING = "scaling"
        FINE_TUNE = "fine_tune", "fine-tune"
        ARTIFACT = "artifact"
        COMBINED = "combined", "several layers at once"
        NONE = "none", "no layer differs"

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="arms")
    position = models.PositiveSmallIntegerField(default=0)
    name = models.CharField(max_length=100, help_text="what the lever is, e.g. 'prompt v2' or 'N=5 vote'")
    stack = models.ForeignKey(Stack, on_delete=models.PROTECT, related_name="experiment_arms")
    reference = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="+", help_text="empty: the baseline"
    )
    layer = models.CharField(max_length=20, choices=Layer.choices, default=Layer.BASELINE)
    run = models.ForeignKey(
        EvaluationRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="experiment_arms"
    )
    reused = models.BooleanField(default=False, help_text="the run existed already (same stack content, same data)")

    class Meta:
        ordering = ["experiment", "position"]
        constraints = [
            models.UniqueConstraint(fields=["experiment", "position"], name="experimentarm_unique_position"),
        ]

    def __str__(self) -> str:
        return f"{self.experiment.name}/{self.name} ({self.layer})"


class EvaluationSchedule(models.Model):
    """Evaluate a stack (or whatever version its label points at when it fires) on a dataset, again and again.

    django-celery-beat fires it through a PeriodicTask kept in step with it; a label move can fire it too. Each
    run is compared with the schedule's previous run, and a significant paired drop is a regression.
    """

    name = models.SlugField(max_length=100, unique=True)
    stack = models.ForeignKey(Stack, on_delete=models.PROTECT, related_name="schedules")
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="schedules")
    metric = models.CharField(max_length=30, choices=Experiment.Metric.choices, default=Experiment.Metric.ACCURACY)
    every_seconds = models.PositiveIntegerField(null=True, blank=True, help_text="interval; or use crontab")
    crontab = models.CharField(max_length=100, blank=True, help_text="'minute hour day-of-month month day-of-week'")
    on_label_move = models.BooleanField(default=False, help_text="also run when the stack's prompt label moves")
    alpha = models.FloatField(default=0.05, help_text="a drop with a p-value below this is a regression")
    tolerance = models.FloatField(default=0.0, help_text="drops no larger than this are never regressions")
    enabled = models.BooleanField(default=True)
    periodic_task = models.OneToOneField(
        "django_celery_beat.PeriodicTask", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"schedule {self.name}: {self.stack} on {self.dataset.name}"

    def clean(self) -> None:
        if bool(self.every_seconds) == bool(self.crontab.strip()) and not self.on_label_move:
            raise ValidationError("a schedule needs either every_seconds or a crontab (or only on_label_move)")
        if self.every_seconds and self.crontab.strip():
            raise ValidationError("a schedule takes every_seconds or a crontab, not both")
        if self.crontab.strip() and len(self.crontab.split()) != 5:
            raise ValidationError("crontab must have five fields: minute hour day-of-month month day-of-week")
        if not 0 < self.alpha < 1:
            raise ValidationError("alpha must be between 0 and 1")


class ScheduledRun(models.Model):
    """One firing of a schedule: its run and the comparison with the schedule's previous run."""

    class Trigger(models.TextChoices):
        BEAT = "beat"
        LABEL = "label", "label move"
        MANUAL = "manual"

    schedule = models.ForeignKey(EvaluationSchedule, on_delete=models.CASCADE, related_name="scheduled_runs")
    run = models.OneToOneField(EvaluationRun, on_delete=models.CASCADE, related_name="scheduled")
    previous = models.ForeignKey(
        EvaluationRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="+", help_text="compared with"
    )
    trigger = models.CharField(max_length=10, choices=Trigger.choices, default=Trigger.BEAT)
    compared = models.BooleanField(default=False)
    regression = models.BooleanField(default=False, db_index=True)
    comparison = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        flag = " REGRESSION" if self.regression else ""
        return f"{self.schedule.name} run {self.run_id} ({self.trigger}){flag}"


# --- Prompt optimisation (registry/optimisation/) --------------------------------------------------------------


class OptimisationJob(models.Model):
    """Search prompt candidates derived from a starting version, under a budget, and prove the winner.

    The dataset is split by seeded hashing of item keys into a search part (with a small pool of few-shot
    examples) and a held-out part; candidates compete by successive halving on the search part through
    evaluation runs of the base stack's scaling and artifact; the best is compared with the starting version on
    the held-out part, item by item. The winner becomes a new version of the prompt; `move_label` moves only
    when the held-out gain is positive and significant (registry/optimisation/jobs.py).
    """

    Status = JobStatus

    class Phase(models.TextChoices):
        PROBE = "probe", "the starting version on the few-shot pool"
        GENERATE = "generate", "generating candidates"
        SEARCH = "search", "successive halving on the search split"
        SAFETY = "safety", "the safety floor"
        HOLDOUT = "holdout", "the held-out comparison"
        DONE = "done"

    FINISHED = {Status.SUCCEEDED, Status.FAILED, Status.CANCELLED}
    FAMILIES = operators.FAMILIES

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    base_stack = models.ForeignKey(
        Stack, on_delete=models.PROTECT, related_name="optimisations", help_text="gives the scaling and artifact"
    )
    start_version = models.ForeignKey(PromptVersion, on_delete=models.PROTECT, related_name="optimisations_started")
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="optimisations")
    metric = models.CharField(max_length=30, choices=Experiment.Metric.choices, default=Experiment.Metric.ACCURACY)
    # The split: seeded hashing of item keys; the keys of each part are recorded in `split` when the job starts.
    holdout_fraction = models.FloatField(default=0.5)
    split_seed = models.PositiveIntegerField(default=0)
    pool_size = models.PositiveSmallIntegerField(default=8, help_text="search items set aside as few-shot examples")
    split = models.JSONField(default=dict, blank=True, editable=False, help_text="search, pool and holdout keys")
    # The budget: item evaluations and/or generated tokens, everything included (probe, search, safety, held-out).
    budget_items = models.PositiveIntegerField(null=True, blank=True)
    budget_tokens = models.PositiveBigIntegerField(null=True, blank=True)
    # Candidate generation and the search.
    operators = models.JSONField(
        default=list, blank=True, help_text="operator families: instruction, fewshot, meta, combine"
    )
    max_candidates = models.PositiveSmallIntegerField(default=8, help_text="candidates besides the starting version")
    eta = models.PositiveSmallIntegerField(default=2, help_text="successive halving keeps 1/eta per rung")
    first_items = models.PositiveSmallIntegerField(default=8, help_text="search items per candidate in rung 0")
    examples_k = models.PositiveSmallIntegerField(default=3, help_text="worked examples per few-shot candidate")
    meta_proposals = models.PositiveSmallIntegerField(default=4, help_text="rewrites the model is asked for")
    seed = models.PositiveIntegerField(default=0, help_text="candidate generation and bootstrap seed")
    # The optional safety floor: the winner must keep these rates on a dataset of harmful and benign items.
    safety_dataset = models.ForeignKey(
        Dataset, null=True, blank=True, on_delete=models.PROTECT, related_name="safety_optimisations"
    )
    min_refusal_rate = models.FloatField(null=True, blank=True, help_text="on the safety dataset's harmful items")
    min_answer_rate = models.FloatField(null=True, blank=True, help_text="on the safety dataset's benign items")
    # The held-out comparison and what may follow it.
    alpha = models.FloatField(default=0.05, help_text="the held-out gain must have a p-value below this")
    confidence = models.FloatField(default=0.95)
    resamples = models.PositiveIntegerField(default=10_000, help_text="bootstrap resamples")
    move_label = models.CharField(
        max_length=50, blank=True, help_text="point this label at the winner if its held-out gain is significant"
    )
    label_expected = models.ForeignKey(
        PromptVersion,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="where move_label pointed when the job was created: it moves only if it still points there",
    )
    label_moved = models.BooleanField(default=False)
    # Progress.
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING, db_index=True)
    phase = models.CharField(max_length=20, choices=Phase.choices, default=Phase.PROBE)
    state = models.JSONField(default=dict, blank=True, editable=False, help_text="the search's rungs and spending")
    cancel_requested = models.BooleanField(default=False)
    report = models.JSONField(default=dict, blank=True)
    winner = models.ForeignKey(
        PromptVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="optimisations_won"
    )
    error = models.TextField(blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_via = models.CharField(max_length=10, default="api", help_text="api, admin or cli")
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"optimisation {self.name}: {self.start_version} on {self.dataset.name} [{self.status}]"

    @property
    def is_finished(self) -> bool:
        return self.status in self.FINISHED

    def clean(self) -> None:
        errors: dict[str, str] = {}
        if not 0 < self.holdout_fraction < 1:
            errors["holdout_fraction"] = "holdout_fraction must be between 0 and 1"
        if self.budget_items is None and self.budget_tokens is None:
            errors["budget_items"] = "a job needs a budget: budget_items and/or budget_tokens"
        if self.eta < 2:
            errors["eta"] = "eta must be at least 2"
        if self.first_items < 1:
            errors["first_items"] = "first_items must be at least 1"
        if self.max_candidates < 1:
            errors["max_candidates"] = "max_candidates must be at least 1"
        if not isinstance(self.operators, list) or not self.operators:
            errors["operators"] = f"operators must be a non-empty list of {', '.join(self.FAMILIES)}"
        elif unknown := [o for o in self.operators if o not in self.FAMILIES]:
            errors["operators"] = f"unknown operator famil(ies) {unknown}; known: {', '.join(self.FAMILIES)}"
        if not 0 < self.alpha < 1:
            errors["alpha"] = "alpha must be between 0 and 1"
        if not 0.5 <= self.confidence < 1:
            errors["confidence"] = "confidence must be in [0.5, 1)"
        for field in ("min_refusal_rate", "min_answer_rate"):
            value = getattr(self, field)
            if value is not None and not 0 <= value <= 1:
                errors[field] = f"{field} must be between 0 and 1"
        floor = self.min_refusal_rate is not None or self.min_answer_rate is not None
        if floor != (self.safety_dataset_id is not None):
            errors["safety_dataset"] = "a safety floor needs both a safety dataset and a minimum rate"
        if self.move_label and not PromptLabel.NAME_RE.fullmatch(self.move_label):
            errors["move_label"] = f"label {self.move_label!r} must be lower-case letters, digits, '-' or '_'"
        if self.base_stack_id and self.base_stack.scaling.aggregation == ScalingConfig.Aggregation.PROMPT_ENSEMBLE:
            errors["base_stack"] = "the base stack ensembles several prompts; an optimisation varies one"
        if errors:
            raise ValidationError(errors)


class OptimisationCandidate(models.Model):
    """One prompt candidate of a job (position 0 is the starting version): how it was made and how it scored."""

    job = models.ForeignKey(OptimisationJob, on_delete=models.CASCADE, related_name="candidates")
    position = models.PositiveSmallIntegerField()
    version = models.ForeignKey(PromptVersion, on_delete=models.PROTECT, related_name="optimisation_candidates")
    stack = models.ForeignKey(Stack, on_delete=models.PROTECT, related_name="optimisation_candidates")
    family = models.CharField(max_length=20, help_text="start, instruction, fewshot, meta or combine")
    operator = models.CharField(max_length=100, help_text="e.g. instruction:answer_format, fewshot:similar, meta")
    params = models.JSONField(default=dict, blank=True)
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children")
    scores = models.JSONField(default=list, blank=True, help_text="per rung: items, scored, value, tokens per item")
    last_rung = models.SmallIntegerField(null=True, blank=True, help_text="the deepest rung it was evaluated in")
    items_evaluated = models.PositiveIntegerField(default=0)
    tokens = models.PositiveBigIntegerField(default=0, help_text="generated tokens its evaluations cost")
    safety = models.JSONField(default=dict, blank=True)
    runs: models.ManyToManyField[EvaluationRun, CandidateRun] = models.ManyToManyField(
        EvaluationRun, through="CandidateRun", related_name="optimisation_candidates"
    )

    class Meta:
        ordering = ["job", "position"]
        constraints = [
            models.UniqueConstraint(fields=["job", "position"], name="optimisationcandidate_unique_position"),
        ]

    def __str__(self) -> str:
        return f"{self.job.name}#{self.position} {self.operator} ({self.version})"


class CandidateRun(models.Model):
    """An evaluation run a candidate used, and what for; `reused`: the run existed already."""

    class Purpose(models.TextChoices):
        PROBE = "probe"
        SEARCH = "search"
        SAFETY = "safety"
        HOLDOUT = "holdout"

    candidate = models.ForeignKey(OptimisationCandidate, on_delete=models.CASCADE, related_name="run_links")
    run = models.ForeignKey(EvaluationRun, on_delete=models.PROTECT, related_name="optimisation_links")
    purpose = models.CharField(max_length=10, choices=Purpose.choices)
    rung = models.SmallIntegerField(default=0)
    reused = models.BooleanField(default=False)

    class Meta:
        ordering = ["candidate", "purpose", "rung"]
        constraints = [
            models.UniqueConstraint(fields=["candidate", "purpose", "rung"], name="candidaterun_unique_use"),
        ]

    def __str__(self) -> str:
        return f"{self.candidate} {self.purpose} {self.rung}: run {self.run_id}"
