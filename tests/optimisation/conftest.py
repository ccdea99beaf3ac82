"""Fixtures of the optimisation tests."""

from __future__ import annotations

from typing import Any

import pytest
from optimisation_helpers import make_registry

from registry import access


@pytest.fixture
def reg(db: None) -> dict[str, Any]:
    """Prompt qa (v1 naive, production -> v1), a 60-item arithmetic dataset, a greedy stack on a scripted artifact."""
    return make_registry()


@pytest.fixture
def operator() -> access.Actor:
    return access.OperatorActor()
