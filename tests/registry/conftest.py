"""Fixtures shared by the registry tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from registry.models import (
    Dataset,
    DatasetItem,
    EvaluationRun,
    FineTune,
    FineTuneJob,
    ItemResult,
    ModelArtifact,
    Prompt,
    PromptVersion,
    ScalingConfig,
    Stack,
)


@pytest.fixture
def prompt(db: None) -> Prompt:
    return Prompt.objects.create(name="qa", description="question answering")


@pytest.fixture
def make_version(prompt: Prompt) -> Callable[..., PromptVersion]:
    """Store a version of the `qa` prompt; keyword arguments override the defaults."""

    def make(**overrides: Any) -> PromptVersion:
        content: dict[str, Any] = {"template": "Q: {{ question }}\nA:", "variables": ["question"]}
        content.update(overrides)
        version, _ = prompt.create_version(**content)
        return version

    return make


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[[str, str | bytes], Path]:
    """Write text or bytes to tmp_path/name and return the path."""

    def write(name: str, content: str | bytes) -> Path:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    return write


def _artifact(name: str = "tiny", sha: str = "a", parent: ModelArtifact | None = None) -> ModelArtifact:
    return ModelArtifact.objects.create(
        name=name,
        sha256=sha * 64,
        path=f"/tmp/artifacts/{name}",
        parameter_count=135_000_000,
        size_bytes=540_000_000,
        source_kind=ModelArtifact.SourceKind.GGUF,
        source_path=f"/tmp/{name}.gguf",
        source_sha256="f" * 64,
        parent=parent,
    )


@pytest.fixture
def make_artifact(db: None) -> Callable[..., ModelArtifact]:
    """Store a ModelArtifact: make_artifact(name="tiny", sha="a", parent=None); sha repeats to 64 chars."""
    return _artifact


@pytest.fixture
def registry_objects(db: None, make_version: Callable[..., PromptVersion], prompt: Prompt) -> dict[str, Any]:
    """One object of every registry model, wired together the way a real evaluation would be."""
    version = make_version(commit_message="first cut", examples=[{"inputs": {"question": "1+1?"}, "output": "2"}])
    move = prompt.move_label("prod", version, reason="ship it")
    base = _artifact("tiny", "a")
    quantised = _artifact("tiny-int8", "b", parent=base)
    fine_tune = FineTune.objects.create(
        name="tiny-lora", base_artifact=base, result_artifact=quantised, training_dataset_hash="c" * 64
    )
    scaling = ScalingConfig.objects.create(name="greedy")
    stack = Stack.objects.create(name="baseline", prompt_version=version, scaling=scaling, artifact=base)
    follow = Stack.objects.create(
        name="follow-prod", prompt=prompt, prompt_label="prod", scaling=scaling, artifact=base
    )
    dataset = Dataset.objects.create(name="arith", content_hash="d" * 64, item_count=1)
    item = DatasetItem.objects.create(dataset=dataset, index=0, key="q1", inputs={"question": "2+2?"}, expected="4")
    run = EvaluationRun.objects.create(
        stack=stack,
        dataset=dataset,
        prompt_version=version,
        artifact=base,
        status=EvaluationRun.Status.SUCCEEDED,
        items_total=1,
        items_done=1,
        provider="CPUExecutionProvider",
        summary={"accuracy": 1.0},
    )
    result = ItemResult.objects.create(
        run=run,
        item=item,
        rendered_prompt="Q: 2+2?\nA:",
        samples=[{"text": "4", "answer": "4"}],
        answer="4",
        score=1.0,
        generated_tokens=1,
    )
    job = FineTuneJob.objects.create(
        name="qa-lora",
        base_artifact=base,
        dataset=dataset,
        prompt_version=version,
        hyperparameters={"steps": 4, "batch_size": 2},
        spec_hash="e" * 64,
        status=FineTuneJob.Status.RUNNING,
        steps_done=2,
        steps_total=4,
        loss_curve=[[1, 3.5], [2, 2.25]],
        device="cpu",
    )
    return {
        "prompt": prompt,
        "promptversion": version,
        "finetunejob": job,
        "promptlabel": move.label,
        "labelmove": move,
        "modelartifact": quantised,
        "finetune": fine_tune,
        "scalingconfig": scaling,
        "stack": follow,
        "dataset": dataset,
        "datasetitem": item,
        "evaluationrun": run,
        "itemresult": result,
    }
