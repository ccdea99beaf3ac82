"""The real thing: a gunicorn web server, a Celery worker (without the conversion packages) and beat, scraped by
the Prometheus server with deploy/prometheus's job names and rules; every dashboard query must resolve."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    DEPLOY,
    ROOT,
    as_promql,
    dashboard_queries,
    free_port,
    http_get,
    metric_names,
    python,
    require_tool,
    subprocess_env,
    wait_for,
)
from django.contrib.auth import get_user_model

from fulcrum.celery import app
from registry import access
from registry.models import Dataset, DatasetItem, EvaluationRun, ModelArtifact, Prompt, ScalingConfig, Stack
from workers import convert, evaluation

pytestmark = pytest.mark.django_db(transaction=True)

# Declared by every target but recorded only when a scheduled run regresses, which a healthy stack never does:
# Prometheus must know it (metadata); tests/experiments covers a run that records it.
DECLARED_ONLY = {"fulcrum_evaluation_regressions_total"}
SCRAPES = ROOT / "var" / "deploy-tests"


def _registry_objects(onnx_dir: Path) -> tuple[Stack, Dataset]:
    built = convert.load_converted(onnx_dir)
    artifact = ModelArtifact.objects.create(
        name="tiny",
        sha256=built.sha256,
        path=str(onnx_dir),
        parameter_count=built.parameter_count,
        source_kind="onnx",
        source_path=str(onnx_dir),
        source_sha256=built.sha256,
        price_per_1k_tokens=Decimal("0.25"),
    )
    dataset = Dataset.objects.create(name="deploy-mixed", scorer="exact", content_hash="d" * 64, item_count=6)
    for i, kind in enumerate(["", "", "harmful", "harmful", "benign", "benign"]):
        DatasetItem.objects.create(
            dataset=dataset, index=i, key=f"k{i}", inputs={"question": f"question {i}"}, expected="yes", kind=kind
        )
    prompt = Prompt.objects.create(name="deploy")
    version, _ = prompt.create_version(
        template="Q: {{ question }}", variables=["question"], params={"max_new_tokens": 5}
    )
    scaling = ScalingConfig.objects.create(
        name="vote2", n_samples=2, temperature=1.0, top_p=1.0, aggregation="majority_vote", seed=1
    )
    stack = Stack.objects.create(name="deploy-stack", prompt_version=version, scaling=scaling, artifact=artifact)
    return stack, dataset


def _prometheus_config(tmp: Path, targets: dict[str, str]) -> Path:
    """deploy/prometheus/prometheus.yml with its discovery swapped for this test's local targets."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / "rules" / "*.yml")]
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] not in targets:
            continue
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        jobs.append(job)
    config["scrape_configs"] = jobs
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _api(prometheus: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    status, body = http_get(f"{prometheus}/api/v1/{path}{query}")
    payload = json.loads(body)
    assert status == 200 and payload["status"] == "success", f"{path} {params}: {payload}"
    return payload["data"]


def _value(prometheus: str, promql: str) -> float | None:
    result = _api(prometheus, "query", query=promql)["result"]
    return float(result[0]["value"][1]) if result else None


def _number(prometheus: str, promql: str) -> float:
    found = _value(prometheus, promql)
    assert found is not None, f"no result for {promql}"
    return found


def test_prometheus_scrapes_web_worker_and_beat_and_every_dashboard_query_resolves(
    tiny_onnx_dir: Path, tmp_path: Path, processes: Any
) -> None:
    prometheus_bin = require_tool("prometheus")
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    stack, dataset = _registry_objects(tiny_onnx_dir)
    every_second = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="deploy-test-cleanup", task="celery.backend_cleanup", interval=every_second)

    queue = f"deploy-{uuid.uuid4().hex[:8]}"
    web_port, worker_port, beat_port, prom_port = (free_port() for _ in range(4))
    root = tmp_path / "metrics"  # this machine's PROMETHEUS_MULTIPROC_DIR, shared by the three process groups
    root.mkdir()
    env = subprocess_env(PROMETHEUS_MULTIPROC_DIR=str(root), FULCRUM_QUEUE=queue, FULCRUM_PROVIDER="cpu")

    web = processes(
        "web",
        [python(), "-m", "gunicorn", "-c", "python:fulcrum.gunicorn_conf", "--bind", f"127.0.0.1:{web_port}",
         "--workers", "2", "fulcrum.wsgi:application"],
        env,
    )  # fmt: skip
    worker = processes(
        "worker",
        [python(), str(Path(__file__).parent / "run_without_convert_deps.py"), "manage.py", "worker",
         "-c", "2", "-Q", queue],
        {**env, "FULCRUM_WORKER_METRICS_PORT": str(worker_port)},
    )  # fmt: skip
    beat = processes(
        "beat", [python(), "manage.py", "beat", "--metrics-port", str(beat_port), "--max-interval", "1"], env
    )
    group = [web, worker, beat]
    web_url, worker_url, beat_url = (f"http://127.0.0.1:{p}" for p in (web_port, worker_port, beat_port))
    wait_for(lambda: http_get(f"{web_url}/healthz")[0] == 200, 60, "the web server", group)
    wait_for(lambda: http_get(f"{worker_url}/readyz")[0] == 200, 60, "the worker to consume", group)
    wait_for(lambda: http_get(f"{beat_url}/readyz")[0] == 200, 60, "beat", group)
    assert http_get(f"{worker_url}/healthz")[0] == 200 and http_get(f"{beat_url}/healthz")[0] == 200

    # A label moved from the command line: a short-lived process whose count the web serves.
    label = processes("label", [python(), "manage.py", "prompt", "label", "deploy", "staging", "1"], env)
    assert label.wait(timeout=60) == 0
    # The prompt fetched by that label through the serving API, then revalidated (304).
    user = get_user_model().objects.create_user("deploy-reader")
    access.grant_role(user, "viewer")
    _, token = access.create_token(user, "deploy-test")
    auth = {"Authorization": f"Bearer {token}"}
    status, _ = http_get(f"{web_url}/api/serve/deploy/?label=staging", headers=auth)
    assert status == 200
    etag = urllib.request.urlopen(
        urllib.request.Request(f"{web_url}/api/serve/deploy/?label=staging", headers=auth), timeout=10
    ).headers["ETag"]
    assert http_get(f"{web_url}/api/serve/deploy/?label=staging", headers={**auth, "If-None-Match": etag})[0] == 304

    previous = app.conf.task_default_queue
    app.conf.task_default_queue = queue
    try:
        run = evaluation.create_run(stack, dataset)
        evaluation.start_run(run)

        def finished() -> bool:
            run.refresh_from_db()
            return run.is_finished

        wait_for(finished, 120, "the evaluation run", group)
    finally:
        app.conf.task_default_queue = previous
    assert run.status == EvaluationRun.Status.SUCCEEDED, run.error
    wait_for(lambda: "fulcrum_beat_tasks_sent_total{" in http_get(f"{beat_url}/metrics")[1], 30, "beat to send")

    config = _prometheus_config(
        tmp_path,
        {"fulcrum-web": f"127.0.0.1:{web_port}", "fulcrum-worker": f"127.0.0.1:{worker_port}",
         "fulcrum-beat": f"127.0.0.1:{beat_port}"},
    )  # fmt: skip
    processes(
        "prometheus",
        [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        env,
    )  # fmt: skip
    prometheus = f"http://127.0.0.1:{prom_port}"

    def all_up() -> bool:
        targets = _api(prometheus, "targets")["activeTargets"]
        return len(targets) == 3 and all(t["health"] == "up" for t in targets)

    wait_for(all_up, 60, "Prometheus to scrape web, worker and beat", group)
    # Rates need two scrapes after the run; rules a few evaluations.
    wait_for(lambda: _value(prometheus, "count(fulcrum_evaluation_items_total)"), 30, "the scraped samples")
    time.sleep(4)

    # What each target serves, kept for the record.
    SCRAPES.mkdir(parents=True, exist_ok=True)
    for name, url in (("web", web_url), ("worker", worker_url), ("beat", beat_url)):
        (SCRAPES / f"scrape-{name}.txt").write_text(http_get(f"{url}/metrics")[1])

    # Every metric a dashboard panel queries exists in Prometheus, and every query evaluates.
    names = set(_api(prometheus, "label/__name__/values"))
    metadata = _api(prometheus, "metadata")
    declared = {n for n in metadata} | {f"{n}_total" for n in metadata}
    queried: set[str] = set()
    for uid, title, expr in dashboard_queries():
        queried |= metric_names(expr)
        _api(prometheus, "query", query=as_promql(expr))  # asserts status success
        del uid, title
    series_missing = sorted(n for n in queried - names if n not in DECLARED_ONLY and not n.startswith("up"))
    assert not series_missing, f"dashboard metrics without samples: {series_missing}"
    for name in DECLARED_ONLY:
        assert name in queried and name in declared, f"{name} is not declared by any target"
    # Histograms are queried through their _bucket/_sum/_count series.
    histograms = {"fulcrum_inference_request_seconds", "fulcrum_inference_time_per_output_token_seconds"}
    assert {f"{h}_bucket" for h in histograms} <= names

    # The rules loaded and evaluate without errors; nothing fires on a healthy stack.
    groups = _api(prometheus, "rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 10 and all(r["health"] == "ok" for r in rules), [
        (r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"
    ]
    firing = [a["labels"]["alertname"] for a in _api(prometheus, "alerts")["alerts"] if a["state"] == "firing"]
    assert not firing

    # A few values that must be exactly so.
    assert _value(prometheus, 'sum(fulcrum_evaluation_items_total{stack="deploy-stack"})') == 6
    assert _value(prometheus, 'sum(fulcrum_evaluation_runs_total{status="succeeded"})') == 1
    assert _value(prometheus, 'sum(fulcrum_prompt_label_moves_total{label="staging"})') == 1
    assert _value(prometheus, 'sum(fulcrum_prompt_fetches_total{label="staging", cache="miss"})') == 2
    assert _value(prometheus, 'sum(fulcrum_prompt_fetches_total{label="staging", cache="hit"})') == 1
    assert _value(prometheus, "sum(fulcrum_inference_samples_per_request_count)") == 6
    assert _value(prometheus, "sum(fulcrum_inference_samples_per_request_sum)") == 12
    assert _value(prometheus, 'sum(fulcrum_worker_processes{job="fulcrum-worker"})') == 2
    assert _value(prometheus, 'max(fulcrum_broker_up{job="fulcrum-web"})') == 1
    assert _value(prometheus, f'max(fulcrum_queue_messages{{queue="{queue}"}})') is not None
    assert _value(prometheus, "count(fulcrum_process_group_start_time_seconds)") == 3  # web, worker, beat
    assert _number(prometheus, "min(fulcrum_process_group_start_time_seconds)") > time.time() - 600
    assert _number(prometheus, 'sum(fulcrum_beat_tasks_sent_total{task="celery.backend_cleanup"})') >= 1
    run.refresh_from_db()
    tokens = run.summary["prompt_tokens"] + run.summary["generated_tokens"]
    assert _value(prometheus, 'sum(fulcrum_inference_cost_total{stack="deploy-stack"})') == pytest.approx(
        tokens * 0.25 / 1000
    )
    assert _number(prometheus, 'sum(fulcrum_inference_worker_seconds_total{stack="deploy-stack"})') > 0
    accuracy = _value(prometheus, 'max(fulcrum_evaluation_accuracy_ratio{stack="deploy-stack"})')
    assert accuracy == pytest.approx(run.summary["accuracy"])
    tax = _value(prometheus, 'max(fulcrum_evaluation_alignment_tax_ratio{stack="deploy-stack"})')
    assert tax == pytest.approx(1 - run.summary["answer_rate_benign"])
