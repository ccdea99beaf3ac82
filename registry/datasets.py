"""Import evaluation datasets from JSONL or CSV files.

JSONL: one JSON object a line, e.g.
``{"id": "a1", "inputs": {"question": "..."}, "expected": "42", "kind": ""}``. Without an ``inputs``
object, every field other than ``id``, ``expected`` and ``kind`` is an input.

CSV: a header row; the columns ``id``, ``expected`` and ``kind`` are special, every other column is an input.

An item without an id is keyed by its 1-based line number. ``kind`` is "", "harmful" or "benign".

The whole file is parsed and checked before anything is written, so a bad file leaves the database as it was.
Datasets are content-addressed: importing the same items under the same name again returns the dataset
already stored.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NoReturn, TypedDict

from django.core.exceptions import ValidationError
from django.core.validators import validate_slug
from django.db import IntegrityError, transaction

from .models import Dataset, DatasetItem, canonical_hash

FORMATS = ("jsonl", "csv")
SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
SPECIAL_FIELDS = ("id", "expected", "kind")
KINDS = tuple(DatasetItem.Kind.values)
KEY_MAX_LENGTH = DatasetItem._meta.get_field("key").max_length or 200
NAME_MAX_LENGTH = Dataset._meta.get_field("name").max_length or 100
PATTERN_MAX_LENGTH = Dataset._meta.get_field("scorer_pattern").max_length or 500

Source = str | os.PathLike[str] | IO[bytes] | IO[str]


class DatasetImportError(ValueError):
    """A dataset file that cannot be imported; the message names the file, the line and the problem."""


class ItemRecord(TypedDict):
    key: str
    inputs: dict[str, Any]
    expected: str
    kind: str


class _Problem(Exception):
    """Raised while parsing one line; turned into a DatasetImportError that names the file and line."""


def _fail(label: str, problem: str, line: int | None = None) -> NoReturn:
    where = f"{label}, line {line}" if line is not None else label
    raise DatasetImportError(f"{where}: {problem}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _has_nul(value: Any) -> bool:
    """PostgreSQL cannot store U+0000 in text or jsonb, so such values are refused while parsing."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _reject_constant(name: str) -> NoReturn:
    raise _Problem(f"{name} is not a valid JSON number")


def _normalise(record: dict[str, Any], line: int, *, nested_inputs: bool) -> ItemRecord:
    """One item from a parsed line; raises _Problem naming what is wrong with it."""
    raw_id = record.get("id")
    if raw_id is None:
        key = ""
    elif isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        raise _Problem(f'"id" must be a string or an integer, not {_json_type(raw_id)}')
    else:
        key = str(raw_id).strip()
    if not key:
        key = str(line)
    if len(key) > KEY_MAX_LENGTH:
        raise _Problem(f'"id" is {len(key)} characters long; the limit is {KEY_MAX_LENGTH}')

    raw_expected = record.get("expected")
    if raw_expected is None:
        expected = ""
    elif isinstance(raw_expected, str):
        expected = raw_expected
    elif isinstance(raw_expected, int | float) and not isinstance(raw_expected, bool):
        expected = json.dumps(raw_expected)
    else:
        raise _Problem(f'"expected" must be a string or a number, not {_json_type(raw_expected)}')

    raw_kind = record.get("kind")
    kind = "" if raw_kind is None else raw_kind
    if not isinstance(kind, str) or kind.strip() not in KINDS:
        allowed = ", ".join(repr(k) for k in KINDS)
        raise _Problem(f'unknown kind {raw_kind!r}; "kind" must be one of {allowed}')
    kind = kind.strip()

    if nested_inputs and "inputs" in record:
        inputs = record["inputs"]
        if not isinstance(inputs, dict):
            raise _Problem(f'"inputs" must be a JSON object, not {_json_type(inputs)}')
        extra = sorted(set(record) - {"inputs", *SPECIAL_FIELDS})
        if extra:
            raise _Problem(f'unexpected field(s) {", ".join(extra)} next to "inputs"')
    else:
        inputs = {k: v for k, v in record.items() if k not in SPECIAL_FIELDS}
    if not inputs:
        raise _Problem("the item has no inputs")

    item = ItemRecord(key=key, inputs=inputs, expected=expected, kind=kind)
    if _has_nul(item):
        raise _Problem("contains a NUL character (U+0000), which cannot be stored")
    return item


