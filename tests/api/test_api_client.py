"""The Python client against a live server: TTL, ETag revalidation, stale copies, fallbacks, invalidation."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User

from fulcrum_client import ClientError, FulcrumClient, PromptNotFound, ServerUnavailable
from registry import access
from registry.models import Prompt

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served(transactional_db: None, live_server: Any, make_user: Callable[..., User], qa: Prompt) -> dict[str, Any]:
    _, raw = access.create_token(make_user("viewer"), "client", "read")
    clock = Clock()
    return {"url": live_server.url, "token": raw, "clock": clock, "prompt": qa}


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_ttl_then_etag_revalidation_then_a_label_move(served: dict[str, Any]) -> None:
    clock, qa = served["clock"], served["prompt"]
    client = FulcrumClient(served["url"], served["token"], ttl=30, clock=clock)
    first = client.get_prompt("qa")
    assert (first.version, first.source, first.label) == (1, "server", "production")
    assert client.get_prompt("qa").source == "cache"
    clock.now += 31
    assert client.get_prompt("qa").source == "revalidated"  # 304
    qa.move_label("production", qa.versions.get(number=2))
    assert client.get_prompt("qa").source == "cache"  # within the TTL the client keeps its copy
    clock.now += 31
    moved = client.get_prompt("qa")
    assert (moved.version, moved.source) == (2, "server")
    pinned = client.get_prompt("qa", version=1)
    assert (pinned.version, pinned.label) == (1, None)


def test_last_good_copy_when_the_server_is_unreachable(served: dict[str, Any], caplog: Any) -> None:
    clock = served["clock"]
    client = FulcrumClient(served["url"], served["token"], ttl=5, clock=clock, timeout=2)
    assert client.get_prompt("qa").version == 1
    client.base_url = dead_url()
    clock.now += 60
    with caplog.at_level(logging.WARNING, logger="fulcrum_client"):
        stale = client.get_prompt("qa")
    assert (stale.version, stale.source) == (1, "stale")
    assert "serving the last good copy of qa:production (v1, fetched 60 s ago): server unreachable" in caplog.text
    with pytest.raises(ServerUnavailable):
        client.get_prompt("other")
    fallback = client.get_prompt("other", fallback="Q: {{ question }}")
    assert (fallback.source, fallback.template, fallback.name) == ("fallback", "Q: {{ question }}", "other")
    assert "using the fallback prompt for other:production" in caplog.text


def test_a_deleted_version_or_label_is_dropped_at_once(served: dict[str, Any], caplog: Any) -> None:
    clock, qa = served["clock"], served["prompt"]
    client = FulcrumClient(served["url"], served["token"], ttl=5, clock=clock)
    assert client.get_prompt("qa", version=2).version == 2
    qa.versions.get(number=2).delete()
    clock.now += 6
    with caplog.at_level(logging.WARNING, logger="fulcrum_client"), pytest.raises(PromptNotFound) as gone:
        client.get_prompt("qa", version=2)
    assert gone.value.status == 410
    assert "dropped the cached copy" in caplog.text
    assert (
        client.get_prompt("qa", version=2, fallback={"template": "fb {{ q }}", "variables": ["q"]}).source == "fallback"
    )
    # Even with the server unreachable afterwards, the gone version is not served from a cache.
    client.base_url = dead_url()
    with pytest.raises(ServerUnavailable):
        client.get_prompt("qa", version=2)

    client.base_url = served["url"]
    assert client.get_prompt("qa").version == 1
    qa.labels.get(name="production").delete()
    clock.now += 6
    with pytest.raises(PromptNotFound):
        client.get_prompt("qa")


def test_configuration_errors_are_not_hidden(served: dict[str, Any]) -> None:
    with pytest.raises(ClientError) as denied:
        FulcrumClient(served["url"], "flc_bad_token").get_prompt("qa", fallback="x")
    assert denied.value.status == 401
    with pytest.raises(ClientError) as bad:
        FulcrumClient(served["url"], served["token"]).get_prompt("qa", label="Not A Label")
    assert bad.value.status == 400


def test_the_client_imports_no_django() -> None:
    code = "import sys, fulcrum_client; assert not any(m.startswith('django') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
