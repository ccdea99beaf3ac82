"""Fixtures of the experiment tests: the tiny model as an artifact and a prompt with a production label."""

from __future__ import annotations

import socket

import pytest

from registry.models import Prompt


@pytest.fixture
def prompt() -> Prompt:
    p = Prompt.objects.create(name="tiny")
    v1, _ = p.create_version(template="Q: {{ question }}", variables=["question"], params={"max_new_tokens": 6})
    p.move_label("production", v1)
    return p


@pytest.fixture
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
