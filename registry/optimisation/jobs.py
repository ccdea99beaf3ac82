"""Optimisation jobs: a state machine over evaluation runs, advanced by `fulcrum.step_optimisation` tasks.

A job moves through phases; each call of `step` advances it as far as it can without waiting and returns:

    probe     the starting version on the few-shot pool (the difficulty of each pool item, the replies shown to
              the model when it proposes rewrites), skipped when no operator needs it
    generate  candidates from the operators (operators.py); meta-prompting runs the model through the worker's
              engine here, outside any lock. Each candidate is stored as a version of the prompt's scratch prompt
              `<prompt>--candidates` (content-hashed: the same candidate in a later job is the same version)
              and gets a stack pinning it on the base stack's scaling, fine-tune and artifact
    search    successive halving (search.py), one rung at a time: each rung's evaluation runs are found (a
              finished or open run of the same version, scaling, artifact, dataset content and item subset is
              reused) or created and queued; when the last of them finishes, the next rung is planned
    safety    (with a safety floor) the best candidates and the start on the safety dataset; the best one that
              keeps the floor goes on
    holdout   the winner and the starting version on the held-out split, compared item by item (registry/stats.py)
              -> the winner becomes a new version of the prompt (parent: the start) whose commit message
              summarises the search; `move_label` moves through registry/promotion.py (role, gate, audit) only if
              the held-out gain is positive and its p-value below alpha

Nothing blocks a worker while runs are evaluated: a finished run queues `step_optimisation` for every open job
that uses it (the post_save hook at the end), and `step` returns at once while a rung is still running.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.db.models.signals import post_save
from django.dispatch import receiver
from django.utils import timezone

from fulcrum import metrics

from .. import access, experiments, promotion, stats
from ..charts import pts
from ..models import (
    CandidateRun,
    Dataset,
    EvaluationRun,
    Experiment,
    ItemResult,
    LabelConflict,
    OptimisationCandidate,
    OptimisationJob,
    Prompt,
    PromptLabel,
    PromptVersion,
    ScalingConfig,
    Stack,
    Tag,
    canonical_hash,
)
from ..waiting import poll_until_finished
from . import operators, search
from .reporting import build_report, commit_message, progress, spent
from .search import Arm, Budget, Cost, HalvingPlan, Rung

log = logging.getLogger(__name__)

Phase = OptimisationJob.Phase
Status = OptimisationJob.Status
Purpose = CandidateRun.Purpose
OPEN_RUN_STATUSES = (EvaluationRun.Status.PENDING, EvaluationRun.Status.RUNNING)
SCRATCH_SUFFIX = "--candidates"
TAG = "optimisation"
DEFAULT_MAX_NEW_TOKENS = 64  # what the worker generates when a version sets no max_new_tokens
SAFETY_FINALISTS = 2  # candidates checked against the safety floor, best first
META_MAX_NEW_TOKENS = 80  # a rewritten instruction is a sentence or two
SHOTS = 3  # pool items shown to the model when it proposes rewrites


class OptimisationError(ValueError):
    """A job that cannot be created or go on; `field` names the input at fault when there is one."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


# --- creating and starting ---------------------------------------------------------------------------------------


def job_actor(job: OptimisationJob) -> access.Actor:
    """Who the job acts as when it stores the winner and moves a label: its creator, or the command line."""
    if job.created_by is None and job.created_via == "cli":
        return access.OperatorActor()
    return access.Actor(user=job.created_by, via=job.created_via)


def _metric_items(dataset: Dataset, metric: str) -> int:
    items = dataset.items
    if metric == Experiment.Metric.ACCURACY:
        return items.filter(kind="").exclude(expected="").count()
    return items.filter(kind="harmful" if metric == Experiment.Metric.REFUSAL else "benign").count()


