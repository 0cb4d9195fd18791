# `make serve` and `make test` each set up everything from nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= demo
HOST ?= 127.0.0.1
PORT ?= 8000
API_SERVERS ?= 2
PYTEST_ARGS ?=

.PHONY: setup serve test lint clean helm helm-lint hadolint deploy-lint docker-test

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/vserve serve $(MODEL) --host $(HOST) --port $(PORT) --api-server-count $(API_SERVERS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check vserve tests benchmarks
	$(VENV)/bin/mypy vserve

# Deployment (Dockerfile, helm/vserve). `make test` already runs these checks through
# tests/test_helm_chart.py and tests/test_dockerfile.py; these targets run them on their own.
helm: $(STAMP)
	scripts/get-helm.sh $(VENV)/bin

helm-lint: helm
	HELM=$(VENV)/bin/helm PYTHON=$(PY) scripts/helm-validate.sh

hadolint: $(STAMP)
	$(VENV)/bin/hadolint Dockerfile

deploy-lint: helm-lint hadolint

# Builds the CPU image, serves the demo model with 2 API servers in it, checks /v1/models and a
# completion. Needs a running Docker engine (skips with a message otherwise).
docker-test:
	scripts/docker-test.sh

clean:
	rm -rf $(VENV) build *.egg-info
