"""Fulcrum settings.

Every setting that varies between machines is read here, once, from the environment. Defaults are safe for a
laptop: SQLite and a file-system broker under the data directory, so `make demo` needs no server running. Bad
values fail loudly at start-up instead of surfacing later as odd behaviour.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent.parent


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name}={value} must be >= {minimum}")
    return value


def env_choice(name: str, default: str, choices: set[str]) -> str:
    value = os.environ.get(name, default) or default
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} must be one of {sorted(choices)}")
    return value


def env_price(name: str) -> str:
    """A price (money per unit) as a decimal string; 0 when unset."""
    raw = os.environ.get(name, "") or "0"
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise ImproperlyConfigured(f"{name}={raw!r} must be a finite number >= 0")
    return raw.strip()


DEBUG = env_bool("FULCRUM_DEBUG", True)

_DEV_SECRET = "dev-only-insecure-secret-key"
SECRET_KEY = env_str("SECRET_KEY", _DEV_SECRET if DEBUG else "")
if not SECRET_KEY:
    raise ImproperlyConfigured("SECRET_KEY must be set when FULCRUM_DEBUG is off")

ALLOWED_HOSTS = [h for h in env_str("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",") if h]

# Where built model artifacts, the local database and the local broker's files live.
DATA_DIR = Path(env_str("FULCRUM_DATA_DIR", str(Path.home() / ".cache" / "fulcrum"))).expanduser()
ARTIFACTS_DIR = DATA_DIR / "artifacts"
# One folder per fine-tune: the merged weights (the result's trainable source) and its ONNX artifact.
FINE_TUNES_DIR = DATA_DIR / "fine-tunes"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "django_celery_beat",
    "django_celery_results",
    "registry",
    "workers",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "fulcrum.urls"
WSGI_APPLICATION = "fulcrum.wsgi.application"
ASGI_APPLICATION = "fulcrum.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "platform" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -----------------------------------------------------------------------------------------------
_default_db = f"sqlite:///{DATA_DIR / 'fulcrum.sqlite3'}"
try:
    DATABASES = {"default": dj_database_url.parse(env_str("DATABASE_URL", _default_db), conn_max_age=60)}
except ValueError as exc:  # dj-database-url raises ValueError for unknown schemes
    raise ImproperlyConfigured(f"DATABASE_URL is not a usable database URL: {exc}") from None
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web process, the CLI and worker processes write concurrently; WAL plus a busy timeout keeps SQLite
    # from failing with "database is locked" under that load.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "registry.api.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["registry.api.permissions.RolePermission"],
    "DEFAULT_PAGINATION_CLASS": "registry.api.pagination.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "registry.api.errors.exception_handler",
    # `?format=` belongs to the export endpoint, not to renderer selection.
    "URL_FORMAT_OVERRIDE": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Fulcrum API",
    "DESCRIPTION": "Prompts, versions, labels, artifacts, fine-tunes, scaling configs, stacks, datasets, evaluations.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": "/api/",
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "registry.api.schema.add_path_examples",
    ],
}
# Largest dataset file the API accepts, in bytes.
FULCRUM_MAX_UPLOAD_BYTES = env_int("FULCRUM_MAX_UPLOAD_BYTES", 20 * 1024 * 1024, minimum=1)

# --- Celery ---------------------------------------------------------------------------------------------------
# Default broker: kombu's file-system transport, which needs no server yet still delivers tasks to a separate
# worker process. Set CELERY_BROKER_URL to redis://… or amqp://… for anything shared between machines.
BROKER_DIR = DATA_DIR / "broker"
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "filesystem://")
if CELERY_BROKER_URL.split("://", 1)[0] not in {"filesystem", "redis", "rediss", "amqp", "pyamqp", "memory"}:
    raise ImproperlyConfigured(f"CELERY_BROKER_URL={CELERY_BROKER_URL!r} uses an unsupported transport")
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {}
if CELERY_BROKER_URL.startswith("filesystem://"):
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
        # The transport polls its folder; the default 1 s would add a second to every task hand-off.
        "polling_interval": 0.1,
    }
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# Evaluation chunks are idempotent, so acknowledging late and re-queueing on a lost worker is safe.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = env_str("FULCRUM_QUEUE", "fulcrum")
CELERY_TASK_ALWAYS_EAGER = False
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_WORKER_CONCURRENCY = env_int("FULCRUM_WORKER_CONCURRENCY", 1, minimum=1)
# "device": a run's tasks go to <FULCRUM_QUEUE>.gpu or .cpu by its artifact (workers/routing.py); "off": all to
# FULCRUM_QUEUE. FULCRUM_DEFAULT_DEVICE is the class of float32, unquantised artifacts.
FULCRUM_QUEUE_ROUTING = env_choice("FULCRUM_QUEUE_ROUTING", "off", {"off", "device"})
FULCRUM_DEFAULT_DEVICE = env_choice("FULCRUM_DEFAULT_DEVICE", "cpu", {"cpu", "gpu"})
FULCRUM_WORKER_QUEUES = [q.strip() for q in env_str("FULCRUM_WORKER_QUEUES", "").split(",") if q.strip()]
CELERY_TASK_ROUTES = ("workers.routing.route_task",)
# Fine-tune jobs go to a queue of their own (default: <FULCRUM_QUEUE>.train), so a training job never holds up
# evaluation; the machines that consume it need the `convert` extra (torch, transformers, peft).
FULCRUM_TRAIN_QUEUE = env_str("FULCRUM_TRAIN_QUEUE", "")

# --- Inference -------------------------------------------------------------------------------------------------
# "auto" takes CUDA when it really loads, else the CPU; "cpu"/"cuda" force one (cuda fails loudly if absent).
FULCRUM_PROVIDER = env_choice("FULCRUM_PROVIDER", "auto", {"auto", "cpu", "cuda"})
FULCRUM_INTRA_OP_THREADS = env_int("FULCRUM_INTRA_OP_THREADS", 0)  # 0 = all cores
# Items per task: a chunk decodes as one batch, and on a CPU a step of 32 rows costs little more than one of 16
# (each step reads all the weights either way).
FULCRUM_CHUNK_SIZE = env_int("FULCRUM_CHUNK_SIZE", 32, minimum=1)

# --- Fine-tuning -----------------------------------------------------------------------------------------------
# "auto" trains on CUDA when torch sees a device, else on the CPU.
FULCRUM_TRAIN_DEVICE = env_choice("FULCRUM_TRAIN_DEVICE", "auto", {"auto", "cpu", "cuda"})
FULCRUM_TRAIN_THREADS = env_int("FULCRUM_TRAIN_THREADS", 0)  # torch threads; 0 = torch's default (all cores)
# A running job whose progress has not moved for this long is taken to be orphaned (its worker died): a
# redelivered message may restart it, and cancelling it finishes it at once.
FULCRUM_TRAIN_STALE_SECONDS = env_int("FULCRUM_TRAIN_STALE_SECONDS", 900, minimum=30)
# Money per device hour of training, used when the base artifact has no price_per_device_hour of its own.
FULCRUM_TRAIN_PRICE_PER_HOUR = {
    "cpu": env_price("FULCRUM_TRAIN_PRICE_CPU_HOUR"),
    "cuda": env_price("FULCRUM_TRAIN_PRICE_GPU_HOUR"),
}

# --- Metrics ---------------------------------------------------------------------------------------------------
# The root of the multiprocess files of this machine: the web group writes here, each worker and beat in a directory
# of its own below it (fulcrum/multiproc.py). prometheus-client reads this variable when it is first imported, so it
# is put into the environment before anything imports it.
PROMETHEUS_MULTIPROC_DIR = env_str("PROMETHEUS_MULTIPROC_DIR", str(DATA_DIR / "metrics"))
os.environ["PROMETHEUS_MULTIPROC_DIR"] = PROMETHEUS_MULTIPROC_DIR
Path(PROMETHEUS_MULTIPROC_DIR).mkdir(parents=True, exist_ok=True)
FULCRUM_WORKER_METRICS_PORT = env_int("FULCRUM_WORKER_METRICS_PORT", 0)  # 0 = no HTTP endpoint on the worker
FULCRUM_BEAT_METRICS_PORT = env_int("FULCRUM_BEAT_METRICS_PORT", 0)  # 0 = no HTTP endpoint on beat

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("FULCRUM_LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}
