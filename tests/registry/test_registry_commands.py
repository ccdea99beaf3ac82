"""The load_dataset and prompt management commands."""

from __future__ import annotations

import json
from collections.abc import Callable
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from registry.models import Dataset, DatasetItem, LabelMove, Prompt, PromptVersion

pytestmark = pytest.mark.django_db

WriteFile = Callable[[str, str | bytes], Path]

ITEMS = '{"id": "q1", "question": "2+2?", "expected": "4"}\n{"id": "q2", "question": "3+3?", "expected": "6"}\n'


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


# --- load_dataset -------------------------------------------------------------------------------------------


def test_load_dataset_creates_then_reports_the_dataset_already_present(write_file: WriteFile) -> None:
    path = str(write_file("arith.jsonl", ITEMS))
    first = run("load_dataset", path, "--name", "arith", "--scorer", "numeric", "--description", "sums")
    dataset = Dataset.objects.get()
    assert "Created dataset 'arith'" in first
    assert "2 items" in first
    assert dataset.content_hash in first
    assert dataset.description == "sums"
    assert dataset.scorer == "numeric"

    second = run("load_dataset", path, "--name", "arith", "--scorer", "numeric")
    assert "already present" in second
    assert dataset.content_hash in second
    assert (Dataset.objects.count(), DatasetItem.objects.count()) == (1, 2)


def test_load_dataset_turns_a_bad_file_into_a_command_error(write_file: WriteFile) -> None:
    path = write_file("arith.jsonl", ITEMS + '{"id": "q3", "question": \n')
    with pytest.raises(CommandError, match=r"arith\.jsonl, line 3: malformed JSON"):
        run("load_dataset", str(path), "--name", "arith", "--scorer", "numeric")
    assert not Dataset.objects.exists()


def test_load_dataset_rejects_an_unknown_scorer(write_file: WriteFile) -> None:
    path = write_file("arith.jsonl", ITEMS)
    with pytest.raises(CommandError, match="invalid choice: 'fuzzy'"):
        run("load_dataset", str(path), "--name", "arith", "--scorer", "fuzzy")
    assert not Dataset.objects.exists()


def test_load_dataset_takes_the_format_from_an_option(write_file: WriteFile) -> None:
    path = write_file("arith.data", "id,question,expected\nq1,2+2?,4\n")
    output = run("load_dataset", str(path), "--name", "arith", "--scorer", "numeric", "--format", "csv")
    assert "1 items" in output
    assert DatasetItem.objects.get().inputs == {"question": "2+2?"}


# --- prompt create ------------------------------------------------------------------------------------------


def test_prompt_create_stores_a_version_and_dedupes_identical_content(write_file: WriteFile) -> None:
    examples = write_file("examples.json", json.dumps([{"inputs": {"question": "1+1?"}, "output": "2"}]))
    args = (
        "prompt",
        "create",
        "qa",
        "--template",
        "Q: {{ question }}",
        "--variables",
        "question",
        "--system",
        "Answer briefly.",
        "--examples-file",
        str(examples),
        "--params",
        '{"max_new_tokens": 16}',
        "--message",
        "first cut",
    )
    first = run(*args)
    version = PromptVersion.objects.get()
    assert "Created prompt 'qa'" in first
    assert "Stored qa@v1" in first
    assert version.examples == [{"inputs": {"question": "1+1?"}, "output": "2"}]
    assert version.params == {"max_new_tokens": 16}
    assert (version.system_message, version.commit_message) == ("Answer briefly.", "first cut")

    second = run(*args)
    assert "already stored as qa@v1" in second
    assert PromptVersion.objects.count() == 1


def test_prompt_create_numbers_versions_and_takes_a_parent(write_file: WriteFile) -> None:
    run("prompt", "create", "qa", "--template", "Q: {{ question }}", "--variables", "question")
    run("prompt", "create", "qa", "--template", "Question: {{ question }}", "--variables", "question")
    template = write_file("t.j2", "{{ question }}\nAnswer:")
    output = run("prompt", "create", "qa", "--template-file", str(template), "--variables", "question", "--parent", "1")
    v3 = PromptVersion.objects.get(number=3)
    assert "Stored qa@v3 (parent v1" in output
    assert v3.template == "{{ question }}\nAnswer:"


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        pytest.param(["--template", "{{ question }} {{ context }}", "--variables", "question"], "undeclared", id="var"),
        pytest.param(["--template", "{{ ''.__class__ }}"], "private attribute", id="sandbox"),
        pytest.param(["--template", "{{ q }}", "--variables", "q", "--params", "{oops"], "not valid JSON", id="json"),
        pytest.param(["--template", "{{ q }}", "--variables", "q", "--params", "[1]"], "JSON object", id="params"),
        pytest.param(["--template", "{{ q }}", "--variables", "q", "--params", '{"beams": 2}'], "unknown", id="param"),
        pytest.param(["--template", "{{ q }}", "--variables", "q", "--parent", "7"], "no version 7", id="parent"),
        pytest.param(["--template", "{{ q }}", "--template-file", "x"], "not allowed with", id="two-templates"),
    ],
)
def test_prompt_create_reports_bad_input_and_stores_nothing(extra: list[str], problem: str) -> None:
    with pytest.raises(CommandError, match=problem):
        run("prompt", "create", "qa", *extra)
    assert not Prompt.objects.exists()
    assert not PromptVersion.objects.exists()


