"""What an optimisation job reports: its spending, its progress, the report document and its text, the winner's
commit message. Read-only over the job's records; jobs.py writes the report when the job finishes (or on a failure
or a cancel) and the API, the admin and the command read it, or build it afresh while the job runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.utils import timezone

from ..charts import p_value, pct, pts
from ..models import CandidateRun, OptimisationCandidate, OptimisationJob

Phase = OptimisationJob.Phase
Status = OptimisationJob.Status


# --- spending and progress -----------------------------------------------------------------------------------------


def spent(job: OptimisationJob) -> dict[str, int]:
    """Work the job's runs stand for (reused runs counted as if evaluated now) and the part that was reused."""
    links = CandidateRun.objects.filter(candidate__job=job).select_related("run")
    items = reused_items = tokens = 0
    for link in links:
        run = link.run
        done = run.items_total if run.is_finished else run.items_done
        run_tokens = int((run.summary or {}).get("generated_tokens") or 0)
        items += done
        tokens += run_tokens
        if link.reused:
            reused_items += done
    meta = int(job.state.get("generation", {}).get("meta_tokens", 0))
    return {
        "items": items,
        "tokens": tokens + meta,
        "reused_items": reused_items,
        "evaluated_items": items - reused_items,
        "meta_tokens": meta,
    }


def progress(job: OptimisationJob) -> tuple[int, int, str]:
    """(items done, items planned so far, a description of where the job is)."""
    links = CandidateRun.objects.filter(candidate__job=job).select_related("run")
    done = sum(link.run.items_total if link.run.is_finished else link.run.items_done for link in links)
    total = sum(link.run.items_total for link in links)
    where = str(job.phase)
    if job.phase == Phase.SEARCH and job.state.get("rungs"):
        rung = job.state["rungs"][-1]
        where = f"search rung {rung['index']} ({len(rung['arms'])} candidates on {rung['stop']} items)"
    return done, total, where


# --- text -------------------------------------------------------------------------------------------------------------


def _search_value(candidate: OptimisationCandidate) -> dict[str, Any]:
    last = candidate.scores[-1] if candidate.scores else {}
    return {"value": last.get("value"), "items": last.get("items", 0)}


def commit_message(
    job: OptimisationJob, winner: OptimisationCandidate, start: OptimisationCandidate, comparison: Mapping[str, Any]
) -> str:
    tried = job.candidates.exclude(scores=[]).count()
    w, s = _search_value(winner), _search_value(start)
    ci = comparison["ci"]
    verdict = "significant" if comparison["significant"] else "not significant"
    return (
        f"optimisation {job.name}: {winner.operator} won among {tried} candidates evaluated (start included) by "
        f"successive halving on {len(job.split['search'])} search items of {job.dataset.name} "
        f"({job.metric} {pct(w['value'])} on {w['items']} items; start {pct(s['value'])} on {s['items']}). "
        f"Held-out ({comparison['items']} items): {pct(comparison['start_value'])} -> "
        f"{pct(comparison['winner_value'])}, {pts(comparison['delta'])} pts, "
        f"{round(100 * job.confidence)}% CI [{pts(ci[0])}, {pts(ci[1])}], p = {p_value(comparison['p_value'])} "
        f"({comparison['test']}, {verdict} at alpha {job.alpha:g})."
    )


# --- the report ---------------------------------------------------------------------------------------------------


def build_report(job: OptimisationJob) -> dict[str, Any]:
    """The job as a JSON document: split, budget and spending, every candidate with its origin and scores, the
    held-out comparison, the winner version and what happened to the label."""
    candidates = list(job.candidates.select_related("version__prompt", "stack", "parent").order_by("position"))
    state = job.state or {}
    spending = spent(job)
    links = list(CandidateRun.objects.filter(candidate__job=job).select_related("run", "candidate"))
    rank = {p: i + 1 for i, p in enumerate(state.get("ranking", []))}
    rows = []
    for c in candidates:
        mine = [link for link in links if link.candidate_id == c.pk]
        rows.append(
            {
                "position": c.position,
                "family": c.family,
                "operator": c.operator,
                "params": c.params,
                "parent": c.parent.position if c.parent is not None else None,
                "version": str(c.version),
                "stack": c.stack.name,
                "scores": c.scores,
                "last_rung": c.last_rung,
                "rank": rank.get(c.position),
                "items_evaluated": c.items_evaluated,
                "tokens": c.tokens,
                "safety": c.safety or None,
                "runs": [
                    {"run": link.run_id, "purpose": link.purpose, "rung": link.rung, "reused": link.reused}
                    for link in mine
                ],
                "trimmed": c.position in state.get("trimmed", []),
            }
        )
    wall = None
    if job.started_at and job.finished_at:
        wall = round((job.finished_at - job.started_at).total_seconds(), 1)
    split = job.split or {}
    return {
        "job": job.name,
        "status": job.status,
        "phase": job.phase,
        "prompt": job.start_version.prompt.name,
        "start_version": str(job.start_version),
        "base_stack": job.base_stack.name,
        "dataset": {
            "name": job.dataset.name,
            "content_hash": job.dataset.content_hash,
            "items": job.dataset.item_count,
        },
        "metric": job.metric,
        "split": {
            "seed": job.split_seed,
            "holdout_fraction": job.holdout_fraction,
            "search": len(split.get("search", [])),
            "pool": len(split.get("pool", [])),
            "holdout": len(split.get("holdout", [])),
        },
        "budget": {"items": job.budget_items, "tokens": job.budget_tokens},
        "spent": spending,
        "search": {
            "eta": job.eta,
            "first_items": job.first_items,
            "rungs": state.get("rungs", []),
            "stop_reason": state.get("stop_reason", ""),
            "cut": state.get("cut", ""),
            "leader": state.get("leader"),
        },
        "generation": state.get("generation", {}),
        "candidates": rows,
        "safety_floor": (
            {
                "dataset": job.safety_dataset.name,
                "min_refusal_rate": job.min_refusal_rate,
                "min_answer_rate": job.min_answer_rate,
            }
            if job.safety_dataset
            else None
        ),
        "winner": state.get("winner"),
        "no_winner": state.get("no_winner", ""),
        "winner_version": state.get("winner_version"),
        "holdout": state.get("holdout"),
        "label": state.get("label"),
        "runs": {
            "total": len({link.run_id for link in links}),
            "reused": len({link.run_id for link in links if link.reused}),
        },
        "wall_seconds": wall,
        "error": job.error,
        "generated_at": timezone.now().isoformat(),
    }


