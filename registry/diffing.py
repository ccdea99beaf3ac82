"""What changed between two prompt versions: template, system message, variables, examples and parameters."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Any

from .models import PromptVersion


@dataclass(frozen=True)
class Row:
    """One line of a side-by-side diff; `kind` is equal, insert, delete or replace."""

    kind: str
    left_number: int | None
    left: str
    right_number: int | None
    right: str


def side_by_side(old: str, new: str) -> list[Row]:
    a, b = old.splitlines(), new.splitlines()
    rows: list[Row] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        span = max(i2 - i1, j2 - j1)
        for k in range(span):
            i, j = i1 + k, j1 + k
            left = a[i] if i < i2 else ""
            right = b[j] if j < j2 else ""
            rows.append(Row(tag, i + 1 if i < i2 else None, left, j + 1 if j < j2 else None, right))
    return rows


def _text(old: str, new: str, name: str, a: PromptVersion, b: PromptVersion) -> dict[str, Any]:
    unified = "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True),
            new.splitlines(keepends=True),
            fromfile=f"{a}/{name}",
            tofile=f"{b}/{name}",
        )
    )
    return {"changed": old != new, "old": old, "new": new, "unified": unified}


def _examples(old: list[Any], new: list[Any]) -> dict[str, Any]:
    def key(example: Any) -> str:
        return json.dumps(example, sort_keys=True, ensure_ascii=False)

    a, b = [key(e) for e in old], [key(e) for e in new]
    added: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        pairs = min(i2 - i1, j2 - j1) if tag == "replace" else 0
        for k in range(pairs):
            changed.append({"old_index": i1 + k, "new_index": j1 + k, "old": old[i1 + k], "new": new[j1 + k]})
        removed.extend({"index": i, "example": old[i]} for i in range(i1 + pairs, i2))
        added.extend({"index": j, "example": new[j]} for j in range(j1 + pairs, j2))
    return {"changed": old != new, "added": added, "removed": removed, "modified": changed}


def _params(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    return {
        "changed": old != new,
        "added": {k: new[k] for k in sorted(set(new) - set(old))},
        "removed": {k: old[k] for k in sorted(set(old) - set(new))},
        "modified": {k: {"old": old[k], "new": new[k]} for k in sorted(set(old) & set(new)) if old[k] != new[k]},
    }


def diff_versions(a: PromptVersion, b: PromptVersion) -> dict[str, Any]:
    """A JSON-ready description of every difference from `a` to `b`."""
    return {
        "prompt": a.prompt.name,
        "from_version": a.number,
        "to_version": b.number,
        "identical": a.content_hash == b.content_hash,
        "template": _text(a.template, b.template, "template", a, b),
        "system_message": _text(a.system_message, b.system_message, "system_message", a, b),
        "variables": {
            "changed": sorted(a.variables) != sorted(b.variables),
            "added": sorted(set(b.variables) - set(a.variables)),
            "removed": sorted(set(a.variables) - set(b.variables)),
        },
        "examples": _examples(list(a.examples), list(b.examples)),
        "params": _params(dict(a.params), dict(b.params)),
    }