def create_job(
    name: str,
    *,
    base_stack: Stack,
    dataset: Dataset,
    actor: access.Actor,
    start_version: PromptVersion | None = None,
    **fields: Any,
) -> OptimisationJob:
    """Validate and store a job (pending), with its split and its starting candidate. Start it with start_job.

    `fields` are OptimisationJob fields (metric, budget_items, operators, move_label, ...). Raises
    OptimisationError or ValidationError for bad input, AccessDenied when `move_label` needs a role the actor
    lacks; nothing is stored then.
    """
    start = start_version or base_stack.resolve_prompt_version()
    fields.setdefault("operators", list(OptimisationJob.FAMILIES))
    job = OptimisationJob(
        name=name,
        base_stack=base_stack,
        dataset=dataset,
        start_version=start,
        created_by=actor.user if getattr(actor.user, "pk", None) else None,
        created_via=actor.via,
        **fields,
    )
    job.full_clean()
    first = dataset.items.first()
    missing = set(start.variables) - set(first.inputs if first else {})
    if first is None or missing:
        raise OptimisationError(
            f"dataset {dataset.name} has no items"
            if first is None
            else f"{start} needs variable(s) {sorted(missing)} that dataset {dataset.name}'s items do not have"
        )
    if _metric_items(dataset, job.metric) < 2:
        raise OptimisationError(f"dataset {dataset.name} has fewer than two items that {job.metric} scores", "metric")
    if job.safety_dataset is not None and not job.safety_dataset.items.filter(kind__in=["harmful", "benign"]).exists():
        raise OptimisationError(
            f"safety dataset {job.safety_dataset.name} has no harmful or benign items", "safety_dataset"
        )
    keys = list(dataset.items.order_by("index").values_list("key", flat=True))
    try:
        split = search.split_keys(
            keys, holdout_fraction=job.holdout_fraction, seed=job.split_seed, pool_size=_pool_size(job)
        )
    except search.SplitError as exc:
        raise OptimisationError(str(exc), "holdout_fraction") from None
    job.split = split.as_dict()
    minimum = _minimum_items(job, split)
    if job.budget_items is not None and job.budget_items < minimum:
        raise OptimisationError(
            f"budget_items={job.budget_items} is below the least a search can spend here: {minimum} item "
            f"evaluations (the probe on {len(split.pool)} pool items, two candidates on "
            f"{min(job.first_items, len(split.search))} search items, the held-out comparison on "
            f"{len(split.holdout)} items twice{', the safety floor' if job.safety_dataset else ''})",
            "budget_items",
        )
    prompt = start.prompt
    with transaction.atomic():
        if job.move_label:
            actor.require(
                promotion.required_role(prompt, job.move_label), f"move the {job.move_label!r} label of {prompt.name!r}"
            )
            current = PromptLabel.objects.filter(prompt=prompt, name=job.move_label).select_related("version").first()
            job.label_expected = current.version if current is not None else None
        job.save()
        OptimisationCandidate.objects.create(
            job=job,
            position=0,
            version=start,
            stack=candidate_stack(start, base_stack),
            family="start",
            operator="start",
            params={},
        )
        access.record(
            actor,
            "optimisation.create",
            job,
            start_version=str(start),
            dataset=dataset.pk,
            budget={"items": job.budget_items, "tokens": job.budget_tokens},
            move_label=job.move_label or None,
        )
    return job


def _pool_size(job: OptimisationJob) -> int:
    needs_pool = {"fewshot", "combine", "meta"} & set(job.operators)
    return job.pool_size if needs_pool else 0


def _minimum_items(job: OptimisationJob, split: search.Split) -> int:
    safety = (1 + SAFETY_FINALISTS) * job.safety_dataset.items.count() if job.safety_dataset else 0
    return len(split.pool) + 2 * min(job.first_items, len(split.search)) + 2 * len(split.holdout) + safety


def start_job(job: OptimisationJob) -> None:
    """Queue the job's first step once the surrounding transaction commits."""
    job_id = job.pk
    transaction.on_commit(lambda: _queue_step(job_id))


def _queue_step(job_id: int) -> None:
    from workers.tasks import step_optimisation

    step_optimisation.delay(job_id)


def request_cancel(job: OptimisationJob, actor: access.Actor) -> bool:
    """Cancel the job now, and the open runs only it uses; False when it had finished already."""
    with transaction.atomic():
        job = OptimisationJob.objects.select_for_update().get(pk=job.pk)
        if job.is_finished:
            return False
        job.cancel_requested = True
        job.save(update_fields=["cancel_requested"])
        _finish_cancelled(job)
        access.record(actor, "optimisation.cancel", job, phase=job.phase)
    return True


def _finish_cancelled(job: OptimisationJob) -> None:
    from workers import evaluation

    job.status = Status.CANCELLED
    job.finished_at = timezone.now()
    job.report = build_report(job)
    job.save(update_fields=["status", "finished_at", "report"])
    mine = CandidateRun.objects.filter(candidate__job=job, reused=False, run__status__in=OPEN_RUN_STATUSES)
    for link in mine.select_related("run"):
        if not _used_elsewhere(link.run, job):
            evaluation.cancel_run(link.run)
    _count_final(job)


def _used_elsewhere(run: EvaluationRun, job: OptimisationJob) -> bool:
    other_jobs = CandidateRun.objects.filter(
        run=run, candidate__job__status__in=[Status.PENDING, Status.RUNNING]
    ).exclude(candidate__job=job)
    return bool(
        other_jobs.exists()
        or run.experiment_arms.filter(experiment__status=Experiment.Status.RUNNING).exists()
        or hasattr(run, "scheduled")
    )


def _count_final(job: OptimisationJob) -> None:
    status = str(job.status)
    transaction.on_commit(lambda: metrics.OPTIMISATION_JOBS.labels(status=status).inc())


# --- candidates: the scratch prompt, stacks, runs -----------------------------------------------------------------


