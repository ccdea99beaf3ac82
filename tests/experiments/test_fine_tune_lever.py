"""The fine-tune lever in an experiment report: its one-off cost is what the job measured and stored."""

from __future__ import annotations

from decimal import Decimal

import pytest
from experiment_helpers import evaluate_here, make_dataset, make_stack

from registry import experiments
from registry.models import FineTune, ModelArtifact, Prompt
from workers import evaluation

pytestmark = pytest.mark.django_db


def tuned_copy(artifact: ModelArtifact) -> ModelArtifact:
    """Another registered artifact on the same files, standing for a fine-tune's result."""
    return ModelArtifact.objects.create(
        name="tiny-tuned",
        sha256="9" * 64,
        path=artifact.path,
        source_kind="hf",
        source_path="/fine-tunes/job-1/hf",
        source_sha256="8" * 64,
        parent=artifact,
    )


@pytest.mark.parametrize("recorded_by_job", [True, False])
def test_a_fine_tune_arm_reports_the_stored_one_off_cost(
    artifact: ModelArtifact, prompt: Prompt, recorded_by_job: bool
) -> None:
    artifact.price_per_device_hour = Decimal("3.6")  # 0.001 per second
    artifact.save()
    result = tuned_copy(artifact)
    figures = {"worker_seconds": 150.0, "cost": Decimal("0.15"), "device": "cpu", "final_loss": 0.5}
    fine_tune = FineTune.objects.create(
        name="tiny-lora",
        base_artifact=artifact,
        result_artifact=result,
        training_dataset_hash="7" * 64,
        method="lora",
        training_seconds=60.0,
        **(figures if recorded_by_job else {}),
    )
    dataset = make_dataset("tiny-qa", 6)
    baseline = make_stack("base", artifact, prompt)
    tuned = make_stack("tuned", artifact, prompt)
    tuned.fine_tune = fine_tune
    tuned.save()
    for stack in (baseline, tuned):
        evaluate_here(evaluation.create_run(stack, dataset))
    experiment = experiments.create_experiment("ft", dataset=dataset, baseline=baseline, variants=[tuned])
    assert experiments.start_experiment(experiment) == (2, 0)
    experiment.refresh_from_db()
    arm = next(a for a in experiment.report["arms"] if a["stack"] == "tuned")
    assert arm["layer"] == "fine_tune"
    one_off = arm["one_off"]
    assert one_off["training_seconds"] == 60.0 and one_off["fine_tune"] == "tiny-lora"
    if recorded_by_job:
        # What the job stored (its whole worker time, priced when it ran), not a recomputation from training time.
        assert one_off["money"] == pytest.approx(0.15) and one_off["worker_seconds"] == 150.0
        assert one_off["device"] == "cpu" and one_off["final_loss"] == 0.5
    else:
        # A fine-tune recorded by hand: its training seconds at the base's device-hour price.
        assert one_off["money"] == pytest.approx(0.06) and one_off["worker_seconds"] == 60.0
    text = experiments.format_report(experiment.report)
    assert f"money {one_off['money']:.4f} (paid once, not per item)" in text
