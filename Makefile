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

.PHONY: setup test test-slow test-all reproduce notebooks bench clean-venv help verify-results

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

# Re-run VERIFY_CELLS random committed cells of results/$(PROFILE) from an empty cache and compare
# (bitwise where the provenance matches, else within 5 points, naming the differing fields),
# after the slow test of the mechanism itself.
VERIFY_CELLS ?= 3
verify-results: setup
	$(BIN)/python -m pytest -m slow -q tests/test_verify_results.py
	$(BIN)/lalora verify-results --results results/$(PROFILE) --cells $(VERIFY_CELLS)

bench: setup
	$(BIN)/python benchmarks/dp_step.py --json benchmarks/dp_step_cpu.json

clean-venv:
	rm -rf $(VENV)