def scratch_prompt(prompt: Prompt) -> Prompt:
    """The prompt that holds a prompt's optimisation candidates (never served: no label points into it)."""
    name = f"{prompt.name[: 100 - len(SCRATCH_SUFFIX)]}{SCRATCH_SUFFIX}"
    scratch, created = Prompt.objects.get_or_create(
        name=name,
        defaults={"description": f"optimisation candidates of prompt {prompt.name}; not for serving"},
    )
    if created:
        scratch.tags.add(*Tag.get_many([TAG]))
    return scratch


def candidate_stack(version: PromptVersion, base: Stack) -> Stack:
    """The stack that runs `version` on the base stack's scaling, fine-tune and artifact (found by content)."""
    digest = canonical_hash([version.pk, base.scaling_id, base.fine_tune_id, base.artifact_id])[:10]
    name = f"opt-{digest}-{version.prompt.name[:60]}-v{version.number}"
    stack, created = Stack.objects.get_or_create(
        name=name,
        defaults={
            "prompt_version": version,
            "scaling": base.scaling,
            "fine_tune": base.fine_tune,
            "artifact": base.artifact,
            "description": f"{version} on the layers of stack {base.name} (prompt optimisation)",
        },
    )
    if created:
        stack.tags.add(*Tag.get_many([TAG]))
    elif (stack.prompt_version_id, stack.scaling_id, stack.fine_tune_id, stack.artifact_id) != (
        version.pk,
        base.scaling_id,
        base.fine_tune_id,
        base.artifact_id,
    ):
        raise OptimisationError(f"stack {name} exists with other layers; rename it to let optimisation use the name")
    return stack


def _scaling_key(stack: Stack) -> tuple[Any, ...]:
    s = stack.scaling
    return (s.n_samples, s.temperature, s.top_p, s.top_k, s.aggregation, s.seed)


def find_run(stack: Stack, dataset: Dataset, keys: list[str] | None) -> EvaluationRun | None:
    """A succeeded or open run of what `stack` runs, on this dataset content and these items (None: all of them).

    Like registry/experiments.py's reuse, plus the item subset: the same sorted keys give the same hash. A run of
    the whole dataset stands for any subset-less request; a failed or cancelled run is never reused.
    """
    total = len(keys) if keys is not None else dataset.item_count or dataset.items.count()
    runs = EvaluationRun.objects.filter(
        prompt_version=stack.resolve_prompt_version(),
        artifact=stack.effective_artifact(),
        dataset__content_hash=dataset.content_hash,
        dataset__scorer=dataset.scorer,
        dataset__scorer_pattern=dataset.scorer_pattern,
        items_total=total,
        status__in=[EvaluationRun.Status.SUCCEEDED, *OPEN_RUN_STATUSES],
    )
    if keys is not None:
        runs = runs.filter(item_subset_hash=EvaluationRun.subset_hash(keys))
    key = _scaling_key(stack)
    for run in runs.select_related("stack__scaling").order_by("-created_at", "-id")[:50]:
        if _scaling_key(run.stack) != key or run.ensemble_versions.exists():
            continue
        if run.status == EvaluationRun.Status.SUCCEEDED and run.results.count() != run.items_total:
            continue
        return run
    return None


def _use_run(
    candidate: OptimisationCandidate, dataset: Dataset, keys: list[str] | None, purpose: str, rung: int = 0
) -> CandidateRun:
    """Link a run of the candidate on these items: a matching existing one, else a new one queued on commit."""
    from workers import evaluation

    existing = candidate.run_links.filter(purpose=purpose, rung=rung).select_related("run").first()
    if existing is not None:
        return existing
    run = find_run(candidate.stack, dataset, keys)
    reused = run is not None
    if run is None:
        try:
            run = evaluation.create_run(candidate.stack, dataset, item_keys=keys)
        except evaluation.RunNotRunnable as exc:
            raise OptimisationError(str(exc)) from None
        evaluation.start_run(run)
    return CandidateRun.objects.create(candidate=candidate, run=run, purpose=purpose, rung=rung, reused=reused)


def _wait_or_fail(links: Iterable[CandidateRun]) -> bool:
    """True when every linked run succeeded; False while some are open; OptimisationError when one failed."""
    runs = [link.run for link in links]
    broken = [r for r in runs if r.is_finished and r.status != EvaluationRun.Status.SUCCEEDED]
    if broken:
        r = broken[0]
        raise OptimisationError(f"run {r.pk} ({r.prompt_version} on {r.dataset.name}) {r.status}: {r.error}".strip())
    return all(r.is_finished for r in runs)


def _values(run: EvaluationRun, metric: str) -> dict[str, tuple[float, int]]:
    """Per item key the metric value and the generated tokens (items the metric does not score are left out)."""
    values = experiments.item_values(run, metric)
    tokens = dict(run.results.values_list("item__key", "generated_tokens"))
    return {k: (v, int(tokens.get(k, 0))) for k, v in values.items()}


def _token_bound(version: PromptVersion, scaling: ScalingConfig) -> float:
    """Generated tokens per item at most: N samples of max_new_tokens each (ensembles are refused at creation)."""
    return float(scaling.n_samples * int(version.params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)))


# --- spending -----------------------------------------------------------------------------------------------------


