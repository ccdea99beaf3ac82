"""Importing datasets from JSONL and CSV."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from registry.datasets import DatasetImportError, import_dataset, parse_dataset
from registry.models import Dataset, DatasetItem, canonical_hash

pytestmark = pytest.mark.django_db

WriteFile = Callable[[str, str | bytes], Path]

JSONL = "\n".join(
    [
        json.dumps({"id": "a1", "inputs": {"question": "What is 6*7?"}, "expected": "42", "kind": ""}),
        json.dumps({"id": "b2", "question": "2+2?", "context": "arithmetic", "expected": 4}),
        "",
        json.dumps({"question": "How do I pick a lock?", "kind": "harmful"}),
    ]
)


def _db_state() -> tuple[int, int]:
    return Dataset.objects.count(), DatasetItem.objects.count()


def test_it_imports_jsonl(write_file: WriteFile) -> None:
    dataset, created = import_dataset(
        write_file("mini.jsonl", JSONL), name="mini", scorer="numeric", description="three items"
    )
    assert created
    assert (dataset.name, dataset.scorer, dataset.description, dataset.item_count) == (
        "mini",
        "numeric",
        "three items",
        3,
    )
    items = list(dataset.items.order_by("index").values("index", "key", "inputs", "expected", "kind"))
    assert items == [
        {"index": 0, "key": "a1", "inputs": {"question": "What is 6*7?"}, "expected": "42", "kind": ""},
        {
            "index": 1,
            "key": "b2",
            "inputs": {"question": "2+2?", "context": "arithmetic"},
            "expected": "4",
            "kind": "",
        },
        # No id: keyed by its line number (line 3 is blank, so this is line 4).
        {
            "index": 2,
            "key": "4",
            "inputs": {"question": "How do I pick a lock?"},
            "expected": "",
            "kind": "harmful",
        },
    ]
    normalised = [{k: item[k] for k in ("key", "inputs", "expected", "kind")} for item in items]
    assert dataset.content_hash == canonical_hash(normalised)


def test_it_imports_csv_with_quoted_multiline_cells(write_file: WriteFile) -> None:
    text = 'id,question,expected,kind\nq1,"line one\nline two",A,\n,"Say hi, politely",hi,benign\n'
    dataset, created = import_dataset(write_file("mini.csv", text), name="mini-csv", scorer="exact")
    assert created
    items = list(dataset.items.order_by("index").values_list("key", "inputs", "expected", "kind"))
    assert items == [
        ("q1", {"question": "line one\nline two"}, "A", ""),
        # No id: keyed by the line the row starts on (the quoted cell above spans lines 2 and 3).
        ("4", {"question": "Say hi, politely"}, "hi", "benign"),
    ]


def test_it_reads_an_open_file_when_told_the_format() -> None:
    stream = io.BytesIO(b'{"id": "x", "question": "?"}\n')
    dataset, created = import_dataset(stream, name="streamed", scorer="exact", fmt="jsonl")
    assert created
    assert dataset.items.get().key == "x"


def test_reimporting_identical_content_returns_the_stored_dataset(write_file: WriteFile) -> None:
    first, created_first = import_dataset(write_file("mini.jsonl", JSONL), name="mini", scorer="numeric")
    before = _db_state()
    # The same items with Windows line ends: same normalised content, same dataset.
    again, created_again = import_dataset(
        write_file("copy.jsonl", JSONL.replace("\n", "\r\n")), name="mini", scorer="numeric"
    )
    assert (created_first, created_again) == (True, False)
    assert again.pk == first.pk
    assert _db_state() == before


def test_the_same_items_from_csv_and_jsonl_hash_alike(write_file: WriteFile) -> None:
    jsonl = '{"id": "q1", "question": "2+2?", "expected": "4"}\n'
    csv_text = "id,question,expected\nq1,2+2?,4\n"
    from_jsonl, _ = import_dataset(write_file("a.jsonl", jsonl), name="same", scorer="numeric")
    from_csv, created = import_dataset(write_file("a.csv", csv_text), name="same", scorer="numeric")
    assert not created
    assert from_csv.pk == from_jsonl.pk


def test_changed_content_under_the_same_name_is_a_new_dataset(write_file: WriteFile) -> None:
    first, _ = import_dataset(write_file("mini.jsonl", JSONL), name="mini", scorer="numeric")
    changed = JSONL.replace('"42"', '"41"')
    second, created = import_dataset(write_file("mini2.jsonl", changed), name="mini", scorer="numeric")
    assert created
    assert second.pk != first.pk
    assert second.content_hash != first.content_hash


def test_it_refuses_the_same_content_under_the_same_name_with_another_scorer(write_file: WriteFile) -> None:
    import_dataset(write_file("mini.jsonl", JSONL), name="mini", scorer="numeric")
    before = _db_state()
    with pytest.raises(DatasetImportError, match="already exists with scorer 'numeric'"):
        import_dataset(write_file("mini.jsonl", JSONL), name="mini", scorer="exact")
    assert _db_state() == before


BAD_FILES = [
    pytest.param("bad.jsonl", '{"id": "a", "q": "x"}\n{"id": "b", "q": \n', 2, "malformed JSON", id="malformed-json"),
    pytest.param("bad.jsonl", '{"id": "a", "q": "x"}\n\n[1, 2]\n', 3, "expected a JSON object, got array", id="array"),
    pytest.param("bad.jsonl", '"just a string"\n', 1, "expected a JSON object, got string", id="string"),
    pytest.param("bad.jsonl", '{"id": "a", "q": "x", "kind": "evil"}\n', 1, "unknown kind 'evil'", id="unknown-kind"),
    pytest.param(
        "bad.jsonl",
        '{"id": "a", "q": "x"}\n{"id": "b", "q": "y"}\n{"id": "a", "q": "z"}\n',
        3,
        "duplicate id 'a' (first seen on line 1)",
        id="duplicate-id",
    ),
    pytest.param(
        "bad.jsonl",
        '{"id": "2", "q": "x"}\n{"q": "y"}\n',
        2,
        "duplicate id '2'",
        id="line-number-key-collides-with-an-id",
    ),
    pytest.param("bad.jsonl", '{"id": "a", "inputs": ["x"]}\n', 1, '"inputs" must be a JSON object', id="inputs-list"),
    pytest.param(
        "bad.jsonl",
        '{"id": "a", "inputs": {"q": 1}, "extra": 2}\n',
        1,
        "unexpected field(s) extra",
        id="extra-field",
    ),
    pytest.param("bad.jsonl", '{"id": "a", "expected": "x"}\n', 1, "no inputs", id="no-inputs"),
    pytest.param("bad.jsonl", '{"id": "a", "q": "x", "expected": [1]}\n', 1, '"expected" must be', id="expected-list"),
    pytest.param("bad.jsonl", '{"id": {"x": 1}, "q": "x"}\n', 1, '"id" must be', id="id-object"),
    pytest.param("bad.jsonl", '{"id": "a", "q": NaN}\n', 1, "NaN is not a valid JSON number", id="nan"),
    pytest.param("bad.jsonl", '{"id": "a", "q": "nul \\u0000 here"}\n', 1, "NUL character", id="nul"),
    pytest.param(
        "bad.jsonl",
        b'{"id": "a", "q": "fine"}\n{"id": "b", "q": "caf\xe9"}\n',
        2,
        "not valid UTF-8 (byte 0xe9",
        id="latin-1-bytes",
    ),
    pytest.param(
        "bad.csv",
        "id,q,expected\na,x,1\nb,y\n",
        3,
        "row has 2 columns but the header has 3",
        id="csv-short-row",
    ),
    pytest.param("bad.csv", "id,q\na,x,extra\n", 2, "row has 3 columns but the header has 2", id="csv-long-row"),
    pytest.param("bad.csv", "id,q,kind\na,x,nasty\n", 2, "unknown kind 'nasty'", id="csv-unknown-kind"),
    pytest.param("bad.csv", "id,q\na,x\na,y\n", 3, "duplicate id 'a'", id="csv-duplicate-id"),
    pytest.param("bad.csv", "id,q,q\na,x,y\n", 1, "header repeats column(s) q", id="csv-duplicate-column"),
    pytest.param("bad.csv", "id,expected\na,1\n", 1, "no input columns", id="csv-no-inputs"),
    pytest.param("bad.csv", 'id,q\na,"unterminated\n', 2, "malformed CSV", id="csv-bad-quoting"),
]


@pytest.mark.parametrize(("filename", "content", "line", "problem"), BAD_FILES)
def test_bad_input_names_the_file_and_line_and_writes_nothing(
    write_file: WriteFile, filename: str, content: str | bytes, line: int, problem: str
) -> None:
    import_dataset(write_file("good.jsonl", JSONL), name="existing", scorer="exact")
    before = _db_state()
    path = write_file(filename, content)
    with pytest.raises(DatasetImportError) as excinfo:
        import_dataset(path, name="broken", scorer="exact")
    message = str(excinfo.value)
    assert message.startswith(f"{path}, line {line}: ")
    assert problem in message
    assert _db_state() == before
    assert not Dataset.objects.filter(name="broken").exists()


@pytest.mark.parametrize(
    ("filename", "content", "problem"),
    [
        pytest.param("empty.jsonl", "", "the file is empty", id="empty"),
        pytest.param("blank.jsonl", "\n  \n\n", "the file is empty", id="blank-lines"),
        pytest.param("header.csv", "id,question,expected\n", "no items (only a header)", id="csv-header-only"),
        pytest.param("data.txt", '{"id": "a", "q": "x"}\n', "cannot tell the format", id="unknown-suffix"),
    ],
)
def test_whole_file_problems_name_the_file(write_file: WriteFile, filename: str, content: str, problem: str) -> None:
    path = write_file(filename, content)
    with pytest.raises(DatasetImportError) as excinfo:
        import_dataset(path, name="broken", scorer="exact")
    assert str(excinfo.value).startswith(f"{path}: ")
    assert problem in str(excinfo.value)
    assert _db_state() == (0, 0)


def test_a_missing_file_is_an_import_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetImportError, match="cannot read the file"):
        import_dataset(tmp_path / "nope.jsonl", name="nope", scorer="exact")


def test_the_format_can_be_named_for_any_suffix(write_file: WriteFile) -> None:
    items = parse_dataset(write_file("data.txt", "id,q\na,x\n"), fmt="csv")
    assert items == [{"key": "a", "inputs": {"q": "x"}, "expected": "", "kind": ""}]


@pytest.mark.parametrize(
    ("name", "scorer", "problem"),
    [("Not A Slug", "exact", "must be a slug"), ("fine", "fuzzy", "unknown scorer 'fuzzy'")],
)
def test_it_rejects_a_bad_name_or_scorer_before_reading(
    write_file: WriteFile, name: str, scorer: str, problem: str
) -> None:
    with pytest.raises(DatasetImportError, match=problem):
        import_dataset(write_file("mini.jsonl", JSONL), name=name, scorer=scorer)
    assert _db_state() == (0, 0)


def test_the_regex_scorer_keeps_its_pattern(write_file: WriteFile) -> None:
    dataset, created = import_dataset(
        write_file("mini.jsonl", JSONL), name="mini", scorer="regex", scorer_pattern=r"(?i)answer:\s*(\w+)"
    )
    assert created
    assert (dataset.scorer, dataset.scorer_pattern) == ("regex", r"(?i)answer:\s*(\w+)")


@pytest.mark.parametrize(
    ("scorer", "pattern", "problem"),
    [
        pytest.param("regex", "", "'regex' scorer needs a pattern", id="regex-without-pattern"),
        pytest.param("regex", "(unclosed", "is not a valid regex", id="bad-regex"),
        pytest.param("exact", r"(\d+)", "only used by the 'regex' scorer", id="pattern-without-regex"),
    ],
)
def test_it_rejects_a_scorer_that_cannot_score(write_file: WriteFile, scorer: str, pattern: str, problem: str) -> None:
    with pytest.raises(DatasetImportError, match=problem):
        import_dataset(write_file("mini.jsonl", JSONL), name="mini", scorer=scorer, scorer_pattern=pattern)
    assert _db_state() == (0, 0)


def test_it_refuses_the_same_content_under_the_same_name_with_another_pattern(write_file: WriteFile) -> None:
    import_dataset(write_file("mini.jsonl", JSONL), name="mini", scorer="regex", scorer_pattern=r"(\d+)")
    before = _db_state()
    with pytest.raises(DatasetImportError, match=r"with pattern '\(\\\\d\+\)', not scorer 'regex' with pattern"):
        import_dataset(write_file("mini.jsonl", JSONL), name="mini", scorer="regex", scorer_pattern=r"(\w+)")
    assert _db_state() == before
    _, created = import_dataset(write_file("mini.jsonl", JSONL), name="mini", scorer="regex", scorer_pattern=r"(\d+)")
    assert not created
