"""deploy/prometheus: the configurations load, the rules parse, their unit tests pass, and they only name metrics
that Fulcrum exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from deploy_helpers import DEPLOY, exported_names, require_tool

PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "rules" / "fulcrum.rules.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True, timeout=60)


def test_both_prometheus_configurations_load_with_the_rules(tmp_path: Path) -> None:
    for name in ("prometheus.yml", "prometheus-kubernetes.yml"):
        config = yaml.safe_load((PROMETHEUS / name).read_text())
        assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]  # where compose and k8s mount them
        config["rule_files"] = [str(RULES)]
        local = tmp_path / name
        local.write_text(yaml.safe_dump(config))
        result = promtool("check", "config", str(local))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS: 15 rules found" in result.stdout + result.stderr


def test_the_rules_parse_and_their_unit_tests_pass() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(PROMETHEUS / "tests" / "fulcrum.rules.test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_the_rules_cover_the_alerts_the_platform_needs() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}
    for name in (
        "FulcrumWorkerDown",
        "FulcrumQueueBacklog",
        "FulcrumEvaluationRegression",
        "FulcrumLatencySLOFastBurn",
        "FulcrumLatencySLOSlowBurn",
    ):
        assert name in alerts, name
        assert alerts[name]["labels"]["severity"] in {"warning", "critical"}
        assert alerts[name]["annotations"]["summary"]
    tested = (PROMETHEUS / "tests" / "fulcrum.rules.test.yml").read_text()
    for name in ("FulcrumWorkerDown", "FulcrumQueueBacklog", "FulcrumAccuracyDrop", "FulcrumLatencySLOFastBurn"):
        assert f"alertname: {name}" in tested, f"{name} has no unit test"


def test_rules_only_name_metrics_fulcrum_exports() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    exported = exported_names()
    recorded = {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}
    for group in groups:
        for rule in group["rules"]:
            for name in re.findall(r"\bfulcrum[_:][a-z0-9_:]*", rule["expr"]):
                assert name in exported or name in recorded, f"{rule.get('alert') or rule['record']}: {name}"


def test_compose_prometheus_scrapes_the_compose_services() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"fulcrum-web", "fulcrum-worker", "fulcrum-worker-gpu", "fulcrum-beat"} <= set(jobs)
    ports = {"web": "8000", "worker-cpu": "9100", "worker-gpu": "9100", "beat": "9101"}
    for job in jobs.values():
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                assert name in compose["services"], name
                assert str(sd["port"]) == ports[name]
    env = {name: service.get("environment", {}) for name, service in compose["services"].items()}
    assert env["worker-cpu"]["FULCRUM_WORKER_METRICS_PORT"] == "9100"
    assert env["beat"]["FULCRUM_BEAT_METRICS_PORT"] == "9101"
