# One-command set-up and the two README commands. Idempotent: the venv is rebuilt only
# when the lock file, pyproject or this Makefile change. Every install step fails loudly.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.neuroshard-installed
TYPECHECK := build/typecheck

export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test test-fast lint typecheck format clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch 2.13.0 CPU comes from this machine's disk; pin it first so nothing pulls a CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.lock
	$(PIP) install fbgemm-gpu-cpu==1.8.0 torch==2.13.0
	# torchrec's fbgemm-gpu requirement is the multi-GB CUDA build: install it without deps.
	$(PIP) install --no-deps torchrec==1.9.2
	$(PIP) install --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, fbgemm_gpu, torchrec, lightgbm, ray, scipy, yaml, neuroshard"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/neuroshard plan data/examples/tables.json --devices 4 --memory 4GB --out plan.json

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# mypy sees the installed layout: pretrain/ and search/ as neuroshard.pretrain / .search.
typecheck: setup
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/neuroshard
	cp -rs $(CURDIR)/neuroshard/. $(TYPECHECK)/neuroshard/
	ln -s $(CURDIR)/pretrain $(TYPECHECK)/neuroshard/pretrain
	ln -s $(CURDIR)/search $(TYPECHECK)/neuroshard/search
	cd $(TYPECHECK) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml -p neuroshard

test: setup lint typecheck
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build dist *.egg-info
