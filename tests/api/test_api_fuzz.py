"""OpenAPI-driven fuzzing (schemathesis) of every operation in the served schema: no input may cause a 5xx.

Each operation gets generated requests (valid and invalid), sent in-process as an admin with a write token over a
small seeded registry; `not_a_server_error` fails the test on any 5xx. Raise FULCRUM_FUZZ_EXAMPLES for a longer
run (scripts/fuzz_api.py runs the CLI against a live server and prints the totals).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from registry import access

EXAMPLES = int(os.environ.get("FULCRUM_FUZZ_EXAMPLES", "15"))

schema = schemathesis.openapi.from_wsgi("/api/schema/", get_wsgi_application())


@pytest.fixture
def fuzz_headers(
    make_user: Any, evaluated: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    from workers import evaluation

    monkeypatch.setattr(evaluation, "start_run", lambda run: None)
    # As django.test.Client does: a request must not close the test's database connection (and transaction).
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield_headers = {"Authorization": f"Bearer {access.create_token(make_user('admin', 'fuzzer'), 'fuzz', 'write')[1]}"}
    try:
        yield yield_headers
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.mark.django_db
@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
    print_blob=True,
)
def test_no_input_causes_a_server_error(case: Any, fuzz_headers: dict[str, str]) -> None:
    case.call_and_validate(headers=fuzz_headers, checks=[not_a_server_error])
