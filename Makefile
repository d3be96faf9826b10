# medssl: two commands on a fresh machine.
#   make demo   create .venv if missing, install, run the end-to-end demo on the phantom
#   make test   same bootstrap, then ruff, mypy and the whole test suite (what CI runs)
#   make test-fast  the same without the tests marked slow (multi-process, end-to-end or
#               over a few seconds): the inner loop, under 3 minutes on 2 cores
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned by the caller's platform: pip on this project's
# machines takes these CUDA builds from local disk; they run on CPU too.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=
# test processes (pytest-xdist); the tests that start Ray share one (tests/conftest.py)
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS)

.PHONY: demo test test-fast install install-test lint clean

$(VENV)/.base-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e .
	touch $@

# DeepSpeed builds against the installed torch, hence --no-build-isolation after it.
$(VENV)/.test-installed: $(VENV)/.base-installed
	$(PY) -m pip install --quiet -e '.[test,dali]'
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation 'deepspeed>=0.15'
	touch $@

install: $(VENV)/.base-installed

install-test: $(VENV)/.test-installed

demo: install
	$(VENV)/bin/medssl demo --out $(DEMO_OUT)

test: lint
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: lint
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

# ruff, then mypy over the packages (pyproject.toml [tool.mypy])
lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache .mypy_cache
