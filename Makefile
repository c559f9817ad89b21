# The README's two commands. Each creates .venv on first use and reuses it after.
#   make demo   set up and run the main job on the bundled model
#   make test   set up and pass the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --constraint constraints.txt

.PHONY: demo test lint bench clean

# llama-cpp-python builds from source. On Linux x86-64 build for AVX2 rather than -march=native:
# native builds use AMX on recent Xeons, and in VMs that advertise AMX without allowing it every
# prompt longer than one token crashes (SIGSEGV). Set CMAKE_ARGS yourself to override.
ifeq ($(shell uname -s)-$(shell uname -m),Linux-x86_64)
CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
export CMAKE_ARGS
endif

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"

# `localforge export setup`: llama.cpp's HF->GGUF converter from the installed llama-cpp-python's
# source distribution (pip downloads it once; its cache makes repeats offline)
$(VENV)/.demo-installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e ".[demo]"
	$(BIN)/localforge export setup
	touch $@

$(VENV)/.dev-installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e ".[dev]"
	$(BIN)/localforge export setup
	touch $@ $(VENV)/.demo-installed

# The main job: six product sheets -> records -> pairs -> LoRA -> eval -> GGUF, in demo-out/pipeline/.
# A second `make demo` skips every unchanged stage (and one cut short continues where it stopped).
demo: $(VENV)/.demo-installed
	$(BIN)/localforge doctor
	$(BIN)/localforge run examples/pipeline/pipeline.yaml
	$(BIN)/localforge run trace demo-out/pipeline 1

# The extraction review page is checked in a real browser (Debian's chromium): install it when missing.
test: $(VENV)/.dev-installed
	@command -v chromium >/dev/null 2>&1 || apt-get install -y -qq chromium >/dev/null 2>&1 \
		|| echo "note: could not install chromium (apt-get install chromium, as root); the review page test will say so"
	$(BIN)/python -m pytest

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check localforge tests benchmarks

bench: $(VENV)/.dev-installed
	$(PIP) -e ".[bench]"
	$(BIN)/python benchmarks/generation.py
	$(BIN)/python benchmarks/backends.py
	$(BIN)/python benchmarks/finetune.py
	$(BIN)/python benchmarks/grpo.py
	$(BIN)/python benchmarks/planner.py
	$(BIN)/python benchmarks/precision.py
	$(BIN)/python benchmarks/attention.py
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/chunking.py
	$(BIN)/python benchmarks/grounding.py
	$(BIN)/python benchmarks/teach.py
	$(BIN)/python benchmarks/teach_adaptive.py
	$(BIN)/python benchmarks/serve.py

clean:
	rm -rf $(VENV)
