# Two entry points do all set-up on a fresh machine:
#   make demo   - the main job (embedded Triton + sidecar + solver + short load test, then a report)
#   make test   - the test suite (builds the native gate first when it can: `make native`)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test bench install native native-if-possible clean

$(BIN)/smdp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/smdp

# `make demo` builds the native gate when it can, so the gates run on the fast path (data_plane: auto).
demo: install native-if-possible
	$(BIN)/smdp demo

# The native data plane (C++ smdp-gate): installs its build dependencies where it can (apt), then builds.
native: install
	native/install_deps.sh
	$(MAKE) -C native PYTHON=$(abspath $(BIN)/python)

# `make test` builds it when it can; without it the native tests are skipped and say why
# (SMDP_REQUIRE_NATIVE=1, as in CI, makes them fail instead).
native-if-possible: install
	@$(MAKE) --no-print-directory native || echo "native gate not built: its tests will be skipped (see above)"

test: install native-if-possible
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/solve_bench.py

clean:
	rm -rf $(VENV) out native/build
