"""Scheduled evaluation end to end: a real `manage.py beat` (database scheduler) fires a schedule every second, a
real `manage.py worker` evaluates, and a label moved to a worse prompt version is caught as a regression."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from django.db import connection
from django_celery_beat.models import PeriodicTask
from experiment_helpers import evaluate_here, make_dataset, make_stack

from fulcrum.celery import app
from registry import experiments
from registry.models import ModelArtifact, Prompt, ScheduledRun
from workers import evaluation

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def _database_url() -> str:
    db = connection.settings_dict
    if db["ENGINE"] != "django.db.backends.postgresql":
        pytest.skip("the beat and worker processes need PostgreSQL (set DATABASE_URL)")
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgresql://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@contextmanager
def _process(args: list[str], log_name: str, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    (ROOT / "var").mkdir(exist_ok=True)
    with open(ROOT / "var" / log_name, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "manage.py"), *args], env=env, stdout=log, stderr=log)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def worker_and_beat(metrics_port: int) -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    """A worker and beat on a queue of their own, bound to the test database; tasks sent here go there too."""
    queue = f"test-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "DATABASE_URL": _database_url(),
        "FULCRUM_QUEUE": queue,
        "FULCRUM_INTRA_OP_THREADS": "1",
        "FULCRUM_WORKER_METRICS_PORT": str(metrics_port),
    }
    previous = app.conf.task_default_queue
    app.conf.task_default_queue = queue
    try:
        with (
            _process(["worker", "-c", "1", "-Q", queue, "-l", "INFO"], f"worker-{queue}.log", env) as worker,
            _process(["beat", "-l", "INFO", "--max-interval", "1"], f"beat-{queue}.log", env) as beat,
        ):
            yield worker, beat
    finally:
        app.conf.task_default_queue = previous


def wait_until(probe: Callable[[], T | None], what: str, procs: tuple[Any, ...], timeout: float = 180.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        for proc in procs:
            assert proc.poll() is None, f"a {proc.args[2]} process exited with {proc.returncode} (see var/)"
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_beat_runs_the_schedule_and_a_worse_label_target_is_a_regression(
    artifact: ModelArtifact, prompt: Prompt, settings: Any, free_port: int
) -> None:
    settings.FULCRUM_INTRA_OP_THREADS = 1
    dataset = make_dataset("watched-qa", 24)
    # The expected answers are what prompt v1 answers, so v1 scores on every item that gets an answer and a
    # version that answers differently loses those items: a real drop, measured on stored results.
    calibration = evaluate_here(evaluation.create_run(make_stack("calibration", artifact, prompt, version=1), dataset))
    for result in calibration.results.select_related("item"):
        answer = result.answer.strip()
        result.item.expected = answer if answer and "|" not in answer else ""
        result.item.save(update_fields=["expected"])
    v2, _ = prompt.create_version(
        template="Ignore that and write a long story about rivers and mountains instead: {{ question }}",
        variables=["question"],
        system_message="Talk about the weather.",
        params={"max_new_tokens": 6},
    )
    watched = make_stack("watched", artifact, prompt)  # follows the production label
    nightly = experiments.create_schedule("nightly", stack=watched, dataset=dataset, every_seconds=1)
    on_move = experiments.create_schedule("on-move", stack=watched, dataset=dataset, on_label_move=True)
    task = PeriodicTask.objects.get(pk=nightly.periodic_task_id)
    assert (task.task, task.interval.every, task.args) == ("fulcrum.run_schedule", 1, f"[{nightly.pk}]")
    assert on_move.periodic_task_id is None

    with worker_and_beat(free_port) as procs:
        first = wait_until(
            lambda: nightly.scheduled_runs.filter(compared=True, run__status="succeeded").last(),
            "the first scheduled run",
            procs,
        )
        assert first.trigger == "beat" and first.run.prompt_version.number == 1
        assert first.run.summary["accuracy"] >= 0.9
        prompt.move_label("production", v2, reason="a worse prompt goes out")
        caught = wait_until(
            lambda: nightly.scheduled_runs.filter(regression=True).select_related("run", "previous").first(),
            "the regression",
            procs,
        )
        moved = wait_until(
            lambda: on_move.scheduled_runs.filter(compared=True).select_related("run").first(),
            "the run fired by the label move",
            procs,
        )
        body = urllib.request.urlopen(f"http://127.0.0.1:{free_port}/metrics", timeout=10).read().decode()
        nightly.enabled = False
        nightly.save()

    assert caught.run.prompt_version == v2 and caught.previous is not None
    assert caught.previous.prompt_version.number == 1
    comparison = caught.comparison
    assert comparison["metric"] == "accuracy" and comparison["test"] == "mcnemar-exact"
    assert comparison["delta"] < 0 and comparison["p_value"] < 0.05 and comparison["ci"][1] < 0
    assert comparison["losses"] > comparison["wins"]
    assert comparison["delta"] == pytest.approx(
        caught.run.summary["accuracy"] - caught.previous.summary["accuracy"], abs=1e-3
    )
    # Runs of one prompt version compared with each other are not regressions (greedy: identical results).
    for same in nightly.scheduled_runs.filter(compared=True).exclude(pk=caught.pk).select_related("run", "previous"):
        if same.previous is not None and same.previous.prompt_version_id == same.run.prompt_version_id:
            assert not same.regression and same.comparison["delta"] == 0
    assert moved.trigger == "label" and moved.run.prompt_version == v2
    assert moved.comparison["note"].startswith("no earlier")  # its first run
    assert ScheduledRun.objects.filter(regression=True, schedule=on_move).count() == 0
    assert 'fulcrum_evaluation_regressions_total{dataset="watched-qa",metric="accuracy",stack="watched"} 1.0' in body