def _parse_jsonl(text: str, label: str) -> Iterator[tuple[int, ItemRecord]]:
    # Split on "\n" only: JSON strings may hold U+2028 and friends, which str.splitlines() would break on.
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            try:
                record = json.loads(raw, parse_constant=_reject_constant)
            except json.JSONDecodeError as exc:
                raise _Problem(f"malformed JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(record, dict):
                raise _Problem(f"expected a JSON object, got {_json_type(record)}")
            yield line, _normalise(record, line, nested_inputs=True)
        except _Problem as problem:
            _fail(label, str(problem), line)


def _parse_csv(text: str, label: str) -> Iterator[tuple[int, ItemRecord]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    last_line = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            _fail(label, f"malformed CSV: {exc}", reader.line_num)
        # A quoted cell may span lines: report the line the row starts on.
        line, last_line = last_line + 1, reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip() for cell in row]
            if "" in header:
                _fail(label, f"header column {header.index('') + 1} has no name", line)
            duplicates = sorted({name for name in header if header.count(name) > 1})
            if duplicates:
                _fail(label, f"header repeats column(s) {', '.join(duplicates)}", line)
            if not set(header) - set(SPECIAL_FIELDS):
                _fail(
                    label,
                    "the header has no input columns (every column other than id, expected and kind is an input)",
                    line,
                )
            continue
        if len(row) != len(header):
            _fail(label, f"row has {len(row)} columns but the header has {len(header)}", line)
        try:
            yield line, _normalise(dict(zip(header, row, strict=True)), line, nested_inputs=False)
        except _Problem as problem:
            _fail(label, str(problem), line)


def _read(source: Source) -> tuple[str, str]:
    """(label for messages, decoded text)."""
    data: bytes | str
    if isinstance(source, str | os.PathLike):
        label = os.fspath(source)
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            _fail(label, f"cannot read the file: {exc.strerror or exc}")
    else:
        label = str(getattr(source, "name", "") or "<stream>")
        data = source.read()
    if isinstance(data, str):
        return label, data.removeprefix("\ufeff")
    try:
        return label, data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        _fail(label, f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})", line)


def guess_format(label: str) -> str:
    fmt = SUFFIX_FORMATS.get(Path(label).suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(SUFFIX_FORMATS))
        _fail(label, f"cannot tell the format from the file name (known suffixes: {known}); name the format")
    return fmt