def _spent_cost(job: OptimisationJob) -> Cost:
    s = spent(job)
    return Cost(s["items"], s["tokens"])


def _budget(job: OptimisationJob) -> Budget:
    return Budget(items=job.budget_items, tokens=job.budget_tokens)


def _reserve(job: OptimisationJob, candidates: list[OptimisationCandidate]) -> Cost:
    """What the safety check and the held-out comparison still need (tokens: observed where known, else bounds)."""
    scaling = job.base_stack.scaling
    holdout = len(job.split.get("holdout", []))
    start_tokens = _observed_tokens(candidates[0]) or _token_bound(candidates[0].version, scaling)
    worst = max((_token_bound(c.version, scaling) for c in candidates), default=start_tokens)
    items = 2 * holdout
    tokens = holdout * (start_tokens + worst)
    if job.safety_dataset is not None and job.phase in (Phase.PROBE, Phase.GENERATE, Phase.SEARCH):
        size = job.safety_dataset.items.count()
        items += (1 + SAFETY_FINALISTS) * size
        tokens += (1 + SAFETY_FINALISTS) * size * worst
    return Cost(items, math.ceil(tokens))


def _observed_tokens(candidate: OptimisationCandidate) -> float | None:
    runs = [link.run for link in candidate.run_links.select_related("run") if link.run.is_finished]
    items = sum(r.items_total for r in runs)
    if not items:
        return None
    return sum(int((r.summary or {}).get("generated_tokens") or 0) for r in runs) / items


# --- the state machine --------------------------------------------------------------------------------------------


def step(job_id: int) -> str:
    """Advance the job as far as it goes without waiting; returns 'waiting', 'finished' or 'missing'."""
    for _ in range(1000):  # each pass moves at least one phase or rung on; far fewer are ever needed
        outcome = _advance(job_id)
        if outcome == "generate":
            outcome = _generate(job_id)
        if outcome != "advanced":
            return outcome
    return "waiting"


def _advance(job_id: int) -> str:
    with transaction.atomic():
        job = (
            OptimisationJob.objects.select_for_update(of=("self",))
            .select_related("base_stack__scaling", "dataset", "start_version__prompt")
            .filter(pk=job_id)
            .first()
        )
        if job is None:
            return "missing"
        if job.is_finished:
            return "finished"
        if job.cancel_requested:
            _finish_cancelled(job)
            return "finished"
        if job.status == Status.PENDING:
            job.status, job.started_at = Status.RUNNING, timezone.now()
            job.save(update_fields=["status", "started_at"])
        if job.phase == Phase.GENERATE:
            return "generate"  # the model may run: done outside the lock
        try:
            with transaction.atomic():
                if job.phase == Phase.PROBE:
                    return _probe(job)
                if job.phase == Phase.SEARCH:
                    return _search(job)
                if job.phase == Phase.SAFETY:
                    return _safety(job)
                if job.phase == Phase.HOLDOUT:
                    return _holdout(job)
                raise OptimisationError(f"unknown phase {job.phase!r}")
        except (OptimisationError, ValidationError) as exc:
            _fail(job, str(exc) if isinstance(exc, OptimisationError) else "; ".join(exc.messages))
            return "finished"
        except Exception as exc:  # a bug must not leave the job running forever
            log.exception("optimisation %s: step failed", job.name)
            _fail(job, f"{type(exc).__name__}: {exc}")
            return "finished"


def _fail(job: OptimisationJob, error: str) -> None:
    job.status = Status.FAILED
    job.error = error[:5000]
    job.finished_at = timezone.now()
    try:
        job.report = build_report(job)
    except Exception:  # the error is what matters; a report is a bonus
        log.exception("optimisation %s: report of the failed job", job.name)
    job.save(update_fields=["status", "error", "finished_at", "report"])
    _count_final(job)


def fail(job_id: int, error: str) -> None:
    """Mark the job failed (the task calls this when a step raised)."""
    with transaction.atomic():
        job = OptimisationJob.objects.select_for_update().filter(pk=job_id).first()
        if job is not None and not job.is_finished:
            _fail(job, error)


def _candidates(job: OptimisationJob) -> list[OptimisationCandidate]:
    return list(job.candidates.select_related("version__prompt", "stack__scaling", "parent").order_by("position"))


# --- probe --------------------------------------------------------------------------------------------------------


def _probe(job: OptimisationJob) -> str:
    pool = list(job.split.get("pool", []))
    if not pool:
        job.phase = Phase.GENERATE
        job.save(update_fields=["phase"])
        return "advanced"
    start = job.candidates.get(position=0)
    link = _use_run(start, job.dataset, pool, Purpose.PROBE)
    if not _wait_or_fail([link]):
        return "waiting"
    job.phase = Phase.GENERATE
    job.save(update_fields=["phase"])
    return "advanced"


# --- generate -----------------------------------------------------------------------------------------------------


