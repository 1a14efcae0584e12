# lora_lab developer commands. `make help` lists them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines take the CPU build of torch pinned in constraints/cpu.txt; machines with an
# NVIDIA driver get the default (CUDA) build.
CONSTRAINTS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints/cpu.txt)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: help install demo test test-fast lint bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(CONSTRAINTS) -e ".[test]"
	touch $@

install: $(BIN)/.installed  ## create .venv and install lora_lab with its test extras

demo: install  ## a real training run of the embedded default (tiny model, built-in task)
	$(BIN)/python -m lora_lab.train

test: install  ## the full test suite (offline, CPU)
	$(BIN)/python -m pytest -q -ra

test-fast: install  ## the suite without the slow multi-run tests
	$(BIN)/python -m pytest -q -ra -m "not slow"

lint: install  ## ruff check and format check
	$(BIN)/ruff check lora_lab hydra_plugins tests
	$(BIN)/ruff format --check lora_lab hydra_plugins tests

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
