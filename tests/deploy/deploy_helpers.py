"""Helpers for the deployment tests: tools that must be there under `make test`, ports, subprocesses, dashboards."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def require_tool(name: str) -> str:
    """The tool's path; under `make test` (FULCRUM_REQUIRE_SERVICES=1) a missing tool fails, elsewhere it skips."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (deploy/local-services.sh installs it; `make services`)"
    if os.environ.get("FULCRUM_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(check: Callable[[], object], timeout: float, what: str, procs: list[subprocess.Popen[bytes]] = ()):  # type: ignore[assignment]
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.poll() is None, f"{proc.args!r} exited with {proc.returncode} while waiting for {what}"
        try:
            last = check()
        except (OSError, ValueError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})")


def python() -> str:
    return sys.executable


def database_url() -> str:
    """The URL of the database the tests use (pytest-django's test database), for subprocesses."""
    from django.db import connection

    db = connection.settings_dict
    if db["ENGINE"] != "django.db.backends.postgresql":
        pytest.skip("needs PostgreSQL (make test sets DATABASE_URL)")
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgresql://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test process's environment for a Fulcrum subprocess: the test database, the project on the path."""
    env = {k: v for k, v in os.environ.items() if k != "FULCRUM_METRICS_ROOT"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "platform"), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env["DATABASE_URL"] = database_url()
    env.update(extra)
    return env


# --- dashboards ---------------------------------------------------------------------------------------------------

GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$provider": ".*",
    "$stack": ".*",
    "$dataset": ".*",
    "$queue": ".*",
}
_METRIC = re.compile(r"(?<![\w:\"'])(fulcrum_[a-z0-9_]+|up)(?=\s*[{\[)\s,]|$)")


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, PromQL) for every panel target of every provisioned dashboard."""
    found = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append((board["uid"], panel["title"], target["expr"]))
    return found


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, ready for Prometheus's query API."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    return expr


def metric_names(expr: str) -> set[str]:
    return set(_METRIC.findall(expr))


def exported_names() -> set[str]:
    """Every series name a Fulcrum target can serve."""
    from fulcrum import metrics

    names = set(metrics.SCRAPE_TIME_GAUGES)
    for metric in metrics.ALL_METRICS:
        for family in metric.describe():
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type == "histogram":
                names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
            else:
                names.add(family.name)
    return names