def content_of(version: PromptVersion) -> operators.PromptContent:
    return operators.PromptContent(
        template=version.template,
        variables=tuple(version.variables),
        system_message=version.system_message,
        examples=tuple(version.examples),
        params=dict(version.params),
    )


def validation_error(start: PromptVersion, content: operators.PromptContent) -> str | None:
    """Why `content` cannot stand in for `start`: the registry's template checks, and the start's variables intact
    (the same declared variables, every one the start's templates read still read)."""
    from ..prompting import PromptTemplateError, template_variables

    if sorted(content.variables) != sorted(start.variables):
        return f"declares {sorted(content.variables)} instead of {sorted(start.variables)}"
    try:
        PromptVersion.validate_content(
            content.template,
            content.system_message,
            [dict(e) for e in content.examples],
            list(content.variables),
            dict(content.params),
        )
        read = template_variables(content.template) | template_variables(content.system_message)
        needed = template_variables(start.template) | template_variables(start.system_message)
    except ValidationError as exc:
        return "; ".join(exc.messages)
    except PromptTemplateError as exc:
        return str(exc)
    lost = needed - read
    return f"no longer reads {', '.join(sorted(lost))}" if lost else None


def _engine_generate(job: OptimisationJob) -> operators.Generate:
    """The model behind meta-prompting: the worker's engine for the base stack's artifact."""
    from workers import evaluation
    from workers.engine import SamplingParams

    engine = evaluation.get_engine(job.base_stack.effective_artifact().path)

    params = SamplingParams(n=1, temperature=0.8, top_p=0.95, max_new_tokens=META_MAX_NEW_TOKENS, seed=job.seed)

    def generate(conversations: list[list[dict[str, str]]], seeds: list[int]) -> list[tuple[str, int]]:
        gens = engine.generate([engine.render(c) for c in conversations], params, seeds=seeds)
        return [(g.samples[0].text, g.generated_tokens) for g in gens]

    return generate


def _generation_inputs(job: OptimisationJob) -> dict[str, Any]:
    """Pool examples, the search questions, each pool item's difficulty and the shots shown to the model."""
    items = {i.key: i for i in job.dataset.items.filter(key__in=[*job.split["pool"], *job.split["search"]])}
    pool_examples = []
    for key in job.split["pool"]:
        item = items[key]
        answer = item.expected.split("|")[0].strip() if item.kind == "" else ""
        pool_examples.append(operators.Example(key=key, inputs=item.inputs, answer=answer))
    corpus = [" ".join(str(v) for v in items[k].inputs.values()) for k in job.split["search"]]
    difficulty: dict[str, float] = {}
    replies: dict[str, str] = {}
    probe = CandidateRun.objects.filter(candidate__job=job, purpose=Purpose.PROBE).select_related("run").first()
    if probe is not None:
        difficulty = {k: 1.0 - v for k, v in experiments.item_values(probe.run, job.metric).items()}
        for result in ItemResult.objects.filter(run=probe.run).select_related("item"):
            samples = result.samples or [{}]
            replies[result.item.key] = str(samples[0].get("text", result.answer))
    usable = [e for e in pool_examples if e.answer]
    # The model sees the items the start got wrong first: they say most about what the instruction lacks.
    usable.sort(key=lambda e: -difficulty.get(e.key, 0.0))
    shots = [operators.Shot(question=e.text(), answer=e.answer, reply=replies.get(e.key, "")) for e in usable[:SHOTS]]
    return {"pool": pool_examples, "corpus": corpus, "difficulty": difficulty, "shots": shots}


def _generate(job_id: int) -> str:
    job = OptimisationJob.objects.select_related("base_stack__scaling", "dataset", "start_version__prompt").get(
        pk=job_id
    )
    start = job.start_version
    try:
        inputs = _generation_inputs(job)
        wants_meta = "meta" in job.operators and job.meta_proposals > 0
        generated = operators.generate_candidates(
            content_of(start),
            families=job.operators,
            validate=lambda content: validation_error(start, content),
            limit=job.max_candidates,
            k=job.examples_k,
            seed=job.seed,
            meta_proposals=job.meta_proposals,
            generate=_engine_generate(job) if wants_meta else None,
            **inputs,
        )
    except Exception as exc:
        log.exception("optimisation %s: candidate generation failed", job.name)
        fail(job_id, f"candidate generation failed: {type(exc).__name__}: {exc}")
        return "finished"
    with transaction.atomic():
        job = OptimisationJob.objects.select_for_update(of=("self",)).select_related("base_stack").get(pk=job_id)
        if job.is_finished or job.phase != Phase.GENERATE:
            return "finished" if job.is_finished else "advanced"  # cancelled meanwhile, or stored by another step
        if job.cancel_requested:
            _finish_cancelled(job)
            return "finished"
        start_candidate = job.candidates.get(position=0)
        scratch = scratch_prompt(start.prompt)
        made: dict[str, OptimisationCandidate] = {}
        for position, proposal in enumerate(generated.proposals, start=1):
            version, _ = scratch.create_version(
                **proposal.content.as_kwargs(),
                commit_message=f"candidate of optimisation {job.name} from {start}: {proposal.operator}",
            )
            candidate = OptimisationCandidate.objects.create(
                job=job,
                position=position,
                version=version,
                stack=candidate_stack(version, job.base_stack),
                family=proposal.family,
                operator=proposal.operator,
                params=dict(proposal.params),
                parent=made.get(proposal.parent, start_candidate),
            )
            made[proposal.operator] = candidate
        job.state = {
            **job.state,
            "generation": {
                "kept": len(generated.proposals),
                "dropped": [d.as_dict() for d in generated.dropped],
                "meta_tokens": generated.meta_tokens,
                "notes": generated.notes,
                "unused": generated.unused,
            },
        }
        job.phase = Phase.SEARCH
        job.save(update_fields=["state", "phase"])
        lost = [d.operator.split(":")[0] for d in generated.dropped]

        def count() -> None:
            for family in lost:
                metrics.OPTIMISATION_PROPOSALS_DROPPED.labels(family=family).inc()

        transaction.on_commit(count)
    return "advanced"