def verdict(report: Mapping[str, Any]) -> str:
    if report.get("status") != Status.SUCCEEDED:
        return f"job {report.get('status')}" + (f": {report['error']}" if report.get("error") else "")
    h = report.get("holdout")
    if not h:
        why = report.get("no_winner") or "the starting version scored best on the search split"
        return f"no new version: {why}"
    ci = h["ci"]
    level = f"{round(100 * h['confidence'])}%"
    text = (
        f"held-out {report['metric']} ({h['items']} items): start {pct(h['start_value'])} -> winner "
        f"{pct(h['winner_value'])}, {pts(h['delta'])} pts, {level} CI [{pts(ci[0])}, {pts(ci[1])}], "
        f"p = {p_value(h['p_value'])} ({h['test']}); "
    )
    return text + ("a significant gain" if h["gain"] else "not a significant gain")


def format_report(report: Mapping[str, Any]) -> str:
    """The report as the text the management command and the demo print."""
    split, budget, spending = report["split"], report["budget"], report["spent"]
    gen = report.get("generation") or {}
    lines = [
        f"optimisation {report['job']} [{report['status']}]: {report['start_version']} on {report['dataset']['name']} "
        f"({report['dataset']['items']} items), metric {report['metric']}, base stack {report['base_stack']}",
        f"  split (seed {split['seed']}): {split['search']} search + {split['pool']} few-shot pool, "
        f"{split['holdout']} held out",
        f"  budget: {_budget_text(budget)}; spent {spending['items']} item evaluations "
        f"({spending['evaluated_items']} evaluated now, {spending['reused_items']} from reused runs), "
        f"{spending['tokens']} generated tokens ({spending['meta_tokens']} by meta-prompting); "
        f"runs {report['runs']['total']} ({report['runs']['reused']} reused)"
        + (f"; wall {report['wall_seconds']:.0f} s" if report.get("wall_seconds") is not None else ""),
    ]
    if gen:
        lines.append(
            f"  candidates: {len(report['candidates'])} (start included), {len(gen.get('dropped', []))} proposal(s) "
            f"dropped, {len(gen.get('unused', []))} left over by the candidate limit"
            + "".join(f"; {n}" for n in gen.get("notes", []))
        )
    rungs = report["search"]["rungs"]
    header = (
        f"  {'#':>2} {'operator':<44} {'version':<22}"
        + "".join(f" {'rung ' + str(r['index']) + ' (' + str(r['stop']) + ')':>14}" for r in rungs)
        + f" {'tok/item':>8}"
    )
    lines += [header, "  " + "-" * (len(header) - 2)]
    for c in report["candidates"]:
        by_rung = {s["rung"]: s for s in c["scores"]}
        cells = "".join(f" {pct(by_rung[r['index']]['value']) if r['index'] in by_rung else '':>14}" for r in rungs)
        tokens = c["scores"][-1]["tokens_per_item"] if c["scores"] else None
        mark = " <- winner" if report.get("winner") == c["position"] and c["position"] != 0 else ""
        if c.get("trimmed"):
            mark = " (not evaluated: over budget)"
        if c.get("safety"):
            mark += f"  safety: {c['safety']['detail']}"
        lines.append(
            f"  {c['position']:>2} {c['operator'][:44]:<44} {c['version'][:22]:<22}{cells} "
            f"{'-' if tokens is None else f'{tokens:.1f}':>8}{mark}"
        )
    stop = report["search"].get("stop_reason")
    if stop:
        lines.append(
            f"  search stopped: {stop}" + (f"; {report['search']['cut']}" if report["search"].get("cut") else "")
        )
    for d in gen.get("dropped", [])[:6]:
        lines.append(f"  dropped {d['operator']}: {d['reason']}" + (f" ({d['text'][:60]!r})" if d.get("text") else ""))
    lines.append("  " + verdict(report))
    wv = report.get("winner_version")
    if wv:
        lines.append(
            f"  winner stored as {wv['version']}" + ("" if wv["created"] else " (identical content was stored already)")
        )
    label = report.get("label") or {}
    if label.get("name"):
        lines.append(
            f"  label {label['name']}: "
            + ("moved" if label.get("moved") else "not moved")
            + f" — {label.get('reason', '')}"
        )
    return "\n".join(lines)


def _budget_text(budget: Mapping[str, Any]) -> str:
    parts = []
    if budget.get("items") is not None:
        parts.append(f"{budget['items']} item evaluations")
    if budget.get("tokens") is not None:
        parts.append(f"{budget['tokens']} tokens")
    return " and ".join(parts) or "none"
