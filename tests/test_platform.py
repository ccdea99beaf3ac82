"""The Django project lives in platform/fulcrum; `platform` itself must stay the standard library's module."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_platform_gives_the_stdlib_after_django_and_celery_start() -> None:
    import django

    django.setup()
    from fulcrum.celery import app

    assert app.main == "fulcrum"
    import platform

    assert Path(platform.__file__).parent == Path(sysconfig.get_paths()["stdlib"])
    assert platform.system() == os.uname().sysname


def test_platform_folder_is_not_a_package() -> None:
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert (ROOT / "platform" / "fulcrum" / "settings.py").is_file()


def test_import_platform_from_the_repository_root_gives_the_stdlib() -> None:
    # The repository root comes first on sys.path when a script or `python -c` runs from it.
    code = (
        "import sys; sys.path.insert(0, 'platform'); import django, celery, uuid, platform; "
        "import fulcrum.celery; print(platform.__file__); print(platform.system())"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "fulcrum.settings"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert Path(out[0]).parent == Path(sysconfig.get_paths()["stdlib"])
    assert out[1] == os.uname().sysname


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("FULCRUM_DEBUG", "maybe", "is not a boolean"),
        ("FULCRUM_CHUNK_SIZE", "ten", "is not an integer"),
        ("FULCRUM_PROVIDER", "tpu", "must be one of"),
        ("DATABASE_URL", "nosuchdb://x", "DATABASE_URL"),
        ("CELERY_BROKER_URL", "carrier-pigeon://x", "unsupported transport"),
    ],
)
def test_it_refuses_to_start_with_a_bad_setting(name: str, value: str, message: str) -> None:
    env = {**os.environ, name: value, "DJANGO_SETTINGS_MODULE": "fulcrum.settings"}
    proc = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_production_mode_requires_a_secret_key() -> None:
    env = {**os.environ, "FULCRUM_DEBUG": "0", "SECRET_KEY": ""}
    proc = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "SECRET_KEY must be set" in proc.stderr


def test_suite_runs_against_postgresql_and_a_real_broker(settings) -> None:  # type: ignore[no-untyped-def]
    if os.environ.get("FULCRUM_REQUIRE_SERVICES") != "1":
        pytest.skip("only enforced under `make test` (FULCRUM_REQUIRE_SERVICES=1)")
    assert settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
    assert settings.CELERY_BROKER_URL.split("://")[0] in {"redis", "amqp", "pyamqp"}