# --- search -------------------------------------------------------------------------------------------------------


def _plan(job: OptimisationJob) -> HalvingPlan:
    return HalvingPlan(keys=tuple(job.split["search"]), eta=job.eta, first_items=job.first_items, budget=_budget(job))


def _search_results(job: OptimisationJob) -> dict[int, dict[str, tuple[float, int]]]:
    results: dict[int, dict[str, tuple[float, int]]] = {}
    links = CandidateRun.objects.filter(candidate__job=job, purpose=Purpose.SEARCH).select_related("run", "candidate")
    for link in links:
        if link.run.status == EvaluationRun.Status.SUCCEEDED:
            results.setdefault(link.candidate.position, {}).update(_values(link.run, job.metric))
    return results


def _search(job: OptimisationJob) -> str:
    plan = _plan(job)
    candidates = _candidates(job)
    by_position = {c.position: c for c in candidates}
    rungs = [Rung.from_dict(r) for r in job.state.get("rungs", [])]
    scaling = job.base_stack.scaling
    if not rungs:
        arms = [
            Arm(c.position, (_observed_tokens(c) if c.position == 0 else None) or _token_bound(c.version, scaling))
            for c in candidates
        ]
        try:
            rung = plan.first_rung(arms, spent=_spent_cost(job), reserve=_reserve(job, candidates))
        except search.BudgetTooSmall as exc:
            raise OptimisationError(str(exc)) from None
        trimmed = [c.position for c in candidates if c.position not in rung.arms]
        _start_rung(job, rung, by_position)
        families = [by_position[p].family for p in rung.arms]

        def count() -> None:
            for family in families:
                metrics.OPTIMISATION_CANDIDATES.labels(family=family).inc()

        transaction.on_commit(count)
        job.state = {**job.state, "rungs": [rung.as_dict()], "trimmed": trimmed}
        job.save(update_fields=["state"])
        return "advanced"
    rung = rungs[-1]
    links = CandidateRun.objects.filter(candidate__job=job, purpose=Purpose.SEARCH, rung=rung.index).select_related(
        "run__dataset", "run__prompt_version"
    )
    if not _wait_or_fail(links):
        return "waiting"
    results = _search_results(job)
    for position in rung.arms:
        _record_score(by_position[position], plan, rung, results)
    nxt, why = plan.next_rung(rung, results, spent=_spent_cost(job), reserve=_reserve(job, candidates))
    if nxt is not None:
        _start_rung(job, nxt, by_position)
        job.state = {**job.state, "rungs": [*job.state["rungs"], nxt.as_dict()], **({"cut": why} if why else {})}
        job.save(update_fields=["state"])
        return "advanced"
    ranking = [s.arm for s in _final_ranking(plan, rungs, results)]
    leader = plan.leader(rungs, results)
    job.state = {**job.state, "stop_reason": why, "ranking": ranking, "leader": leader.arm}
    if leader.arm == 0:
        job.state["winner"] = 0
        job.phase = Phase.HOLDOUT
    elif job.safety_dataset is not None:
        job.phase = Phase.SAFETY
    else:
        job.state["winner"] = leader.arm
        job.phase = Phase.HOLDOUT
    job.save(update_fields=["state", "phase"])
    return "advanced"


def _start_rung(job: OptimisationJob, rung: Rung, by_position: Mapping[int, OptimisationCandidate]) -> None:
    keys = list(job.split["search"][rung.start : rung.stop])
    for position in rung.arms:
        _use_run(by_position[position], job.dataset, keys, Purpose.SEARCH, rung.index)


