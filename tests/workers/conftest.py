from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.db import connection

from fulcrum.celery import app

ROOT = Path(__file__).resolve().parents[2]


def database_url() -> str:
    db = connection.settings_dict
    if db["ENGINE"] != "django.db.backends.postgresql":
        raise RuntimeError("worker tests need PostgreSQL (make test sets DATABASE_URL)")
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgresql://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@contextmanager
def running_worker(*, train: bool = False, **extra_env: str) -> Iterator[subprocess.Popen[bytes]]:
    """A real `manage.py worker` process on a queue of its own, bound to the test database.

    With `train`, it consumes that queue's training queue (`<queue>.train`, where fine-tune jobs go) instead.
    """
    queue = f"test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "DATABASE_URL": database_url(), "FULCRUM_QUEUE": queue, **extra_env}
    env.pop("FULCRUM_TRAIN_QUEUE", None)
    consumed = f"{queue}.train" if train else queue
    (ROOT / "var").mkdir(exist_ok=True)
    with open(ROOT / "var" / f"worker-{consumed}.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "worker", "-c", "1", "-Q", consumed, "-l", "INFO"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    previous = app.conf.task_default_queue
    app.conf.task_default_queue = queue
    try:
        yield proc
    finally:
        app.conf.task_default_queue = previous
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def worker_process() -> object:
    """Use as `with worker_process() as proc:` inside a transactional test."""
    return running_worker
