"""Fixtures of the deployment tests (helpers live in deploy_helpers.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from typing import IO

import pytest
from deploy_helpers import ROOT


@pytest.fixture
def processes() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """start(name, argv, env) -> Popen; every process is stopped (TERM, then KILL) after the test."""
    started: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
    logs = ROOT / "var" / "deploy-tests"
    logs.mkdir(parents=True, exist_ok=True)

    def start(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed after the process stops
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        started.append((proc, log))
        return proc

    yield start
    for proc, _ in reversed(started):
        if proc.poll() is None:
            proc.terminate()
    for proc, log in started:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
