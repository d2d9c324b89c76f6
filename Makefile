# The two set-up commands of the README. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pipeflow-installed
# Test workers (pytest-xdist): 3 on the 2-core CI machine, because many tests wait (on launched processes, on
# rendezvous, on the 12 s silences of the timeout tests) and a third worker fills those waits: on 2 cores the
# suite took 398 s on 3 workers against 477 and 447 s on 2 (run in turn: 2, 3, 2). Each test launches up to 4
# processes of its own.
TEST_WORKERS ?= 3

.PHONY: demo test gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# By parts on 2 ranks against DDP on 2 ranks and one device, on the bundled 8x8 digits (about 4 min on 2 cores).
# Run again, it reuses the finished runs in runs/demo/runs/ (and resumes an interrupted one).
demo: $(STAMP)
	@echo "pipeflow demo: Glow on the 8x8 digits, trained by parts on 2 processes, against DDP on 2 and one device"
	@$(VENV)/bin/pipeflow compare --ranks 2 --config configs/demo_compare.toml --runs e2e,ddp2,pipeline2-ddp \
		--out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# On a CUDA machine: a few hundred steps of each schedule, figures under docs/benchmarks/gpu/ (<= 10 min on one H200)
gpu-check: $(STAMP)
	$(PY) -m pipeflow.tools.gpu_check

clean:
	rm -rf runs .pytest_cache
