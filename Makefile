# Every target is complete on a fresh machine: it creates .venv and installs what it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR := /usr/share/datasets/fashion-mnist
DATA_ROOT := data
# The demo keeps configs/demo.yaml's model and method (the paper's 400-epoch recipe) at a demo's budget. On CPU:
# a subset for 2 epochs (~10 minutes on 2 cores). On a GPU: all 60,000 images for 15 epochs at batch 128, the
# recipe of BENCHMARKS.md's full Fashion-MNIST comparison, where dgl+mlaan measured 93.8-94.0% on CPU.
# DEMO_FLAGS come last and win, on either: make demo DEMO_FLAGS='--epochs 1' keeps the rest of the set;
# DEMO_CPU_FLAGS='...' or DEMO_GPU_FLAGS='...' replaces a whole set (DEMO_GPU_FLAGS= : the file's full recipe).
DEMO_CPU_FLAGS ?= --epochs 2 --train-samples 16000 --batch-size 64 --lr 0.05 --warmup-epochs 0.2
DEMO_GPU_FLAGS ?= --epochs 15 --batch-size 128 --lr 0.1 --weight-decay 5e-4 --warmup-epochs 1
DEMO_FLAGS ?=

.PHONY: venv data demo test test-all lint clean

venv: $(STAMP)

# torch/torchvision first, pinned, so that installing the package never pulls another torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST: Debian's dataset-fashion-mnist when apt can install it, else torchvision's download into ./data.
data: venv
	@if [ -f $(DATA_DIR)/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST: $(DATA_DIR)"; \
	elif $(PY) -c 'import sys; from mlaan.data import fashion_mnist_folder as f; sys.exit(f("$(DATA_ROOT)") is None)'; then \
		echo "Fashion-MNIST: $(DATA_ROOT)/"; \
	else \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
				&& echo "Fashion-MNIST: installed Debian's dataset-fashion-mnist in $(DATA_DIR)"; \
		fi; \
		[ -f $(DATA_DIR)/train-images-idx3-ubyte.gz ] \
			|| $(PY) -m mlaan download --dataset fashion-mnist --data-root $(DATA_ROOT); \
	fi

# The fastest measured path for this machine (mlaan.runtime.fast_path_flags): bf16 autocast on CUDA and on CPUs
# with AMX; channels-last is already on for CPU runs.
FAST_PATH := import torch; from mlaan import runtime as r; \
	flags, why = r.fast_path_flags(torch.device("cuda" if torch.cuda.is_available() else "cpu"))

demo: venv data
	@$(PY) -c '$(FAST_PATH); print(why)'
	@fast=$$($(PY) -c '$(FAST_PATH); print(" ".join(flags))'); \
	if $(PY) -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then \
		echo "GPU found: configs/demo.yaml with $(DEMO_GPU_FLAGS)"; \
		$(PY) -m mlaan train --config configs/demo.yaml --overwrite $$fast $(DEMO_GPU_FLAGS) $(DEMO_FLAGS); \
	else \
		echo "CPU only: configs/demo.yaml with $(DEMO_CPU_FLAGS)"; \
		$(PY) -m mlaan train --config configs/demo.yaml --overwrite $$fast $(DEMO_CPU_FLAGS) $(DEMO_FLAGS); \
	fi

# The tests need no downloaded data (they generate what they need when Fashion-MNIST is absent).
test: venv
	@$(MAKE) --no-print-directory data || echo "warning: Fashion-MNIST unavailable; its tests use generated files"
	$(PY) -m pytest -q -m "not slow"

test-all: venv data
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
