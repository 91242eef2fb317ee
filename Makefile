# pisces_rl — common tasks. `make help` lists them.
SHELL   := /bin/bash
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

RECIPE  ?= recipes/grpo_short_video.py
CONFIG  ?= recipes/configs/grpo_shapes_cpu.yaml
ACCEL   ?= recipes/accelerate/single.yaml
ARGS    ?=
PYTEST_ARGS ?=

# without a GPU, tell DeepSpeed up front (accelerate's launcher imports it, and it warns that it found no GPU)
ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
export DS_ACCELERATOR ?= cpu
endif

# a config whose model is the ShapesWorld base model (`pretrained: shapes`) needs a world: the prebuilt one shipped
# in the package, else one built here first (`make world`)
PREBUILT_WORLD := src/pisces_rl/worlds/shapes/prebuilt/manifest.json
needs_world = $(if $(wildcard $(PREBUILT_WORLD)),,$(if $(shell grep -sqE '^[[:space:]]*pretrained:[[:space:]]*shapes' $(1) && echo yes),world))
NFT_CONFIG := $(if $(filter command line environment,$(origin CONFIG)),$(CONFIG),recipes/configs/nft_shapes_cpu.yaml)
BACKPROP_CONFIG := $(if $(filter command line environment,$(origin CONFIG)),$(CONFIG),recipes/configs/backprop_tiny_cpu.yaml)

.PHONY: help install test test-slow test-gpu train-grpo train-nft train-backprop world bench clean

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-15s %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=$(CONFIG) ACCEL=$(ACCEL) ARGS='key=value ...'"

install: $(STAMP)  ## create .venv/ with pip and install pisces_rl (editable) + dev extras

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: install  ## the fast CPU suite (includes the 2-process distributed tests)
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not slow and not gpu" -q $(PYTEST_ARGS)

test-slow: install  ## slow tests only
	$(PY) -m pytest -m "slow" -q $(PYTEST_ARGS)

test-gpu: install  ## GPU tests (needs CUDA)
	$(PY) -m pytest -m "gpu" -q $(PYTEST_ARGS)

# without a GPU, tell DeepSpeed up front (accelerate's launcher imports it, and it warns that it found no GPU)
ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
export DS_ACCELERATOR ?= cpu
endif

train-grpo: install $(call needs_world,$(CONFIG))  ## GRPO post-training (default: ShapesWorld on CPU, the prebuilt world); CONFIG=, ACCEL=, ARGS=
	$(VENV)/bin/accelerate launch --config_file $(ACCEL) $(RECIPE) --config $(CONFIG) $(ARGS)

train-nft: install $(call needs_world,$(NFT_CONFIG))  ## DiffusionNFT post-training (default: ShapesWorld on CPU, builds the world once); CONFIG=, ACCEL=, ARGS=
	$(VENV)/bin/accelerate launch --config_file $(ACCEL) recipes/grpo_short_video.py --config $(NFT_CONFIG) $(ARGS)

train-backprop: install $(call needs_world,$(BACKPROP_CONFIG))  ## direct reward backprop + consistency distillation (default: tiny CPU run); CONFIG=, ACCEL=, ARGS=
	$(VENV)/bin/accelerate launch --quiet --config_file $(ACCEL) recipes/backprop_short_video.py --config $(BACKPROP_CONFIG) $(ARGS)

world: install  ## rebuild ShapesWorld from nothing into .cache/shapes_world (used instead of the prebuilt one); WORLD_ARGS='--profile quick --force'
	$(PY) -m pisces_rl.cli world build $(WORLD_ARGS)

bench: install  ## run the benchmarks in benchmarks/
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:  ## remove build leftovers (keeps .venv and runs/)
	rm -rf build dist src/*.egg-info .pytest_cache
