"""Moving labels safely: role checks, the promotion gate, rollback, and the audit record.

Both the API and the admin move labels through `move_label` and `rollback_label`; `Prompt.move_label` below
them locks the label and writes the LabelMove history row.

A label with a LabelPolicy needs the policy's role to move (any other label needs an editor). When the policy
names a gate dataset, the target version needs a succeeded run on that dataset whose metric is not worse (beyond
the tolerance) than the current version's latest succeeded run on the same dataset content. A rollback to a
version the label held before skips the gate: it was in service already, and a rollback must not be blocked by
the very regression it undoes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q

from .access import Actor, record
from .models import (
    ANY_VERSION,
    EvaluationRun,
    LabelConflict,
    LabelMove,
    LabelPolicy,
    Prompt,
    PromptLabel,
    PromptVersion,
    Role,
)


class GateFailed(Exception):
    """The target version has no qualifying evaluation, or it scores worse than the current version."""

    def __init__(self, message: str, result: GateResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class GateResult:
    passed: bool
    message: str
    dataset: str = ""
    metric: str = ""
    target_value: float | None = None
    current_value: float | None = None
    target_run: int | None = None
    current_run: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "message": self.message,
            "dataset": self.dataset,
            "metric": self.metric,
            "target_value": self.target_value,
            "current_value": self.current_value,
            "target_run": self.target_run,
            "current_run": self.current_run,
        }


def policy_for(prompt: Prompt, label: str) -> LabelPolicy | None:
    """The prompt's own policy for the label, else the policy for that label on every prompt, else None."""
    policies = {
        p.prompt_id: p for p in LabelPolicy.objects.filter(Q(prompt=prompt) | Q(prompt__isnull=True), label=label)
    }
    return policies.get(prompt.pk) or policies.get(None)


def required_role(prompt: Prompt, label: str) -> str:
    policy = policy_for(prompt, label)
    return policy.required_role if policy is not None else Role.EDITOR


