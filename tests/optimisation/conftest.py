"""Fixtures of the optimisation tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import User
from optimisation_helpers import make_registry
from rest_framework.test import APIClient

from registry import access


@pytest.fixture
def reg(db: None) -> dict[str, Any]:
    """Prompt qa (v1 naive, production -> v1), a 60-item arithmetic dataset, a greedy stack on a scripted artifact."""
    return make_registry()


@pytest.fixture
def operator() -> access.Actor:
    return access.OperatorActor()


@pytest.fixture
def api_for(db: None) -> Callable[[str | None], APIClient]:
    """api_for("editor") -> an APIClient with a write token of a new user holding that role."""

    def make(role: str | None) -> APIClient:
        user = User.objects.create_user(f"{role or 'nobody'}-{User.objects.count()}", password="pw-123456-long")
        if role:
            access.grant_role(user, role)
        _, raw = access.create_token(user, "test", "write")
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
        client.user = user  # type: ignore[attr-defined]
        return client

    return make
