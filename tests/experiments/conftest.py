"""Fixtures of the experiment tests: the tiny model as an artifact and a prompt with a production label."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from registry.models import ModelArtifact, Prompt
from workers import convert


@pytest.fixture
def artifact(tiny_onnx_dir: Path) -> ModelArtifact:
    built = convert.load_converted(tiny_onnx_dir)
    return ModelArtifact.objects.create(
        name="tiny",
        sha256=built.sha256,
        path=str(tiny_onnx_dir),
        parameter_count=built.parameter_count,
        source_kind="onnx",
        source_path=str(tiny_onnx_dir),
        source_sha256=built.sha256,
    )


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
