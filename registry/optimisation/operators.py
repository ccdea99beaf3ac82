"""Prompt candidates from a starting version: instruction edits, few-shot examples, model-proposed rewrites.

Plain Python (no Django, no engine): the model is reached through a `generate` callable the worker backs with
its engine, and every candidate goes through a `validate` callable the registry backs with its own template
checks, so a candidate that could not be stored as a PromptVersion never reaches the search.

Operators, each recorded on the candidate it made (name and parameters):

* `instruction`  one edit from a fixed library: reason step by step and end with "Answer: …", answer-only
                 format, a role line, brevity (each with the generation length it needs);
* `fewshot`      k worked examples from the search split's pool (never from held-out items): `random` (seeded),
                 `similar` (closest by TF-IDF cosine to the centroid of the search questions, the closest last,
                 next to the question) or `hard` (items the starting version got wrong, easy to hard); `reorder`
                 reverses the starting version's own examples;
* `combine`      an instruction edit on top of a few-shot candidate (its parent);
* `meta`         the model rewrites the instruction itself, shown example questions, their answers and what the
                 starting version replied; a proposal that is empty, too long, a duplicate or not a valid
                 template is dropped and counted.

Families are interleaved (instruction, few-shot, meta, combine, ...) so that trimming the list to the budget
keeps variety.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

FAMILIES = ("instruction", "fewshot", "meta", "combine")

# name -> (where the text goes, the text, max_new_tokens it needs: None keeps the start's)
INSTRUCTION_EDITS: dict[str, tuple[str, str, int | None]] = {
    "answer_format": ("system", "Reply with only the final answer: no explanation, no extra words.", None),
    "step_by_step": (
        "user",
        'Think step by step, then give the final answer on the last line as "Answer: <answer>".',
        96,
    ),
    "role": ("system", "You are a meticulous expert. Read the question carefully and answer it correctly.", None),
    "brevity": ("system", "Keep your reply as short as possible.", 16),
}
# Instruction edits stacked on a few-shot candidate: the examples show the format the instruction asks for.
COMBINATIONS = ("answer_format", "role")

META_SYSTEM = "You write instructions that make an AI assistant answer questions correctly."
META_STYLES = (
    "in one short sentence",
    "that asks for the final answer only",
    "that tells the assistant how to work out the answer",
    "that says exactly how to format the answer",
    "that describes the assistant's role and the task",
    "in two short sentences",
)
META_MAX_CHARS = 400
META_MIN_CHARS = 12
# A small model often continues the examples it was shown instead of writing an instruction.
_ECHO_RE = re.compile(r"(?:question|correct answer|answer|the assistant replied)\s*:", re.IGNORECASE)
_LABEL_RE = re.compile(
    r"^\s*(?:\*\*)?(?:here is |here's )?(?:an? |the )?(?:new |better |improved |revised )?"
    r"(?:instruction|prompt)s?(?:\*\*)?\s*[:：-]\s*(?:\*\*)?\s*",
    re.IGNORECASE,
)


@dataclass(frozen=True, eq=False)
class PromptContent:
    """What a PromptVersion stores, without the registry around it."""

    template: str
    variables: tuple[str, ...]
    system_message: str = ""
    examples: tuple[Mapping[str, Any], ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        """sha256 of the content, equal for equal content (the registry hashes versions the same way)."""
        blob = json.dumps(
            {
                "template": self.template,
                "system_message": self.system_message,
                "examples": [dict(e) for e in self.examples],
                "variables": sorted(self.variables),
                "params": dict(self.params),
            },
            sort_keys=True,
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of Prompt.create_version."""
        return {
            "template": self.template,
            "variables": list(self.variables),
            "system_message": self.system_message,
            "examples": [dict(e) for e in self.examples],
            "params": dict(self.params),
        }

    def with_instruction(self, place: str, text: str) -> PromptContent:
        if place == "system":
            system = f"{self.system_message.rstrip()}\n{text}" if self.system_message.strip() else text
            return replace(self, system_message=system)
        return replace(self, template=f"{self.template.rstrip()}\n\n{text}")

    def with_params(self, **changes: Any) -> PromptContent:
        return replace(self, params={**self.params, **changes})


