# syntax=docker/dockerfile:1
# The CPU worker image: Celery worker + ONNX Runtime (CPU execution provider). No conversion dependencies
# (torch, transformers, optimum): a worker only runs ONNX artifacts that were imported elsewhere.
# Build from the repository root: docker build -f deploy/docker/worker.Dockerfile -t fulcrum/worker .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    FULCRUM_DATA_DIR=/data \
    PROMETHEUS_MULTIPROC_DIR=/run/fulcrum-metrics \
    FULCRUM_PROVIDER=cpu \
    FULCRUM_WORKER_METRICS_PORT=9100

RUN useradd --create-home --uid 10001 fulcrum \
    && mkdir -p /data /run/fulcrum-metrics \
    && chown fulcrum:fulcrum /data /run/fulcrum-metrics

WORKDIR /app
COPY constraints.txt pyproject.toml ./
COPY platform ./platform
COPY registry ./registry
COPY workers ./workers
COPY manage.py ./
# The base install only (onnxruntime-gpu runs on the CPU too, and it is the only ONNX Runtime wheel we install).
RUN pip install -c constraints.txt . \
    && ! pip show --quiet torch transformers optimum 2>/dev/null

USER fulcrum
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=4)"
CMD ["python", "manage.py", "worker"]
