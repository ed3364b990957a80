# popalign — the README's commands.
#   make demo   set up the environment and run the whole pipeline on the built-in synthetic world
#   make test   set up the environment and run the tests (the slow ones included; not the e2e ones,
#               nor the launched DeepSpeed ones)
#   make test-e2e   the end-to-end tests: the world's default base model and the reduced demo on it
#   make test-deepspeed   the multi-process DeepSpeed runs (ZeRO-2/3, offload, their checkpoints)
#   make test-min   the fast tests in .venv-min, against the oldest versions setup.cfg allows
#
# TORCH picks the PyTorch requirement; users get the default build for their platform. CPU-only
# machines (and CI) pass a CPU build, e.g.  make test TORCH=torch==2.13.0

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch>=2.6
# pytest-xdist workers (0: every test in this one process); an idle one takes queued tests from a busy
# one (worksteal), and the tests that use the world's base model share one build
TEST_WORKERS ?= 2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.popalign-installed
VENV_MIN ?= .venv-min
MIN_VERSIONS := .ci/min-versions.txt

.PHONY: demo test test-e2e test-deepspeed test-fast test-min lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

$(VENV_MIN)/.popalign-installed: setup.cfg pyproject.toml $(MIN_VERSIONS)
	$(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install --upgrade pip
	$(VENV_MIN)/bin/python -c "import torch" 2>/dev/null || $(VENV_MIN)/bin/python -m pip install "$(TORCH)"
	$(VENV_MIN)/bin/python -m pip install -c $(MIN_VERSIONS) -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/popalign demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -ra -m "not e2e and not deepspeed" -n $(TEST_WORKERS) --dist worksteal

# one process with every core: both tests wait on the same base-model build
test-e2e: $(STAMP)
	$(PY) -m pytest -q -ra -m e2e -n 0

test-deepspeed: $(STAMP)
	$(PY) -m pytest -q -ra -m deepspeed -n $(TEST_WORKERS) --dist worksteal

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not e2e" -n $(TEST_WORKERS) --dist worksteal

test-min: $(VENV_MIN)/.popalign-installed
	$(VENV_MIN)/bin/python -m pytest -q -m "not slow and not e2e" -p no:cacheprovider -n $(TEST_WORKERS) --dist worksteal

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) $(VENV_MIN) runs lightning_logs .pytest_cache
