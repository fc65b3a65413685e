# The two commands of the README:
#   make demo   -- set up .venv, then run the main job
#   make test   -- lint + format check + tests (what CI runs)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint format clean bench-venv bench-train bench-sdcpp \
	bench-openvino-venv bench-openvino

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	# test-only FID reference; --no-deps: its torchvision would replace the pinned torch
	$(BIN)/python -m pip install -q --no-deps pytorch-fid==0.3.0
	# test-only sampler reference (tests/test_kdiffusion_parity.py); --no-deps: its own
	# requirements pull torchvision and training code; trampoline keeps diffusers' torchsde
	# import (DPMSolverSDEScheduler) working
	$(BIN)/python -m pip install -q --no-deps k-diffusion==0.1.1.post1 torchsde==0.2.6 torchdiffeq==0.2.5 trampoline==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/noisecraft demo

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) build dist src/*.egg-info

# Bench-only venv: denoising-diffusion-pytorch needs torchvision, which needs the
# torch 2.14.1 build that lies on this machine's disk (no download). noisecraft
# is installed into it too, so both trainers run on the same torch.
BENCH_VENV := .bench-venv
$(BENCH_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BENCH_VENV)/bin/python -m pip install -q 'denoising-diffusion-pytorch==2.3.4' \
		safetensors==0.8.0 typer tqdm scipy matplotlib mlxtend==0.25.0 scikit-learn
	# --no-deps: noisecraft pins torch 2.13.0; here it runs on the bench's torch 2.14.1
	$(BENCH_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(BENCH_VENV)/.installed

bench-venv: $(BENCH_VENV)/.installed

bench-train: bench-venv
	$(BENCH_VENV)/bin/python bench/train_throughput.py

# stable-diffusion.cpp's sd-cli, built once from the sdist of stable-diffusion-cpp-python
# 0.4.7 with -march=native (needs cmake and a C++ compiler; ~10 min on 2 cores), then the
# table of docs/performance.md's "stable-diffusion.cpp" section
SDCPP := .bench-sdcpp
bench-sdcpp: $(STAMP)
	test -x $(SDCPP)/sd-cli || $(BIN)/python bench/sdcpp.py --build $(SDCPP)
	$(BIN)/python bench/sdcpp.py --sd-cli $(SDCPP)/sd-cli

# OpenVINO against ours and diffusers on SD 1.5's architecture (bench/openvino.py): its own
# venv, so that openvino never enters the project's; torch pinned to the project's 2.13.0
# (the CPU build on this machine's disk), diffusers / transformers as the test extra pins them.
OV_VENV := .openvino-venv
$(OV_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(OV_VENV)
	$(OV_VENV)/bin/python -m pip install -q --upgrade pip
	$(OV_VENV)/bin/python -m pip install -q torch==2.13.0 diffusers==0.42.1 \
		transformers==5.23.0 openvino==2026.4.1 safetensors==0.8.0 numpy pillow \
		typer tqdm scipy
	# --no-deps: the pins above are the bench's; noisecraft's own needs are a subset
	$(OV_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(OV_VENV)/.installed

bench-openvino-venv: $(OV_VENV)/.installed

bench-openvino: bench-openvino-venv
	$(OV_VENV)/bin/python bench/openvino.py --sizes 256,512 --pipeline-sizes 512
