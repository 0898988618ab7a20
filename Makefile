# Two commands set everything up on a fresh machine with Python 3.11:
#   make test   create .venv, install every component, build the tiny models, run every test suite
#   make demo   same install, then train each component's baseline and ours on the tiny models and draw
#               their reward curves (outputs/demo/index.md lists every figure)
# On a GPU machine: `make install GPU=1` (checks that the installed torch sees CUDA). For another CUDA
# build of torch, point TORCH_INDEX_URL at the PyTorch wheel index for your CUDA version.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# PyPI's torchvision does not import beside the CPU-only torch 2.13 wheel; this pair installs and imports
# together (on Linux x86_64 it is the CUDA build, which also runs on a CPU).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX_URL ?=
GPU ?= 0
export RSM_TINY_MODELS ?= $(CURDIR)/.cache/tiny_models
export HF_HUB_DISABLE_TELEMETRY := 1
export WANDB_MODE ?= offline

COMPONENT_REQUIREMENTS := $(wildcard */requirements.txt)
STAMP := $(VENV)/.rsm-installed
INSTALL_INPUTS := Makefile constraints.txt requirements-test.txt shared_rewards/pyproject.toml ci/pyproject.toml $(COMPONENT_REQUIREMENTS)

.PHONY: install test demo tiny-models bench clean-venv

install: $(STAMP)

$(STAMP): $(INSTALL_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip
	$(PIP) install --quiet $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) $(TORCH_SPEC)
	$(PIP) install --quiet -c constraints.txt -r requirements-test.txt -e ./shared_rewards -e ./ci \
		$(foreach r,$(COMPONENT_REQUIREMENTS),-r $(r))
	$(PIP) check
	@if [ "$(GPU)" = "1" ]; then $(PY) -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda available:', ok); sys.exit(0 if ok else 'GPU=1 but torch.cuda.is_available() is False: set TORCH_INDEX_URL to the wheel index of your CUDA version')"; fi
	touch $(STAMP)

tiny-models: install
	$(PY) -m rsm_testkit build

test: tiny-models
	$(PY) ci/run_tests.py

demo: tiny-models
	HF_HUB_OFFLINE=1 $(PY) scripts/demo.py --out outputs/demo

bench: tiny-models
	$(PY) shared_rewards/bench/bench_rewards.py
	HF_HUB_OFFLINE=1 $(PY) sd35_zeroth_order/bench/bench_epoch.py --tiny
	HF_HUB_OFFLINE=1 $(PY) sd15_zeroth_order/bench/bench_epoch.py --tiny
	HF_HUB_OFFLINE=1 $(PY) sd35_first_order/bench/bench_epoch.py --tiny
	HF_HUB_OFFLINE=1 $(PY) sd15_first_order/bench/bench_epoch.py --tiny

clean-venv:
	rm -rf $(VENV)
