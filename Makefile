# Every target is complete on a fresh machine: it creates .venv and installs what it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR := /usr/share/datasets/fashion-mnist

.PHONY: venv data demo test test-all lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

data:
	@if [ -f $(DATA_DIR)/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST found in $(DATA_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
			&& echo "installed Debian's dataset-fashion-mnist" \
			|| echo "apt could not install dataset-fashion-mnist; mlaan will download it into ./data"; \
	else \
		echo "no apt: mlaan will download Fashion-MNIST into ./data"; \
	fi

demo: venv data
	$(PY) -m mlaan train --config configs/demo.yaml

test: venv data
	$(PY) -m pytest -q -m "not slow"

test-all: venv data
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
