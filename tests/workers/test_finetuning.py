"""Fine-tune jobs on the tiny model, in-process: training lowers the loss, the result loads in the engine with its
lineage, cancelling stops training and leaves nothing behind, redelivery and races never register twice, and bad
requests are refused before anything is written."""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone
from finetune_helpers import PAIRS, QUICK, new_job, prompt_version, tiny_base, training_set

from registry.models import FineTune, FineTuneJob, ModelArtifact
from workers import convert, finetuning, training
from workers.engine import Engine, SamplingParams

pytestmark = pytest.mark.django_db


@pytest.fixture
def fine_tunes_dir(settings: Any, tmp_path: Path) -> Path:
    settings.FINE_TUNES_DIR = tmp_path / "fine-tunes"
    return settings.FINE_TUNES_DIR  # type: ignore[no-any-return]


@pytest.fixture
def base(tiny_onnx_dir: Path, tiny_model_dir: Path) -> ModelArtifact:
    return tiny_base(tiny_onnx_dir, tiny_model_dir)


def leftovers(folder: Path) -> list[str]:
    """What is left in a fine-tunes folder (nothing when it was never made)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def greedy_answer(engine: Engine, messages: list[dict[str, str]]) -> str:
    return engine.generate([engine.render(messages)], SamplingParams(max_new_tokens=8))[0].samples[0].text


def test_a_lora_job_lowers_the_loss_and_registers_an_engine_ready_artifact_with_full_lineage(
    base: ModelArtifact, fine_tunes_dir: Path
) -> None:
    dataset, version = training_set(), prompt_version()
    job = new_job(base, dataset, version, seed=3)
    assert job.status == "pending" and job.hyperparameters["target_modules"] == ["q_proj", "v_proj"]

    assert finetuning.run_job(job.pk) == "succeeded"

    job.refresh_from_db()
    assert job.final_loss is not None and job.initial_loss is not None
    assert job.final_loss < job.initial_loss / 4, (job.initial_loss, job.final_loss)
    assert job.steps_done == job.steps_total == QUICK["steps"]
    assert [step for step, _ in job.loss_curve] == list(range(1, QUICK["steps"] + 1))
    assert job.loss_curve[-1][1] < job.loss_curve[0][1]
    assert job.device == "cpu" and job.worker.endswith(f":{os.getpid()}")
    fine_tune = FineTune.objects.select_related("result_artifact").get(job=job)
    result = fine_tune.result_artifact
    assert result is not None
    # Lineage: base -> result, what it was trained on and how, what it took.
    assert fine_tune.base_artifact == base and result.parent == base and result.pk != base.pk
    assert fine_tune.training_dataset == dataset and fine_tune.training_dataset_hash == dataset.content_hash
    assert fine_tune.method == "lora" and fine_tune.hyperparameters == job.hyperparameters
    assert fine_tune.seed == 3 and fine_tune.device == "cpu" and fine_tune.final_loss == job.final_loss
    assert 0 < fine_tune.training_seconds <= fine_tune.worker_seconds == job.worker_seconds
    assert fine_tune.name == job.name
    # The result is an ONNX artifact through the import pipeline (graph rewrites included), kept beside the merged
    # Hugging Face weights it came from, which are its trainable source.
    assert result.sha256 == convert.artifact_sha256(Path(result.path))
    assert result.metadata["graph_version"] == convert.GRAPH_VERSION and result.metadata["fine_tune_job"] == job.pk
    assert result.trainable_source() == training.Source("hf", Path(result.source_path))
    assert Path(result.path).parent.parent == fine_tunes_dir
    # It loads in the engine and answers the training questions as taught; the base did not.
    tuned, untuned = Engine(result.path, provider="cpu", threads=1), Engine(base.path, provider="cpu", threads=1)
    for question, answer in PAIRS:
        messages = version.render_messages({"question": question})
        assert greedy_answer(tuned, messages) == answer
        assert greedy_answer(untuned, messages) != answer


def test_a_fine_tune_can_be_fine_tuned_again_with_all_weights(base: ModelArtifact, fine_tunes_dir: Path) -> None:
    dataset, version = training_set(), prompt_version()
    first = new_job(base, dataset, version, hyperparameters={**QUICK, "steps": 4})
    assert finetuning.run_job(first.pk) == "succeeded"
    child_base = FineTune.objects.get(job=first).result_artifact
    assert child_base is not None
    second = new_job(
        child_base,
        dataset,
        version,
        name="tiny-pairs-full",
        method="full",
        hyperparameters={"steps": 3, "batch_size": 6, "learning_rate": 1e-3},
    )
    assert second.hyperparameters["learning_rate"] == 1e-3 and "lora_r" not in second.hyperparameters
    assert finetuning.run_job(second.pk) == "succeeded"
    result = FineTune.objects.get(job=second).result_artifact
    assert result is not None and result.parent == child_base and child_base.parent == base


def test_training_prompts_are_the_engines_prompts_and_only_the_answer_is_scored(tiny_onnx_dir: Path) -> None:
    engine = Engine(tiny_onnx_dir, provider="cpu", threads=1)
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": PAIRS[0][0]}]
    (row,) = training.tokenise(tiny_onnx_dir, [training.Example(messages, "four")], max_length=512)
    prompt_ids = engine.tokenizer.encode(engine.render(messages))
    assert row.input_ids[: len(prompt_ids)] == prompt_ids
    assert row.labels[: len(prompt_ids)] == [training.IGNORE] * len(prompt_ids)
    reply = row.input_ids[len(prompt_ids) :]
    assert row.labels[len(prompt_ids) :] == reply
    # The reply is the answer and the chat template's end of turn: where the engine stops.
    assert engine.tokenizer.decode(reply).startswith("four")
    assert any(token in engine.tokenizer.stop_ids for token in reply)


def test_cancelling_a_running_job_stops_it_within_a_step_and_leaves_nothing(
    base: ModelArtifact, fine_tunes_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = new_job(base, training_set(), prompt_version(), hyperparameters={**QUICK, "steps": 500})
    seen: list[int] = []
    original = finetuning._Progress.__call__

    def cancel_at_step_3(self: Any, step: int, total: int, loss: float) -> None:
        seen.append(step)
        if step == 3:
            assert finetuning.cancel_job(FineTuneJob.objects.get(pk=self.job_id))  # what the API and admin call
        original(self, step, total, loss)

    monkeypatch.setattr(finetuning._Progress, "__call__", cancel_at_step_3)
    artifacts_before = ModelArtifact.objects.count()

    assert finetuning.run_job(job.pk) == "cancelled"

    job.refresh_from_db()
    assert seen == [1, 2, 3] and job.status == "cancelled" and job.finished_at is not None
    assert not FineTune.objects.exists() and ModelArtifact.objects.count() == artifacts_before
    assert leftovers(fine_tunes_dir) == []
    assert not finetuning.cancel_job(job)  # finished: nothing to cancel


def test_a_pending_job_is_cancelled_at_once_and_its_message_then_does_nothing(
    base: ModelArtifact, fine_tunes_dir: Path
) -> None:
    job = new_job(base, training_set(), prompt_version())
    assert finetuning.cancel_job(job)
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert finetuning.run_job(job.pk) == "skipped"
    assert not FineTune.objects.exists()


def test_a_redelivered_message_does_not_train_again(
    base: ModelArtifact, fine_tunes_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = new_job(base, training_set(), prompt_version(), hyperparameters={**QUICK, "steps": 3})
    assert finetuning.run_job(job.pk) == "succeeded"
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("trained twice"))
    assert finetuning.run_job(job.pk) == "skipped"
    assert FineTune.objects.filter(job=job).count() == 1
    assert len(leftovers(fine_tunes_dir)) == 1


def test_a_worker_that_lost_its_claim_registers_nothing(
    base: ModelArtifact, fine_tunes_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = new_job(base, training_set(), prompt_version(), hyperparameters={**QUICK, "steps": 50})
    original = finetuning._Progress.__call__

    def taken_over_at_step_2(self: Any, step: int, total: int, loss: float) -> None:
        if step == 2:  # another worker restarted the job meanwhile, under its own claim
            FineTuneJob.objects.filter(pk=self.job_id).update(attempt="someone-else")
        original(self, step, total, loss)

    monkeypatch.setattr(finetuning._Progress, "__call__", taken_over_at_step_2)
    assert finetuning.run_job(job.pk) == "superseded"
    job.refresh_from_db()
    assert job.status == "running" and job.attempt == "someone-else"  # the other claim's to finish
    assert not FineTune.objects.exists()
    assert leftovers(fine_tunes_dir) == []


def test_an_orphaned_running_job_is_restarted_by_a_redelivered_message(
    base: ModelArtifact, fine_tunes_dir: Path, settings: Any
) -> None:
    job = new_job(base, training_set(), prompt_version(), hyperparameters={**QUICK, "steps": 3})
    dead = finetuning.job_folder(job.pk, "dead-worker")
    (dead / "hf").mkdir(parents=True)
    long_ago = timezone.now() - timedelta(seconds=settings.FULCRUM_TRAIN_STALE_SECONDS + 60)
    FineTuneJob.objects.filter(pk=job.pk).update(
        status="running", attempt="dead-worker", started_at=long_ago, heartbeat_at=long_ago
    )
    job.refresh_from_db()
    assert job.is_stale()
    assert finetuning.start_job(job)  # an orphaned job may be queued again

    assert finetuning.run_job(job.pk) == "succeeded"
    job.refresh_from_db()
    assert job.attempt != "dead-worker" and FineTune.objects.filter(job=job).count() == 1
    assert not dead.exists()


def test_a_live_running_job_is_not_queued_or_claimed_again(base: ModelArtifact, fine_tunes_dir: Path) -> None:
    job = new_job(base, training_set(), prompt_version())
    FineTuneJob.objects.filter(pk=job.pk).update(status="running", attempt="alive", heartbeat_at=timezone.now())
    job.refresh_from_db()
    assert not finetuning.start_job(job)
    assert finetuning.run_job(job.pk) == "skipped"
    job.refresh_from_db()
    assert job.attempt == "alive"


@pytest.mark.django_db(transaction=True)
def test_two_workers_running_one_job_at_once_register_it_once(base: ModelArtifact, fine_tunes_dir: Path) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("needs row locks (PostgreSQL)")
    job = new_job(base, training_set(), prompt_version(), hyperparameters={**QUICK, "steps": 3})
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def deliver() -> None:
        try:
            barrier.wait()
            outcomes.append(finetuning.run_job(job.pk))
        finally:
            connection.close()

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(outcomes) == ["skipped", "succeeded"]
    assert FineTune.objects.filter(job=job).count() == 1
    assert ModelArtifact.objects.filter(parent=base).count() == 1
    assert len(leftovers(fine_tunes_dir)) == 1


def test_identical_requests_share_one_job_and_reuse_its_result(base: ModelArtifact, fine_tunes_dir: Path) -> None:
    dataset, version = training_set(), prompt_version()
    job = new_job(base, dataset, version, hyperparameters={**QUICK, "steps": 3})
    kwargs: dict[str, Any] = {
        "base_artifact": base,
        "dataset": dataset,
        "prompt_version": version,
        "hyperparameters": {**QUICK, "steps": 3, "target_modules": ["v_proj", "q_proj"]},  # same set, other order
    }
    same, created = finetuning.create_job(name="another-name", **kwargs)
    assert not created and same.pk == job.pk
    assert finetuning.run_job(job.pk) == "succeeded"
    again, created = finetuning.create_job(name="yet-another", **kwargs)
    assert not created and again.pk == job.pk and again.status == "succeeded"
    other, created = finetuning.create_job(name="other-seed", seed=1, **kwargs)
    assert created and other.spec_hash != job.spec_hash
    with pytest.raises(finetuning.FineTuneError, match="a fine-tune named 'tiny-pairs' exists") as caught:
        finetuning.create_job(name="tiny-pairs", **{**kwargs, "hyperparameters": {**QUICK, "steps": 5}})
    assert caught.value.field == "name"


def test_an_onnx_only_base_or_a_quantised_variant_is_refused_when_the_job_is_created(
    base: ModelArtifact, tiny_onnx_dir: Path
) -> None:
    onnx_only = ModelArtifact.objects.create(
        name="onnx-only",
        sha256="e" * 64,
        path=str(tiny_onnx_dir),
        source_kind="onnx",
        source_path="/x",
        source_sha256="f" * 64,
    )
    int8 = ModelArtifact.objects.create(
        name="tiny-int8",
        sha256="d" * 64,
        path="/x",
        quantisation="int8-dynamic",
        source_kind="onnx",
        source_path=base.path,
        source_sha256=base.sha256,
        parent=base,
    )
    dataset, version = training_set(), prompt_version()
    with pytest.raises(finetuning.FineTuneError, match="imported from ONNX: no trainable weights") as caught:
        finetuning.create_job(name="x", base_artifact=onnx_only, dataset=dataset, prompt_version=version)
    assert caught.value.field == "base_artifact"
    assert "import it from GGUF or a Hugging Face folder" in str(caught.value)
    with pytest.raises(finetuning.FineTuneError, match=rf"int8-dynamic variant.*fine-tune artifact {base.pk}"):
        finetuning.create_job(name="x", base_artifact=int8, dataset=dataset, prompt_version=version)
    assert not FineTuneJob.objects.exists()


def test_a_job_whose_training_fails_is_failed_with_the_reason_and_leaves_nothing(
    base: ModelArtifact, fine_tunes_dir: Path
) -> None:
    job = new_job(base, training_set(), prompt_version(), hyperparameters={**QUICK, "target_modules": ["attn_qkv"]})
    assert finetuning.run_job(job.pk) == "failed"
    job.refresh_from_db()
    assert "target_modules ['attn_qkv'] are not modules of this model" in job.error
    assert "q_proj" in job.error  # it names the layers that exist
    assert not FineTune.objects.exists() and leftovers(fine_tunes_dir) == []


def test_a_worker_without_the_training_libraries_fails_the_job_saying_what_to_install(
    base: ModelArtifact, fine_tunes_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    job = new_job(base, training_set(), prompt_version())
    real_import = builtins.__import__

    def no_peft(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "peft":
            raise ImportError("No module named 'peft'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    assert finetuning.run_job(job.pk) == "failed"
    job.refresh_from_db()
    assert "needs peft" in job.error and "convert extra" in job.error


def test_items_without_an_answer_or_a_prompt_they_cannot_fill_are_refused(base: ModelArtifact) -> None:
    dataset, version = training_set(), prompt_version()
    item = dataset.items.first()
    assert item is not None
    item.expected = ""
    item.save()
    with pytest.raises(finetuning.FineTuneError, match="item p0 has no expected answer"):
        finetuning.create_job(name="x", base_artifact=base, dataset=dataset, prompt_version=version)
    other, _ = version.prompt.create_version(template="{{ topic }}", variables=["topic"])
    with pytest.raises(finetuning.FineTuneError, match=r"needs variable\(s\) \['topic'\]"):
        finetuning.create_job(name="x", base_artifact=base, dataset=training_set("other"), prompt_version=other)


def test_the_spec_hash_covers_everything_that_decides_the_weights(base: ModelArtifact) -> None:
    dataset, version = training_set(), prompt_version()
    hp = training.validate_hyperparameters("lora", QUICK)
    spec: dict[str, Any] = {
        "base_artifact": base,
        "dataset": dataset,
        "prompt_version": version,
        "method": "lora",
        "hyperparameters": hp,
        "seed": 0,
    }
    reference = FineTuneJob.compute_spec_hash(**spec)
    assert FineTuneJob.compute_spec_hash(**spec) == reference
    other_version, _ = version.prompt.create_version(template="Q: {{ question }}", variables=["question"])
    for change in (
        {"seed": 1},
        {"hyperparameters": {**hp, "lora_r": 4}},
        {"method": "full"},
        {"prompt_version": other_version},
        {"dataset": training_set("other")},
    ):
        assert FineTuneJob.compute_spec_hash(**{**spec, **change}) != reference, change
