"""Fine-tune jobs through a real `manage.py worker --train` process on its own queue, the broker and PostgreSQL:
the job is trained and registered by the worker, and a cancel sent while it trains stops it with nothing left."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from finetune_helpers import QUICK, new_job, prompt_version, tiny_base, training_set

from fulcrum.celery import app
from registry.models import FineTune, FineTuneJob, ModelArtifact
from workers import finetuning, routing

pytestmark = pytest.mark.django_db(transaction=True)


def wait(job: FineTuneJob, worker: Any, until: Any, timeout: float = 300) -> FineTuneJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if until(job):
            return job
        assert worker.poll() is None, "the worker process died"
        time.sleep(0.3)
    raise AssertionError(f"job {job.pk} is {job.status} at step {job.steps_done} after {timeout}s")


def test_a_training_worker_runs_the_job_and_a_cancel_stops_the_next_one(
    worker_process: Any, tiny_onnx_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    base = tiny_base(tiny_onnx_dir, tiny_model_dir)
    dataset, version = training_set(), prompt_version()
    fine_tunes = tmp_path / "data" / "fine-tunes"
    # The worker's data dir is its own (FULCRUM_DATA_DIR), so its fine-tune folders can be checked here.
    with worker_process(train=True, FULCRUM_DATA_DIR=str(tmp_path / "data")) as worker:
        assert routing.train_queue() == f"{app.conf.task_default_queue}.train"
        # Started from the command line, which waits for the worker to finish it.
        out, err = io.StringIO(), io.StringIO()
        hyperparameters = json.dumps({**QUICK, "steps": 6})
        call_command(
            "fine_tune",
            *("start", "tiny-pairs", "--base", str(base.pk), "--dataset", dataset.name, "--prompt", "ask"),
            *("--version", str(version.number), "--hyperparameters", hyperparameters, "--wait", "--timeout", "300"),
            stdout=out,
            stderr=err,
        )
        job = FineTuneJob.objects.get(name="tiny-pairs")
        assert job.status == "succeeded", job.error
        assert out.getvalue().startswith(f"job {job.pk} tiny-pairs: succeeded; step 6/6")
        assert "step 6/6" in err.getvalue()  # the progress lines
        assert not job.worker.endswith(f":{os.getpid()}")  # trained in the worker's child process
        fine_tune = FineTune.objects.select_related("result_artifact").get(job=job)
        assert fine_tune.result_artifact is not None
        assert Path(fine_tune.result_artifact.path).is_relative_to(fine_tunes)
        assert job.final_loss is not None and job.initial_loss is not None and job.final_loss < job.initial_loss

        long = new_job(base, dataset, version, name="long", hyperparameters={**QUICK, "steps": 100_000})
        assert finetuning.start_job(long)
        long = wait(long, worker, lambda j: j.steps_done >= 2)
        assert finetuning.cancel_job(long)
        stopped_at = long.steps_done
        long = wait(long, worker, lambda j: j.is_finished, timeout=60)
        assert long.status == "cancelled" and long.steps_done < stopped_at + 20
        assert not FineTune.objects.filter(job=long).exists()
        assert ModelArtifact.objects.filter(parent=base).count() == 1
        assert sorted(p.name for p in fine_tunes.iterdir()) == [Path(fine_tune.result_artifact.path).parent.name]