def _metric(run: EvaluationRun, metric: str) -> float | None:
    value = run.summary.get(metric) if isinstance(run.summary, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def check_gate(policy: LabelPolicy | None, target: PromptVersion, current: PromptVersion | None) -> GateResult:
    """Whether `target` may replace `current` under the policy's gate (passes when the policy has none)."""
    if policy is None or not policy.gate_dataset:
        return GateResult(True, "no promotion gate")
    metric, dataset = policy.gate_metric, policy.gate_dataset
    # Only runs of the whole dataset count: a run on part of it (an optimisation rung) measured other items.
    succeeded = EvaluationRun.objects.filter(
        status=EvaluationRun.Status.SUCCEEDED, dataset__name=dataset, item_subset_hash=""
    ).select_related("dataset")
    target_run = next(
        (
            r
            for r in succeeded.filter(prompt_version=target).order_by("-finished_at", "-id")
            if _metric(r, metric) is not None
        ),
        None,
    )
    if target_run is None:
        return GateResult(
            False,
            f"{target} has no succeeded evaluation on dataset {dataset!r} with a {metric!r} figure; run one first",
            dataset,
            metric,
        )
    target_value = _metric(target_run, metric)
    assert target_value is not None
    base: dict[str, Any] = {
        "dataset": dataset,
        "metric": metric,
        "target_value": target_value,
        "target_run": target_run.pk,
    }
    if current is None or current.pk == target.pk:
        return GateResult(True, f"{target} scores {metric} {target_value:g} on {dataset}", **base)
    current_run = next(
        (
            r
            for r in succeeded.filter(prompt_version=current, dataset_id=target_run.dataset_id).order_by(
                "-finished_at", "-id"
            )
            if _metric(r, metric) is not None
        ),
        None,
    )
    if current_run is None:
        return GateResult(
            True,
            f"{target} scores {metric} {target_value:g} on {dataset}; {current} has no run on the same dataset "
            "content to compare with",
            **base,
        )
    current_value = _metric(current_run, metric)
    assert current_value is not None
    delta = target_value - current_value if policy.higher_is_better else current_value - target_value
    passed = delta >= -policy.tolerance
    verdict = "not worse than" if passed else "worse than"
    message = (
        f"{target} scores {metric} {target_value:g} on {dataset} (run {target_run.pk}), {verdict} "
        f"{current}'s {current_value:g} (run {current_run.pk})"
        + (f" beyond the tolerance {policy.tolerance:g}" if not passed and policy.tolerance else "")
    )
    return GateResult(passed, message, current_value=current_value, current_run=current_run.pk, **base)


def move_label(
    prompt: Prompt,
    label: str,
    version: PromptVersion,
    *,
    actor: Actor,
    reason: str = "",
    expected: PromptVersion | None | object = ANY_VERSION,
    gate: bool = True,
    action: str = "label.move",
) -> LabelMove:
    """Move a label for `actor`: role check, promotion gate, the move itself and its audit entry, atomically.

    Raises AccessDenied (role), GateFailed (gate), LabelConflict (`expected` no longer true) or
    ValidationError (bad label name, version of another prompt).
    """
    if version.prompt_id != prompt.pk:
        raise ValidationError(f"version {version} does not belong to prompt {prompt.name!r}")
    if not PromptLabel.NAME_RE.fullmatch(label):
        raise ValidationError(f"label {label!r} must be lower-case letters, digits, '-' or '_' (at most 50)")
    policy = policy_for(prompt, label)
    actor.require(
        policy.required_role if policy is not None else Role.EDITOR, f"move the {label!r} label of {prompt.name!r}"
    )
    with transaction.atomic():
        # One mover per prompt at a time: the current version read here is the one the move replaces.
        Prompt.objects.select_for_update().filter(pk=prompt.pk).first()
        row = PromptLabel.objects.filter(prompt=prompt, name=label).first()
        current = row.version if row is not None else None
        if expected is not ANY_VERSION and expected != current:
            now = f"v{current.number}" if current else "nothing"
            wanted = f"v{expected.number}" if isinstance(expected, PromptVersion) else "nothing"
            raise LabelConflict(f"label {label!r} of {prompt.name!r} points at {now}, not {wanted}: it moved meanwhile")
        result = check_gate(policy, version, current) if gate else GateResult(True, "gate skipped (rollback)")
        if not result.passed:
            raise GateFailed(f"promotion gate: {result.message}", result)
        move = prompt.move_label(label, version, user=actor.user, reason=reason, expected=current)
        record(
            actor,
            action,
            move.label,
            object_repr=f"{prompt.name}:{label}",
            prompt=prompt.name,
            label=label,
            from_version=current.number if current else None,
            to_version=version.number,
            reason=reason,
            gate=result.as_dict() if policy is not None and policy.gate_dataset else None,
            move=move.pk,
        )
    return move


def rollback_target(row: PromptLabel) -> PromptVersion:
    """The version the label pointed at before its latest move."""
    for move in row.moves.select_related("from_version").order_by("-moved_at", "-id"):
        if move.to_version_id == row.version_id and move.from_version is not None:
            return move.from_version
        break
    raise ValidationError(f"label {row.name!r} of {row.prompt.name!r} has no earlier version to roll back to")


def rollback_label(
    prompt: Prompt,
    label: str,
    *,
    actor: Actor,
    to_version: PromptVersion | None = None,
    reason: str = "",
    expected: PromptVersion | None | object = ANY_VERSION,
) -> LabelMove:
    """Move the label back: to the version before its latest move, or to `to_version`, which it must have held
    before. The role check applies; the gate does not."""
    row = PromptLabel.objects.filter(prompt=prompt, name=label).select_related("version", "prompt").first()
    if row is None:
        raise PromptLabel.DoesNotExist(f"prompt {prompt.name!r} has no label {label!r}")
    if to_version is None:
        to_version = rollback_target(row)
    elif not row.moves.filter(to_version=to_version).exists():
        raise ValidationError(
            f"label {label!r} never pointed at {to_version}; a rollback goes back to a version it held (use a move)"
        )
    if to_version.pk == row.version_id:
        raise ValidationError(f"label {label!r} already points at {to_version}")
    return move_label(
        prompt,
        label,
        to_version,
        actor=actor,
        reason=reason or f"rollback to v{to_version.number}",
        expected=row.version if expected is ANY_VERSION else expected,
        gate=False,
        action="label.rollback",
    )