@dataclass(frozen=True)
class Example:
    """A pool item usable as a worked example: its key, inputs and the answer to show."""

    key: str
    inputs: Mapping[str, Any]
    answer: str

    def text(self) -> str:
        return " ".join(str(v) for v in self.inputs.values())

    def as_example(self) -> dict[str, Any]:
        return {"inputs": dict(self.inputs), "output": self.answer}


@dataclass(frozen=True)
class Shot:
    """A question shown to the model when it proposes a rewrite: the right answer and the start's reply."""

    question: str
    answer: str
    reply: str = ""


@dataclass(frozen=True)
class Proposal:
    content: PromptContent
    family: str
    operator: str  # e.g. "instruction:answer_format", "fewshot:similar", "meta"
    params: Mapping[str, Any]
    parent: str = ""  # operator of the proposal it builds on; "" = the starting version


@dataclass(frozen=True)
class Dropped:
    operator: str
    reason: str
    text: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"operator": self.operator, "reason": self.reason, "text": self.text[:300]}


@dataclass
class Generated:
    proposals: list[Proposal]
    dropped: list[Dropped]
    meta_tokens: int = 0
    notes: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # operators of valid proposals beyond the limit


Validate = Callable[[PromptContent], str | None]  # an error message, or None when the content is storable
# (conversations, seeds) -> (text, generated tokens) per conversation
Generate = Callable[[list[list[dict[str, str]]], list[int]], list[tuple[str, int]]]


# --- instruction edits -------------------------------------------------------------------------------------------


def instruction_edit(start: PromptContent, name: str) -> Proposal:
    place, text, max_new_tokens = INSTRUCTION_EDITS[name]
    content = start.with_instruction(place, text)
    params: dict[str, Any] = {"edit": name, "placement": place, "text": text}
    if max_new_tokens is not None:
        current = int(start.params.get("max_new_tokens", 0) or 0)
        # Reasoning needs room; brevity caps it. Either way the token cost follows the instruction.
        tokens = (
            max(current, max_new_tokens) if name == "step_by_step" else min(current or max_new_tokens, max_new_tokens)
        )
        content = content.with_params(max_new_tokens=tokens)
        params["max_new_tokens"] = tokens
    return Proposal(content, "instruction", f"instruction:{name}", params)


