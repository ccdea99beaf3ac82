"""A local gunicorn serving the Fulcrum API over a seeded registry, for the load and fuzz scripts.

Loopback only; the server runs with debug off and stops when the `with` block ends.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(database_url: str | None) -> dict[str, str]:
    data_dir = tempfile.mkdtemp(prefix="fulcrum-serve-")
    env = {
        **os.environ,
        "FULCRUM_DATA_DIR": data_dir,
        "FULCRUM_DEBUG": "0",
        "SECRET_KEY": "local-load-test-only",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "FULCRUM_LOG_LEVEL": "ERROR",
        "PROMETHEUS_MULTIPROC_DIR": str(Path(data_dir) / "metrics"),
        "DJANGO_SETTINGS_MODULE": "fulcrum.settings",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "platform"), os.environ.get("PYTHONPATH", "")]),
    }
    if database_url:
        env["DATABASE_URL"] = database_url
    return env


SEED = r"""
import django, json
django.setup()
from django.contrib.auth.models import User
from registry import access
from registry.models import Prompt
prompt, _ = Prompt.objects.get_or_create(name="qa", defaults={"description": "load test"})
v1, _ = prompt.create_version(template="Q: {{ question }}\nA:", variables=["question"], commit_message="v1")
v2, _ = prompt.create_version(
    template="Answer briefly.\nQ: {{ question }}\nA:",
    variables=["question"],
    examples=[{"inputs": {"question": "1+1?"}, "output": "2"}],
    commit_message="v2",
)
prompt.move_label("production", v2, reason="load test")
user, _ = User.objects.get_or_create(username="load-" + ROLE)
access.grant_role(user, ROLE)
_, raw = access.create_token(user, "load", "write" if ROLE != "viewer" else "read")
print(json.dumps({"token": raw, "etag": '"%s"' % v2.content_hash}))
"""


@contextmanager
def running_server(
    *, database_url: str | None = None, workers: int = 0, role: str = "viewer"
) -> Iterator[tuple[str, dict[str, str]]]:
    """(base URL, {"token", "etag"}) of a migrated, seeded gunicorn on a free loopback port."""
    import json

    env = server_env(database_url)
    python = sys.executable
    subprocess.run([python, str(ROOT / "manage.py"), "migrate", "--noinput", "-v", "0"], env=env, check=True)
    seeded = subprocess.run(
        [python, "-c", SEED.replace("ROLE", repr(role))], env=env, check=True, capture_output=True, text=True
    )
    seed = json.loads(seeded.stdout.strip().splitlines()[-1])
    port = free_port()
    workers = workers or max(2, (os.cpu_count() or 1) * 2)
    proc = subprocess.Popen(
        [
            python,
            "-m",
            "gunicorn",
            "fulcrum.wsgi:application",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
            "--worker-class",
            "sync",
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=ROOT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("gunicorn did not come up") from None
                time.sleep(0.3)
        yield base, seed
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
