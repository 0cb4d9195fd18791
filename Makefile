# `make serve` and `make test` each set up everything from nothing: `make serve` what
# serving needs, `make test` that plus the test tools.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SERVE_STAMP := $(VENV)/.installed-serve
TEST_STAMP := $(VENV)/.installed-test
MODEL ?= demo
HOST ?= 127.0.0.1
PORT ?= 8000
API_SERVERS ?= 2
PYTEST_ARGS ?=
# torch: a CPU-only build on a machine without a GPU is
#   make serve TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# setuptools says, for every editable install, that a folder named like the package may
# shadow it: that folder is the package here.
PIP := PYTHONWARNINGS="ignore:Editable installation:UserWarning" $(PY) -m pip

.PHONY: setup serve test lint clean helm helm-lint hadolint deploy-lint docker-test

setup: $(TEST_STAMP)

$(SERVE_STAMP): pyproject.toml
	@echo "== vserve: setting up $(VENV) (torch first, then what serving needs)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) install $(TORCH_PIP_ARGS) '$(TORCH)'
	$(PIP) install -e .
	touch $@
	@echo "== vserve: installed; the commands are in $(VENV)/bin (vserve, or: source $(VENV)/bin/activate)"

$(TEST_STAMP): $(SERVE_STAMP)
	@echo "== vserve: adding the test and lint tools"
	$(PIP) install -e '.[test]'
	touch $@

serve: $(SERVE_STAMP)
	$(VENV)/bin/vserve serve $(MODEL) --host $(HOST) --port $(PORT) --api-server-count $(API_SERVERS)

test: $(TEST_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check vserve tests benchmarks
	$(VENV)/bin/mypy vserve

# Deployment (Dockerfile, helm/vserve). `make test` already runs these checks through
# tests/test_helm_chart.py and tests/test_dockerfile.py; these targets run them on their own.
helm: $(TEST_STAMP)
	scripts/get-helm.sh $(VENV)/bin

helm-lint: helm
	HELM=$(VENV)/bin/helm PYTHON=$(PY) scripts/helm-validate.sh

hadolint: $(TEST_STAMP)
	$(VENV)/bin/hadolint Dockerfile

deploy-lint: helm-lint hadolint

# Builds the CPU image, serves the demo model with 2 API servers in it, checks /v1/models and a
# completion. Needs a running Docker engine (skips with a message otherwise).
docker-test:
	scripts/docker-test.sh

clean:
	rm -rf $(VENV) build *.egg-info
