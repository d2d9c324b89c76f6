# The two set-up commands of the README. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pipeflow-installed

.PHONY: demo test gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pipeflow train --config configs/demo.toml --out runs/demo --force

test: $(STAMP)
	$(PY) -m pytest -q

# On a CUDA machine: a few hundred steps of each schedule, figures under docs/benchmarks/gpu/ (<= 10 min on one H200)
gpu-check: $(STAMP)
	$(PY) -m pipeflow.tools.gpu_check

clean:
	rm -rf runs .pytest_cache
