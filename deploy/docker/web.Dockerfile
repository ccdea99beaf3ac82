# syntax=docker/dockerfile:1
# The web image: Django admin, API and /metrics under gunicorn; also runs migrations and beat.
# Build from the repository root: docker build -f deploy/docker/web.Dockerfile -t fulcrum/web .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    FULCRUM_DATA_DIR=/data \
    PROMETHEUS_MULTIPROC_DIR=/run/fulcrum-metrics

RUN useradd --create-home --uid 10001 fulcrum \
    && mkdir -p /data /run/fulcrum-metrics \
    && chown fulcrum:fulcrum /data /run/fulcrum-metrics

WORKDIR /app
COPY constraints.txt pyproject.toml ./
COPY platform ./platform
COPY registry ./registry
COPY workers ./workers
COPY manage.py ./
# The base install plus gunicorn. Model import (the `convert` extra) runs elsewhere, never in these images.
RUN pip install -c constraints.txt ".[web]"

USER fulcrum
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=5 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
CMD ["gunicorn", "-c", "python:fulcrum.gunicorn_conf", "fulcrum.wsgi:application"]