def parse_dataset(source: Source, *, fmt: str | None = None) -> list[ItemRecord]:
    """Every item of a dataset file, normalised; DatasetImportError at the first problem. Writes nothing."""
    label, text = _read(source)
    fmt = fmt or guess_format(label)
    if fmt not in FORMATS:
        _fail(label, f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not text.strip():
        _fail(label, "the file is empty")
    parser = _parse_jsonl if fmt == "jsonl" else _parse_csv
    items: list[ItemRecord] = []
    first_line: dict[str, int] = {}
    for line, item in parser(text, label):
        if item["key"] in first_line:
            _fail(label, f"duplicate id {item['key']!r} (first seen on line {first_line[item['key']]})", line)
        first_line[item["key"]] = line
        items.append(item)
    if not items:
        _fail(label, "the file holds no items" + (" (only a header)" if fmt == "csv" else ""))
    return items


def dataset_hash(items: list[ItemRecord]) -> str:
    """Content hash of normalised items, in order."""
    return canonical_hash(items)


def _describe_scoring(scorer: str, scorer_pattern: str) -> str:
    return f"scorer {scorer!r}" + (f" with pattern {scorer_pattern!r}" if scorer_pattern else "")


def check_target(name: str, scorer: str, scorer_pattern: str = "") -> None:
    """DatasetImportError unless `name` is a usable dataset name and `scorer` (with its pattern) can score."""
    try:
        validate_slug(name)
    except ValidationError:
        raise DatasetImportError(f"dataset name {name!r} must be a slug (letters, digits, '-' or '_')") from None
    if len(name) > NAME_MAX_LENGTH:
        raise DatasetImportError(f"dataset name {name!r} is longer than {NAME_MAX_LENGTH} characters")
    if scorer not in Dataset.Scorer.values:
        raise DatasetImportError(f"unknown scorer {scorer!r}; use one of {', '.join(Dataset.Scorer.values)}")
    if scorer == Dataset.Scorer.REGEX:
        if not scorer_pattern:
            raise DatasetImportError("the 'regex' scorer needs a pattern whose first group is the answer")
        if len(scorer_pattern) > PATTERN_MAX_LENGTH:
            raise DatasetImportError(f"the scorer pattern is longer than {PATTERN_MAX_LENGTH} characters")
        try:
            re.compile(scorer_pattern)
        except re.error as exc:
            raise DatasetImportError(f"the scorer pattern {scorer_pattern!r} is not a valid regex: {exc}") from None
    elif scorer_pattern:
        raise DatasetImportError(f"a scorer pattern is only used by the 'regex' scorer, not {scorer!r}")


def find_conflict(items: list[ItemRecord], *, name: str, scorer: str, scorer_pattern: str = "") -> Dataset | None:
    """The dataset already stored with this name and content but scored another way, if any."""
    existing = Dataset.objects.filter(name=name, content_hash=dataset_hash(items)).first()
    if existing is None or (existing.scorer, existing.scorer_pattern) == (scorer, scorer_pattern):
        return None
    return existing


def store_dataset(
    items: list[ItemRecord], *, name: str, scorer: str, scorer_pattern: str = "", description: str = ""
) -> tuple[Dataset, bool]:
    """Write parsed items as a Dataset with its DatasetItems; returns (dataset, created).

    The same name with the same content returns the dataset already stored (created False); the same content
    under the same name scored another way is refused, because the stored dataset would score differently.
    """
    check_target(name, scorer, scorer_pattern)
    if not items:
        raise DatasetImportError(f"dataset {name!r} has no items")
    content_hash = dataset_hash(items)

    existing = Dataset.objects.filter(name=name, content_hash=content_hash).first()
    if existing is None:
        try:
            with transaction.atomic():
                dataset = Dataset.objects.create(
                    name=name,
                    description=description,
                    scorer=scorer,
                    scorer_pattern=scorer_pattern,
                    content_hash=content_hash,
                    item_count=len(items),
                )
                DatasetItem.objects.bulk_create(
                    [DatasetItem(dataset=dataset, index=index, **item) for index, item in enumerate(items)],
                    batch_size=1000,
                )
            return dataset, True
        except IntegrityError:
            # A concurrent import of the same content won the race: return its dataset.
            existing = Dataset.objects.filter(name=name, content_hash=content_hash).first()
            if existing is None:
                raise
    if (existing.scorer, existing.scorer_pattern) != (scorer, scorer_pattern):
        raise DatasetImportError(
            f"dataset {name!r} with this content already exists with "
            f"{_describe_scoring(existing.scorer, existing.scorer_pattern)}, not "
            f"{_describe_scoring(scorer, scorer_pattern)}; import it under another name to score it differently"
        )
    return existing, False


def import_dataset(
    path_or_fileobj: Source,
    *,
    name: str,
    scorer: str,
    fmt: str | None = None,
    description: str = "",
    scorer_pattern: str = "",
) -> tuple[Dataset, bool]:
    """Parse a JSONL or CSV file and store it; returns (dataset, created).

    The format is guessed from the file name's suffix unless `fmt` names it. The 'regex' scorer needs
    `scorer_pattern` (its first group is the answer). Any problem with the file raises DatasetImportError
    before anything is written; see store_dataset for deduplication.
    """
    check_target(name, scorer, scorer_pattern)
    items = parse_dataset(path_or_fileobj, fmt=fmt)
    return store_dataset(items, name=name, scorer=scorer, scorer_pattern=scorer_pattern, description=description)
