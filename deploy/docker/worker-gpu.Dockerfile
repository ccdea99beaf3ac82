# syntax=docker/dockerfile:1
# The GPU worker image: as the CPU one, plus CUDA and cuDNN from PyPI (onnxruntime-gpu's `cuda` and `cudnn`
# extras). The driver comes from the host through the NVIDIA container runtime (compose: `gpus`, Kubernetes:
# the nvidia.com/gpu resource). No conversion dependencies.
# Build from the repository root: docker build -f deploy/docker/worker-gpu.Dockerfile -t fulcrum/worker-gpu .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    FULCRUM_DATA_DIR=/data \
    PROMETHEUS_MULTIPROC_DIR=/run/fulcrum-metrics \
    FULCRUM_PROVIDER=cuda \
    FULCRUM_WORKER_METRICS_PORT=9100 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN useradd --create-home --uid 10001 fulcrum \
    && mkdir -p /data /run/fulcrum-metrics \
    && chown fulcrum:fulcrum /data /run/fulcrum-metrics

WORKDIR /app
COPY constraints.txt pyproject.toml ./
COPY platform ./platform
COPY registry ./registry
COPY workers ./workers
COPY manage.py ./
# The dynamic loader is told where the nvidia-* wheels put the CUDA and cuDNN libraries.
RUN pip install -c constraints.txt ".[gpu]" \
    && ! pip show --quiet torch transformers optimum 2>/dev/null \
    && python -c "import glob, site; print('\n'.join(sorted(glob.glob(site.getsitepackages()[0] + '/nvidia/*/lib'))))" \
        > /etc/ld.so.conf.d/nvidia-pypi.conf \
    && ldconfig

USER fulcrum
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=4)"
CMD ["python", "manage.py", "worker"]