# --- few-shot selection -------------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def tfidf(docs: Sequence[str]) -> list[dict[str, float]]:
    """L2-normalised TF-IDF vectors (smoothed idf) of the documents."""
    tokenised = [_words(d) for d in docs]
    df: Counter[str] = Counter()
    for words in tokenised:
        df.update(set(words))
    n = len(docs)
    vectors = []
    for words in tokenised:
        counts = Counter(words)
        vec = {w: c * (math.log((1 + n) / (1 + df[w])) + 1) for w, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
        vectors.append({w: v / norm for w, v in vec.items()})
    return vectors


def _cosine(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    if len(a) > len(b):
        a, b = b, a
    dot = sum(v * b.get(w, 0.0) for w, v in a.items())
    na = math.sqrt(sum(v * v for v in a.values())) or 1.0
    nb = math.sqrt(sum(v * v for v in b.values())) or 1.0
    return dot / (na * nb)


def select_random(pool: Sequence[Example], k: int, seed: int) -> list[Example]:
    chosen = list(pool)
    random.Random(seed).shuffle(chosen)
    return chosen[:k]


def select_similar(pool: Sequence[Example], corpus: Sequence[str], k: int) -> list[Example]:
    """The k pool examples closest (TF-IDF cosine) to the centroid of the search questions, the closest last."""
    vectors = tfidf([e.text() for e in pool] + list(corpus))
    pool_vecs, corpus_vecs = vectors[: len(pool)], vectors[len(pool) :]
    centroid: dict[str, float] = {}
    for vec in corpus_vecs or pool_vecs:
        for w, v in vec.items():
            centroid[w] = centroid.get(w, 0.0) + v
    ranked = sorted(range(len(pool)), key=lambda i: (-_cosine(pool_vecs[i], centroid), pool[i].key))
    return [pool[i] for i in reversed(ranked[:k])]


def select_hard(pool: Sequence[Example], difficulty: Mapping[str, float], k: int, seed: int) -> list[Example]:
    """The k hardest pool examples (1 = the starting version got it wrong), ordered easy to hard."""
    known = [e for e in pool if e.key in difficulty]
    ranked = sorted(known, key=lambda e: (-difficulty[e.key], _tiebreak(seed, e.key)))[:k]
    return sorted(ranked, key=lambda e: (difficulty[e.key], _tiebreak(seed, e.key)))


def _tiebreak(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def fewshot(start: PromptContent, strategy: str, chosen: Sequence[Example], **extra: Any) -> Proposal:
    content = replace(start, examples=tuple(e.as_example() for e in chosen))
    params = {"strategy": strategy, "k": len(chosen), "keys": [e.key for e in chosen], **extra}
    return Proposal(content, "fewshot", f"fewshot:{strategy}", params)


def reorder(start: PromptContent) -> Proposal:
    content = replace(start, examples=tuple(reversed(start.examples)))
    return Proposal(content, "fewshot", "fewshot:reorder", {"strategy": "reverse", "k": len(start.examples)})


# --- meta-prompting -----------------------------------------------------------------------------------------------


def meta_messages(instruction: str, shots: Sequence[Shot], style: str) -> list[dict[str, str]]:
    """The conversation that asks the model for a better instruction."""
    lines = ["Here are questions the assistant has to answer, with their correct answers."]
    for shot in shots:
        lines.append(f"Question: {shot.question}\nCorrect answer: {shot.answer}")
        if shot.reply:
            lines.append(f"The assistant replied: {_clip(shot.reply, 160)}")
    lines.append(f'The current instruction is: "{instruction}"' if instruction else "There is no instruction yet.")
    lines.append(f"Write a better instruction for the assistant, {style}. Reply with the instruction only.")
    return [{"role": "system", "content": META_SYSTEM}, {"role": "user", "content": "\n\n".join(lines)}]


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_instruction(text: str) -> tuple[str | None, str]:
    """The instruction in a model's reply, cleaned; or None and why it cannot be one."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    if not paragraphs:
        return None, "empty reply"
    first = _LABEL_RE.sub("", paragraphs[0])
    if not first.strip() and len(paragraphs) > 1:  # "Instruction:" on a line of its own
        first = paragraphs[1]
    cleaned = " ".join(first.split()).strip().strip("\"“”'`*").strip()
    if _ECHO_RE.match(cleaned):
        return None, "echoes the examples instead of giving an instruction"
    if len(cleaned) < META_MIN_CHARS:
        return None, "too short to be an instruction"
    if len(cleaned) > META_MAX_CHARS:
        return None, f"longer than {META_MAX_CHARS} characters"
    return cleaned, ""


def meta_rewrites(
    start: PromptContent, shots: Sequence[Shot], generate: Generate, *, n: int, seed: int
) -> tuple[list[Proposal], list[Dropped], int]:
    """n rewrites of the start's instruction (its system message) proposed by the model; (kept, dropped, tokens)."""
    if n <= 0:
        return [], [], 0
    instruction = start.system_message.strip()
    styles = [META_STYLES[i % len(META_STYLES)] for i in range(n)]
    conversations = [meta_messages(instruction, shots, style) for style in styles]
    seeds = [seed * 1000 + i for i in range(n)]
    replies = generate(conversations, seeds)
    kept: list[Proposal] = []
    dropped: list[Dropped] = []
    tokens = 0
    for i, (style, seed_i, (text, used)) in enumerate(zip(styles, seeds, replies, strict=True)):
        tokens += used
        parsed, why = parse_instruction(text)
        if parsed is not None and any(s.question[:40] in parsed for s in shots if len(s.question) >= 20):
            parsed, why = None, "repeats an example question instead of giving an instruction"
        if parsed is None:
            dropped.append(Dropped("meta", why, text))
            continue
        content = replace(start, system_message=parsed)
        params = {"proposal": i + 1, "style": style, "seed": seed_i, "instruction": parsed}
        kept.append(Proposal(content, "meta", "meta", params))
    return kept, dropped, tokens


# --- all of it ----------------------------------------------------------------------------------------------------


def generate_candidates(
    start: PromptContent,
    *,
    families: Iterable[str],
    validate: Validate,
    limit: int,
    pool: Sequence[Example] = (),
    corpus: Sequence[str] = (),
    difficulty: Mapping[str, float] | None = None,
    shots: Sequence[Shot] = (),
    k: int = 3,
    seed: int = 0,
    meta_proposals: int = 0,
    generate: Generate | None = None,
) -> Generated:
    """Up to `limit` distinct, valid candidates other than the start, interleaved across families."""
    families = set(families)
    unknown = families - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown operator famil(ies) {sorted(unknown)}; known: {', '.join(FAMILIES)}")
    by_family: dict[str, list[Proposal]] = {f: [] for f in FAMILIES}
    dropped: list[Dropped] = []
    notes: list[str] = []
    meta_tokens = 0
    if "instruction" in families:
        by_family["instruction"] = [instruction_edit(start, name) for name in INSTRUCTION_EDITS]
    shots_pool = [e for e in pool if e.answer]
    if "fewshot" in families or "combine" in families:
        fewshots: list[Proposal] = []
        if len(shots_pool) >= k > 0:
            fewshots.append(fewshot(start, "similar", select_similar(shots_pool, corpus, k)))
            if difficulty:
                hard = select_hard(shots_pool, difficulty, k, seed)
                fewshots.append(fewshot(start, "hard", hard, difficulty=[difficulty[e.key] for e in hard]))
            fewshots.append(fewshot(start, "random", select_random(shots_pool, k, seed), seed=seed))
        else:
            notes.append(f"few-shot: the pool has {len(shots_pool)} usable example(s), fewer than k={k}")
        if len(start.examples) >= 2:
            fewshots.append(reorder(start))
        if "fewshot" in families:
            by_family["fewshot"] = fewshots
        if "combine" in families and fewshots and "instruction" in families:
            base = fewshots[0]
            for name in COMBINATIONS:
                place, text, _ = INSTRUCTION_EDITS[name]
                combined = Proposal(
                    base.content.with_instruction(place, text),
                    "combine",
                    f"combine:{name}+{base.operator}",
                    {"edit": name, "placement": place, "text": text, "on": base.operator},
                    parent=base.operator,
                )
                by_family["combine"].append(combined)
    if "meta" in families:
        if generate is None:
            notes.append("meta: no model to propose rewrites")
        else:
            kept, lost, meta_tokens = meta_rewrites(start, shots, generate, n=meta_proposals, seed=seed)
            by_family["meta"] = kept
            dropped.extend(lost)

    seen = {start.key()}
    out: list[Proposal] = []
    queues = [list(by_family[f]) for f in FAMILIES if by_family[f]]
    while queues and len(out) < limit:
        for queue in list(queues):
            if not queue:
                queues.remove(queue)
                continue
            proposal = queue.pop(0)
            key = proposal.content.key()
            if key in seen:
                dropped.append(Dropped(proposal.operator, "duplicate of an earlier candidate or of the start"))
                continue
            error = validate(proposal.content)
            if error:
                dropped.append(Dropped(proposal.operator, f"invalid: {error}", proposal.content.system_message))
                continue
            seen.add(key)
            out.append(proposal)
            if len(out) >= limit:
                break
    unused = [p.operator for queue in queues for p in queue]
    return Generated(out, dropped, meta_tokens, notes, unused)
