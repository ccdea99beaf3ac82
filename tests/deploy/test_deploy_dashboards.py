"""deploy/grafana: provisioning points at the dashboards, and the dashboards query only what Fulcrum exports.

(That every query evaluates against a real Prometheus with real samples is test_deploy_scrape.py's job.)
"""

from __future__ import annotations

import json
import re

import yaml
from deploy_helpers import DEPLOY, GRAFANA_VARIABLES, dashboard_queries, exported_names, metric_names

GRAFANA = DEPLOY / "grafana"


def boards() -> dict[str, dict]:  # type: ignore[type-arg]
    return {p.stem: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))}


def test_provisioning_wires_the_datasource_and_the_dashboards_folder() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "fulcrum.yml").read_text())
    (provider,) = providers["providers"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    for board in boards().values():
        for panel in board["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == source["uid"], panel["title"]
                assert all(t["datasource"]["uid"] == source["uid"] for t in panel["targets"])


def test_the_dashboards_the_issue_asks_for_exist() -> None:
    found = boards()
    assert set(found) == {"fulcrum-serving", "fulcrum-cost", "fulcrum-evaluation", "fulcrum-queues"}
    exprs = {uid: " ".join(e for u, _, e in dashboard_queries() if u == uid) for uid in found}
    for needed in (
        "fulcrum_inference_time_to_first_token_seconds_bucket",
        "fulcrum_inference_time_per_output_token_seconds_bucket",
        "fulcrum_inference_request_seconds_bucket",
        "fulcrum_generated_tokens_total",
    ):
        assert needed in exprs["fulcrum-serving"], needed
    assert "fulcrum_inference_cost_total" in exprs["fulcrum-cost"]
    assert "fulcrum_inference_worker_seconds_total" in exprs["fulcrum-cost"]
    assert "fulcrum_evaluation_accuracy_ratio" in exprs["fulcrum-evaluation"]
    assert "fulcrum_evaluation_alignment_tax_ratio" in exprs["fulcrum-evaluation"]
    assert "fulcrum_queue_messages" in exprs["fulcrum-queues"]
    assert 'up{job="fulcrum-worker"}' in exprs["fulcrum-queues"]


def test_panels_are_well_formed() -> None:
    for uid, board in boards().items():
        assert board["uid"] == uid
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{uid}: duplicate panel ids"
        defined = {v["name"] for v in board["templating"]["list"]}
        for panel in board["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{uid}/{panel['title']}"
            if panel["type"] == "row":
                continue
            assert panel["targets"], f"{uid}/{panel['title']} has no query"
            for target in panel["targets"]:
                used = set(re.findall(r"\$(\w+)", target["expr"]))
                builtin = {name[1:] for name in GRAFANA_VARIABLES if name.startswith("$__")}
                assert used <= defined | builtin, f"{uid}/{panel['title']}: undefined {used - defined - builtin}"


def test_every_queried_metric_is_exported_by_fulcrum() -> None:
    exported = exported_names() | {"up"}
    for uid, title, expr in dashboard_queries():
        unknown = metric_names(expr) - exported
        assert not unknown, f"{uid}/{title}: {unknown}"
