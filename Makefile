# Two entry points do all set-up on a fresh machine:
#   make demo   - the main job (embedded Triton + sidecar + solver + short load test, then a report)
#   make test   - the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test bench install clean

$(BIN)/smdp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/smdp

demo: install
	$(BIN)/smdp demo

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/solve_bench.py

clean:
	rm -rf $(VENV) out
