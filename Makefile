# Two commands do everything on a fresh machine with only Python 3.11+:
#   make reproduce   set up .venv, then run every notebook in the offline profile (JOBS=N at once)
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

.PHONY: setup test test-slow test-all reproduce notebooks bench flower-demo clean-venv help lab site test-site verify-results

help:
	@echo "make reproduce | make test | make test-slow | make bench | make notebooks PROFILE=ci | make lab | make site PROFILE=offline | make test-site"

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

# JOBS notebooks at once, each in its own kernel (default: every core); the results do not depend on it.
JOBS ?= $(shell nproc 2>/dev/null || echo 1)
reproduce: setup
	$(BIN)/lalora notebooks --profile $(PROFILE) --jobs $(JOBS)

# A real Flower deployment on 127.0.0.1: SuperLink + 3 SuperNodes (own state folders), `flwr run`
flower-demo: setup
	$(BIN)/python -m lalora.flower.demo --workdir runs/flower-demo

notebooks: reproduce

# Re-run VERIFY_CELLS random committed cells of results/$(PROFILE) from an empty cache and compare
# (bitwise where the provenance matches, else within 5 points, naming the differing fields),
# after the slow test of the mechanism itself.
VERIFY_CELLS ?= 3
verify-results: setup
	$(BIN)/python -m pytest -m slow -q tests/test_verify_results.py
	$(BIN)/lalora verify-results --results results/$(PROFILE) --cells $(VERIFY_CELLS)

# The DP-step benchmark: ratios over fresh process draws, process CPU time, one thread (lalora/bench.py's
# MODEL_DEFAULTS); the table is printed and the raw times written to benchmarks/dp_step_cpu.json.
bench: setup
	$(BIN)/python benchmarks/dp_step.py --json benchmarks/dp_step_cpu.json

# JupyterLab on notebooks/: the jupytext .py sources open as notebooks (jupyter/jupyter_lab_config.py).
lab: setup
	$(BIN)/jupyter lab --config=jupyter/jupyter_lab_config.py $(if $(filter 0,$(shell id -u)),--allow-root)

# The executed notebooks of a profile as static HTML: results/$(PROFILE)/site/index.html
site: setup
	$(BIN)/lalora site --profile $(PROFILE)

# Renders the ci site and loads it in headless Chromium (installed from Debian packages when missing);
# executes the ci notebooks first when results/ci is missing (a few minutes).
test-site: setup
	@test -f results/ci/notebooks/runner_summary.json || $(BIN)/lalora notebooks --profile ci --quiet
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { $(if $(filter 0,$(shell id -u)),,sudo )apt-get update && \
	    DEBIAN_FRONTEND=noninteractive $(if $(filter 0,$(shell id -u)),,sudo )apt-get install -y chromium; }
	$(BIN)/python -m pytest tests/test_site.py tests/test_lab.py -q

clean-venv:
	rm -rf $(VENV)

# The GPU checks of issue 12 (one H100/H200, < 10 min, the machine's own python3; see README "GPU check").
# DRYRUN=1 runs every stage on the CPU under the Triton interpreter at tiny shapes.
.PHONY: gpu-check
gpu-check:
	PY=$${PY:-python3} bash gpu_check/run.sh
