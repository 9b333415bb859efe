# Two commands do everything on a fresh machine with only Python 3.11+:
#   make reproduce   set up .venv, then run every notebook in the offline profile
#   make test        set up .venv, then run the test suite (slow and GPU tests excluded)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lalora-installed
PROFILE ?= offline
# Without a GPU the Triton kernels run on the CPU through Triton's interpreter (that is how CI tests
# them); on a machine with nvidia-smi they run natively. Override with TRITON_INTERPRET=0/1.
export TRITON_INTERPRET ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 0 || echo 1)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-slow test-all reproduce notebooks bench clean-venv help

help:
	@echo "make reproduce | make test | make test-slow | make bench | make notebooks PROFILE=ci"

# Idempotent: re-runs pip only when a pyproject changes (or the venv is missing).
$(STAMP): pyproject.toml kernels/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ./kernels -e ".[all]"
	@touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

test-slow: setup
	$(BIN)/python -m pytest -m "slow" -q

test-all: setup
	$(BIN)/python -m pytest -q

reproduce: setup
	$(BIN)/lalora notebooks --profile $(PROFILE)

notebooks: reproduce

bench: setup
	$(BIN)/python benchmarks/dp_step.py --json benchmarks/dp_step_cpu.json

clean-venv:
	rm -rf $(VENV)

# The GPU checks of issue 12 (one H100/H200, < 10 min, the machine's own python3; see README "GPU check").
# DRYRUN=1 runs every stage on the CPU under the Triton interpreter at tiny shapes.
.PHONY: gpu-check
gpu-check:
	PY=$${PY:-python3} bash gpu_check/run.sh
