# `make demo` and `make test` work on a fresh machine: the first run creates .venv and installs.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that the test machines carry; on a CUDA machine install your CUDA build
# of torch>=2.13 into the venv first and this step keeps it.
TORCH ?= torch==2.13.0

.PHONY: demo test test-fast lint format install matrix-table coverage-table

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,plot]"
	touch $@

demo: install
	$(VENV)/bin/qlaunch demo

# The Slurm tests need Debian's slurmctld, slurmd and munge: installed here (apt-get) if missing.
test: install lint
	python3 tests/support/slurm_cluster.py install
	$(PY) -m pytest --durations=15

# The unit tests only (in process, no launches): the fast loop while editing.
test-fast: install
	$(PY) -m pytest tests/unit -q

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Runs the family x strategy matrix and rewrites README.md's table from its results.
matrix-table: install
	QLAUNCH_WRITE_README=1 $(PY) -m pytest tests/integration/test_matrix.py tests/integration/test_readme_table.py

# Walks every causal-LM family transformers ships and rewrites tests/support/family_coverage.json and README.md's
# coverage section from the result.
coverage-table: install
	QLAUNCH_WRITE_README=1 $(PY) -m pytest tests/unit/test_family_coverage.py -q