def test_prompt_create_rejects_a_name_that_is_not_a_slug() -> None:
    with pytest.raises(CommandError, match="must be a slug"):
        run("prompt", "create", "my prompt", "--template", "x")


# --- prompt label / history ---------------------------------------------------------------------------------


@pytest.fixture
def two_versions() -> Prompt:
    run(
        "prompt",
        "create",
        "qa",
        "--template",
        "Q: {{ question }}",
        "--variables",
        "question",
        "--message",
        "v1",
    )
    run("prompt", "create", "qa", "--template", "Question: {{ question }}", "--variables", "question")
    return Prompt.objects.get(name="qa")


def test_prompt_label_moves_and_rolls_back_with_history(two_versions: Prompt) -> None:
    assert "qa:prod (new label) -> v1" in run("prompt", "label", "qa", "prod", "1")
    assert "qa:prod v1 -> v2" in run("prompt", "label", "qa", "prod", "2", "--reason", "better")
    assert "qa:prod v2 -> v1" in run("prompt", "label", "qa", "prod", "1", "--reason", "rollback")
    assert two_versions.version_for_label("prod").number == 1
    moves = [(m.from_version and m.from_version.number, m.to_version.number, m.reason) for m in LabelMove.objects.all()]
    assert moves == [(2, 1, "rollback"), (1, 2, "better"), (None, 1, "")]


def test_prompt_label_to_the_current_version_records_nothing(two_versions: Prompt) -> None:
    run("prompt", "label", "qa", "prod", "1")
    assert "already points at v1" in run("prompt", "label", "qa", "prod", "1")
    assert LabelMove.objects.count() == 1


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        pytest.param(["nope", "prod", "1"], "no prompt named 'nope' \\(prompts: qa\\)", id="prompt"),
        pytest.param(["qa", "prod", "9"], "prompt 'qa' has no version 9 \\(versions: 1, 2\\)", id="version"),
        pytest.param(["qa", "Prod!", "1"], "lower-case", id="label-name"),
        pytest.param(["qa", "prod", "one"], "invalid int value", id="not-a-number"),
    ],
)
def test_prompt_label_reports_bad_input(two_versions: Prompt, args: list[str], problem: str) -> None:
    with pytest.raises(CommandError, match=problem):
        run("prompt", "label", *args)
    assert not LabelMove.objects.exists()


def test_prompt_history_lists_versions_labels_and_moves(two_versions: Prompt) -> None:
    run("prompt", "label", "qa", "prod", "1")
    run("prompt", "label", "qa", "prod", "2", "--reason", "better")
    output = run("prompt", "history", "qa")
    assert "2 version(s); labels: prod -> v2" in output
    assert "v2 " in output and "parent v1" in output and "[prod]" in output
    assert "v1 " in output and "v1" in output
    assert "prod: v1 -> v2  better" in output
    assert "prod: (new) -> v1" in output
    assert output.index("prod: v1 -> v2") < output.index("prod: (new) -> v1")


def test_prompt_history_of_an_unknown_prompt_is_an_error() -> None:
    with pytest.raises(CommandError, match="no prompt named 'ghost'"):
        run("prompt", "history", "ghost")


def test_prompt_requires_a_subcommand() -> None:
    with pytest.raises(CommandError):
        run("prompt")


def test_load_dataset_passes_the_regex_pattern_on(write_file: WriteFile) -> None:
    path = str(write_file("arith.jsonl", ITEMS))
    output = run("load_dataset", path, "--name", "arith", "--scorer", "regex", "--scorer-pattern", r"=\s*(\d+)")
    assert r"scorer regex (pattern '=\\s*(\\d+)')" in output
    assert Dataset.objects.get().scorer_pattern == r"=\s*(\d+)"
    with pytest.raises(CommandError, match="needs a pattern"):
        run("load_dataset", path, "--name", "other", "--scorer", "regex")
