# zostream developer tasks. `make help` lists them.
#
# torch is installed first and pinned: a bare `torch` lets pip pull a multi-GB CUDA build on a
# CPU machine. Override for a GPU box, e.g. `make install TORCH_SPEC=torch==2.13.0 \
#   TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cu128'`.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed
DEMO_PROMPT ?= What is the capital of France?

.PHONY: help venv install test lint format demo clean distclean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

venv: $(BIN)/python ## create .venv if missing

# Re-runs only when pyproject.toml changes (or after `make distclean`).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
	$(BIN)/pip install -e '.[engine,dev]'
	touch $@

install: $(STAMP) ## install zostream (editable) with the engine and dev extras into .venv

lint: install ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint ## lint, then the fast test suite (not marked slow)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

demo: install ## fetch the demo model (SmolLM2-135M) and run the demo
	dir="$$($(BIN)/zostream model fetch-demo | tail -n 1)"; \
	echo "demo model: $$dir"; \
	if [ -f bench/demo.sh ]; then \
		PATH="$(abspath $(BIN)):$$PATH" ZOSTREAM_DEMO_MODEL="$$dir" bash bench/demo.sh "$$dir"; \
	else \
		$(BIN)/zostream generate --model "$$dir" --chat "$(DEMO_PROMPT)"; \
	fi

clean: ## remove caches and build outputs (keeps .venv and the model cache)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf
	rm -rf .pytest_cache .ruff_cache build dist

distclean: clean ## also remove .venv
	rm -rf $(VENV)
