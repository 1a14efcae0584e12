# lora_lab developer commands. `make help` lists them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines take the CPU build of torch pinned in constraints/cpu.txt; machines with an
# NVIDIA driver get the default (CUDA) build and the `gpu` extra (liger-kernel).
HAS_NVIDIA := $(shell command -v nvidia-smi 2>/dev/null)
CONSTRAINTS ?= $(if $(HAS_NVIDIA),,-c constraints/cpu.txt)
COMMA := ,
EXTRAS ?= test$(COMMA)harness$(if $(HAS_NVIDIA),$(COMMA)gpu)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: help install demo test test-gpu test-oldest test-fast lint bench readme-figures clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/.installed  ## create .venv and install lora_lab with its test and harness extras

demo: install  ## a real training run of the embedded default (tiny model, built-in task)
	$(BIN)/python -m lora_lab.train

# Test workers (pytest-xdist): the sweep and CLI tests spend most of their time starting
# subprocesses and waiting on them, so two workers finish sooner even on two cores.
TEST_WORKERS ?= 2

test: install  ## the full test suite (offline, CPU)
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadgroup

test-gpu: install  ## the GPU tests, on a CUDA machine (make test hides the GPU)
	LORA_LAB_TEST_GPU=1 $(BIN)/python -m pytest -q -ra -m gpu

test-oldest:  ## the training tests on the oldest supported transformers / PEFT / accelerate (the GPU image's)
	$(PYTHON) -m venv $(VENV)-oldest
	$(VENV)-oldest/bin/pip install -q --upgrade pip
	$(VENV)-oldest/bin/pip install -q -c constraints/oldest.txt -e ".[test]"
	$(VENV)-oldest/bin/python -m pytest -q -ra -m "not slow" \
		tests/test_train.py tests/test_numbers.py tests/test_adapters.py tests/test_speed.py tests/test_lifecycle.py \
		tests/test_loftq.py

test-fast: install  ## the suite without the slow multi-run tests
	$(BIN)/python -m pytest -q -ra -m "not slow"

readme-figures: install  ## rerun the README's example commands; fails where a figure drifts (about 10 min on 2 cores)
	$(BIN)/python scripts/readme_figures.py

lint: install  ## ruff check and format check
	$(BIN)/ruff check lora_lab hydra_plugins tests scripts
	$(BIN)/ruff format --check lora_lab hydra_plugins tests scripts

bench: install  ## benchmarks: the GPU shapes of docs/benchmarks.md on a CUDA machine, a CPU smoke run elsewhere
	@if $(BIN)/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
		$(BIN)/python -m lora_lab.bench train --shape llama-8b --quant nf4 --batch 4 --seq 2048 && \
		$(BIN)/python -m lora_lab.bench train --shape llama-8b --quant nf4 --batch 4 --seq 2048 --checkpointing on && \
		$(BIN)/python -m lora_lab.bench train --shape llama-8b --quant none --batch 4 --seq 2048 && \
		$(BIN)/python -m lora_lab.bench train --shape llama-1b --quant nf4 --batch 8 --seq 2048 && \
		$(BIN)/python -m lora_lab.bench train --shape llama-1b --quant none --batch 8 --seq 2048 && \
		$(BIN)/python -m lora_lab.bench train --shape llama-1b --quant none --batch 8 --seq 2048 --workload varlen && \
		$(BIN)/python -m lora_lab.bench train --shape llama-1b --quant none --batch 8 --seq 2048 --workload varlen --attn flex_attention && \
		$(BIN)/python -m lora_lab.bench loftq --shape llama-8b --rank 16 --iters 1 5; \
	else \
		$(BIN)/python -m lora_lab.bench train --shape cpu-small --quant nf4 --batch 4 --seq 256 --steps 6 && \
		$(BIN)/python -m lora_lab.bench loftq --shape cpu-small --rank 16 --iters 1 5; \
	fi

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
