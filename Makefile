# Every target works from a fresh clone: each depends on the virtual environment it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-gpu test-containers lint format demo toyworld compile bench bench-gpu submit schedule images clean

# The development environment installs the same pins as the container images (images/requirements.txt), so the
# tests run exactly what the cluster runs.
$(STAMP): pyproject.toml images/requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch 2.13.0 first, so nothing resolves a multi-GB CUDA build instead.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -c images/requirements.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

# Both pipelines in containers built from images/, as a non-root uid with only the pipeline root shared: starts a
# Docker engine if none answers (root), builds the CPU image (on a base made from Debian packages where no registry
# answers). DREAMBOOTH_BUILD_CUDA=1 builds the CUDA image too; DREAMBOOTH_SKIP_CONTAINERS=1 skips when no engine.
test-containers: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/containers/test_containers.sh

# The main job on the embedded default: tiny model + synthetic subjects through kfp.local, end to end.
demo: $(STAMP)
	$(BIN)/python -W ignore -m pipelines.demo

# Retrain the toy world the demo runs on (VAE, text encoder, UNet, probe, toy CLIP; ~90 min on 2 CPU cores) and
# replace the shipped weights in dreambooth_lib/assets/toyworld/ (fp16, SHA256SUMS rewritten). Not part of CI.
toyworld: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m dreambooth_lib.testing.toyworld.train --out build/toyworld --threads 2 --ship

# pipelines/compiled/*.yaml for both targets (KFP on Kubernetes, Vertex AI Pipelines).
compile: $(STAMP)
	$(BIN)/python -m pipelines.compile

# Printed figures: a diffusers-style DreamBooth step vs ours on the same model and device (BENCH_ARGS=--sd15-shape on a
# GPU). The benchmark lives in benchmarks/, not in the installed package: `python -m benchmarks --help` lists the rest.
bench: $(STAMP)
	$(BIN)/python -m benchmarks train $(BENCH_ARGS)

# The issue-6 table on a GPU machine, in one call (writes $$OUT/bench.md; GPU_BENCH_SMOKE=1: the same on the CPU, tiny).
bench-gpu: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/gpu_bench.sh

PIPELINE ?= pipelines/compiled/personalize.kfp.yaml
submit: $(STAMP)
	@test -n "$(KFP_HOST)" || { echo "usage: make submit KFP_HOST=https://... [PIPELINE=...] [PARAMS=params.yaml]"; exit 2; }
	$(BIN)/dreambooth submit $(PIPELINE) --host $(KFP_HOST) $(if $(PARAMS),--params $(PARAMS))

schedule: $(STAMP)
	@test -n "$(KFP_HOST)" -a -n "$(CRON)" || { echo "usage: make schedule KFP_HOST=... CRON='0 0 2 * * *' [PIPELINE=...] [PARAMS=...]"; exit 2; }
	$(BIN)/dreambooth schedule $(PIPELINE) --host $(KFP_HOST) --cron '$(CRON)' $(if $(PARAMS),--params $(PARAMS))

# Needs a Docker engine; tags exactly what the compiled YAML references. Build args, when set: PYTHON_IMAGE (the
# base), TORCH_INDEX_URL (the CPU image's torch+cpu index), IMAGE_BUILD_FLAGS (e.g. --network host for an index on
# 127.0.0.1). images/README.md has the details.
IMAGE_BUILD_ARGS = $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) $(IMAGE_BUILD_FLAGS)
images: $(STAMP)
	docker build $(IMAGE_BUILD_ARGS) $(if $(TORCH_INDEX_URL),--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL)) \
	  -f images/Dockerfile.cpu -t $$($(BIN)/python -m components.images cpu) .
	docker build $(IMAGE_BUILD_ARGS) -f images/Dockerfile.cuda -t $$($(BIN)/python -m components.images cuda) .

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info
