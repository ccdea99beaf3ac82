"""Helpers of the fine-tune tests: the tiny model as a trainable base, a small training set, a prompt version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from registry.models import Dataset, DatasetItem, FineTuneJob, ModelArtifact, Prompt, PromptVersion
from workers import convert, finetuning

PAIRS = [
    ("What is two plus two?", "four"),
    ("What is the capital of France?", "Paris"),
    ("How many legs does a spider have?", "eight"),
    ("Name a primary colour.", "red"),
    ("Translate the word house into French.", "maison"),
    ("Translate the word water into Spanish.", "agua"),
]
# Enough steps at a high rate for the tiny random model to learn six pairs by heart (a second or two on a CPU).
QUICK = {"steps": 40, "batch_size": 6, "learning_rate": 0.02, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0}


def tiny_base(onnx_dir: Path, hf_dir: Path, name: str = "tiny") -> ModelArtifact:
    """The tiny ONNX artifact, imported (as far as the registry knows) from its Hugging Face folder."""
    built = convert.load_converted(onnx_dir)
    return ModelArtifact.objects.create(
        name=name,
        sha256=built.sha256,
        path=str(onnx_dir),
        parameter_count=built.parameter_count,
        source_kind=ModelArtifact.SourceKind.HF,
        source_path=str(hf_dir),
        source_sha256=convert.source_sha256(hf_dir),
        chat_template=built.chat_template,
    )


def training_set(name: str = "pairs") -> Dataset:
    dataset = Dataset.objects.create(name=name, content_hash=(name * 64)[:64], item_count=len(PAIRS))
    for index, (question, answer) in enumerate(PAIRS):
        DatasetItem.objects.create(
            dataset=dataset, index=index, key=f"p{index}", inputs={"question": question}, expected=answer
        )
    return dataset


def prompt_version(name: str = "ask") -> PromptVersion:
    prompt, _ = Prompt.objects.get_or_create(name=name)
    version, _ = prompt.create_version(
        template="{{ question }}", variables=["question"], system_message="Answer in one word."
    )
    return version


def new_job(base: ModelArtifact, dataset: Dataset, version: PromptVersion, **overrides: Any) -> FineTuneJob:
    kwargs: dict[str, Any] = {"name": "tiny-pairs", "method": "lora", "hyperparameters": dict(QUICK), "seed": 0}
    kwargs.update(overrides)
    job, created = finetuning.create_job(base_artifact=base, dataset=dataset, prompt_version=version, **kwargs)
    assert created
    return job
