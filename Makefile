# One-command set-up and the two README commands. Idempotent: the venv is rebuilt only
# when the lock file, pyproject or this Makefile change.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.neuroshard-installed

export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch 2.13.0 CPU comes from this machine's disk; pin it first so nothing pulls a CUDA build.
	$(PIP) install torch==2.13.0 2>&1 | grep -v "is ignored" || true
	$(PIP) install -r requirements.lock 2>&1 | grep -v "is ignored" || true
	$(PIP) install fbgemm-gpu-cpu==1.8.0 torch==2.13.0 2>&1 | grep -v "is ignored" || true
	# torchrec's fbgemm-gpu requirement is the multi-GB CUDA build: install it without deps.
	$(PIP) install --no-deps torchrec==1.9.2 2>&1 | grep -v "is ignored" || true
	$(PIP) install --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, fbgemm_gpu, torchrec, lightgbm, ray, neuroshard" 
	touch $(STAMP)

demo: setup
	$(VENV)/bin/neuroshard plan data/examples/tables.json --devices 4 --memory 4GB --out plan.json

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build dist *.egg-info