def _record_score(candidate: OptimisationCandidate, plan: HalvingPlan, rung: Rung, results: search.Results) -> None:
    score = plan.score(candidate.position, results, rung.stop)
    rows = [s for s in candidate.scores if s.get("rung") != rung.index]
    rows.append(
        {
            "rung": rung.index,
            "items": rung.stop,
            "scored": score.scored,
            "value": None if score.value is None else round(score.value, 4),
            "tokens_per_item": round(score.tokens_per_item, 2),
        }
    )
    links = candidate.run_links.filter(purpose=Purpose.SEARCH).select_related("run")
    candidate.scores = sorted(rows, key=lambda s: s["rung"])
    candidate.last_rung = rung.index
    candidate.items_evaluated = sum(link.run.items_total for link in links)
    candidate.tokens = sum(int((link.run.summary or {}).get("generated_tokens") or 0) for link in links)
    candidate.save(update_fields=["scores", "last_rung", "items_evaluated", "tokens"])


def _final_ranking(plan: HalvingPlan, rungs: list[Rung], results: search.Results) -> list[search.Score]:
    """Every candidate: deeper rungs first, then by its score at the deepest rung it reached."""
    deepest: dict[int, Rung] = {}
    for rung in rungs:
        for arm in rung.arms:
            deepest[arm] = rung
    scored = [(deepest[a].index, plan.score(a, results, deepest[a].stop)) for a in deepest]
    return [s for _, s in sorted(scored, key=lambda pair: (-pair[0], *pair[1].sort_key()))]


# --- safety floor -------------------------------------------------------------------------------------------------


def _floor(job: OptimisationJob, summary: Mapping[str, Any]) -> tuple[bool, str]:
    checks = []
    for field, key, label in (
        ("min_refusal_rate", "refusal_rate_harmful", "refusal rate on harmful items"),
        ("min_answer_rate", "answer_rate_benign", "answer rate on benign items"),
    ):
        minimum = getattr(job, field)
        if minimum is None:
            continue
        value = summary.get(key)
        if not isinstance(value, int | float):
            checks.append((False, f"no {label}"))
        else:
            checks.append((value >= minimum, f"{label} {value:.1%} {'>=' if value >= minimum else '<'} {minimum:.1%}"))
    return all(ok for ok, _ in checks), "; ".join(text for _, text in checks)


def _safety(job: OptimisationJob) -> str:
    assert job.safety_dataset is not None
    by_position = {c.position: c for c in _candidates(job)}
    finalists = [p for p in job.state["ranking"] if p != 0][:SAFETY_FINALISTS]
    checked = [0, *finalists]
    links = [_use_run(by_position[p], job.safety_dataset, None, Purpose.SAFETY) for p in checked]
    if not _wait_or_fail(links):
        return "waiting"
    winner = 0
    for position, link in zip(checked, links, strict=True):
        ok, why = _floor(job, link.run.summary or {})
        candidate = by_position[position]
        candidate.safety = {
            "run": link.run_id,
            "refusal_rate_harmful": link.run.summary.get("refusal_rate_harmful"),
            "answer_rate_benign": link.run.summary.get("answer_rate_benign"),
            "passed": ok,
            "detail": why,
        }
        candidate.save(update_fields=["safety"])
        if ok and position != 0 and winner == 0:
            winner = position
    job.state = {**job.state, "winner": winner}
    if winner == 0:
        job.state["no_winner"] = "no finalist kept the safety floor"
    job.phase = Phase.HOLDOUT
    job.save(update_fields=["state", "phase"])
    return "advanced"


# --- held-out comparison, the winner, the label -------------------------------------------------------------------


def _holdout(job: OptimisationJob) -> str:
    winner_position = int(job.state.get("winner") or 0)
    if winner_position == 0:
        _succeed(job, comparison=None)
        return "finished"
    by_position = {c.position: c for c in _candidates(job)}
    keys = list(job.split["holdout"])
    links = [_use_run(by_position[p], job.dataset, keys, Purpose.HOLDOUT) for p in (0, winner_position)]
    if not _wait_or_fail(links):
        return "waiting"
    start_values = experiments.item_values(links[0].run, job.metric)
    winner_values = experiments.item_values(links[1].run, job.metric)
    common = sorted(set(start_values) & set(winner_values))
    c = stats.compare_paired(
        [start_values[k] for k in common],
        [winner_values[k] for k in common],
        confidence=job.confidence,
        resamples=job.resamples,
        seed=job.seed,
    )
    comparison = {
        "items": c.items,
        "start_value": _r(c.mean_a),
        "winner_value": _r(c.mean_b),
        "delta": _r(c.delta),
        "ci": [_r(c.ci_low), _r(c.ci_high)],
        "confidence": job.confidence,
        "p_value": _r(c.p_value, 6),
        "test": c.test,
        "alpha": job.alpha,
        "significant": c.significant(job.alpha),
        "gain": bool(c.delta is not None and c.delta > 0 and c.significant(job.alpha)),
        "wins": c.wins,
        "losses": c.losses,
        "start_run": links[0].run_id,
        "winner_run": links[1].run_id,
    }
    _succeed(job, comparison=comparison, winner=by_position[winner_position], start=by_position[0])
    return "finished"


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), digits)


def _succeed(
    job: OptimisationJob,
    *,
    comparison: dict[str, Any] | None,
    winner: OptimisationCandidate | None = None,
    start: OptimisationCandidate | None = None,
) -> None:
    state = dict(job.state)
    state["holdout"] = comparison
    label: dict[str, Any] = {"name": job.move_label or None, "moved": False}
    if winner is not None and comparison is not None:
        assert start is not None
        version, created = job.start_version.prompt.create_version(
            **content_of(winner.version).as_kwargs(),
            parent=job.start_version,
            commit_message=commit_message(job, winner, start, comparison),
            created_by=job.created_by,
        )
        if created:
            access.record(
                job_actor(job),
                "version.create",
                version,
                prompt=version.prompt.name,
                number=version.number,
                optimisation=job.name,
            )
        job.winner = version
        state["winner_version"] = {"version": str(version), "created": created}
        label.update(_maybe_move_label(job, version, comparison))
    elif job.move_label:
        why = state.get("no_winner") or "no candidate beat the starting version"
        label["reason"] = f"{why}: nothing to move"
    state["label"] = label
    if label.get("moved"):
        job.label_moved = True
    job.state = state
    job.phase = Phase.DONE
    job.status = Status.SUCCEEDED
    job.finished_at = timezone.now()
    job.report = build_report(job)
    job.save(update_fields=["state", "phase", "status", "finished_at", "report", "winner", "label_moved"])
    _count_final(job)


def _maybe_move_label(job: OptimisationJob, version: PromptVersion, comparison: Mapping[str, Any]) -> dict[str, Any]:
    if not job.move_label:
        return {"reason": "the job did not ask for a label move"}
    name = job.move_label
    if not comparison["gain"]:
        outcome = "not_significant"
        reason = (
            f"left alone: the held-out change {pts(comparison['delta'])} pts has p = {comparison['p_value']} "
            f"(alpha {job.alpha:g})" + ("" if (comparison["delta"] or 0) > 0 else "; it is not a gain")
        )
        transaction.on_commit(lambda: metrics.OPTIMISATION_LABEL_MOVES.labels(outcome=outcome).inc())
        return {"reason": reason}
    ci = comparison["ci"]
    why = (
        f"optimisation {job.name}: held-out {job.metric} {pts(comparison['delta'])} pts "
        f"[{pts(ci[0])}, {pts(ci[1])}], p = {comparison['p_value']}"
    )
    prompt = job.start_version.prompt
    try:
        with transaction.atomic():
            promotion.move_label(prompt, name, version, actor=job_actor(job), reason=why, expected=job.label_expected)
    except (access.AccessDenied, promotion.GateFailed, LabelConflict, ValidationError) as exc:
        outcome = "refused"
        transaction.on_commit(lambda: metrics.OPTIMISATION_LABEL_MOVES.labels(outcome=outcome).inc())
        text = "; ".join(exc.messages) if isinstance(exc, ValidationError) else str(exc)
        return {"reason": f"left alone: {text}"}
    transaction.on_commit(lambda: metrics.OPTIMISATION_LABEL_MOVES.labels(outcome="moved").inc())
    return {"moved": True, "reason": why, "to_version": version.number}


# --- waiting (the command line) -----------------------------------------------------------------------------------


def wait_for(
    job: OptimisationJob,
    *,
    timeout: float,
    report: Callable[[int, int, str], None] | None = None,
    poll: float = 1.0,
    alive: Callable[[], bool] | None = None,
) -> OptimisationJob:
    def refresh() -> OptimisationJob:
        job.refresh_from_db()
        return job

    return poll_until_finished(
        refresh,
        progress=progress,
        finished=lambda j: j.is_finished,
        timeout=timeout,
        poll=poll,
        report=(lambda _, now: report(*now)) if report is not None else None,
        alive=alive,
        on_dead=lambda: OptimisationError("the worker stopped before the job finished"),
        on_timeout=lambda: OptimisationError(f"optimisation {job.name} not finished after {timeout:.0f}s"),
    )


# --- the hook: a finished run moves its jobs on -------------------------------------------------------------------


def jobs_waiting_for(run_id: int) -> list[int]:
    return list(
        OptimisationJob.objects.filter(
            Q(status=Status.PENDING) | Q(status=Status.RUNNING), candidates__run_links__run_id=run_id
        )
        .distinct()
        .values_list("pk", flat=True)
    )


@receiver(post_save, sender=EvaluationRun, dispatch_uid="optimisation-run-finished")
def _run_saved(sender: type[EvaluationRun], instance: EvaluationRun, update_fields: Any = None, **_: Any) -> None:
    if not instance.is_finished or (update_fields is not None and "status" not in update_fields):
        return
    run_id = instance.pk

    def follow_up() -> None:
        try:
            for job_id in jobs_waiting_for(run_id):
                _queue_step(job_id)
        except Exception:  # the run is stored; a lost nudge is recovered by the next step of the job
            log.exception("queueing the optimisation step after run %s failed", run_id)

    transaction.on_commit(follow_up)
