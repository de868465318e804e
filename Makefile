# `make demo` and `make test` work on a fresh machine: the first run creates .venv and installs.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that the test machines carry; on a CUDA machine install your CUDA build
# of torch>=2.13 into the venv first and this step keeps it.
TORCH ?= torch==2.13.0
# The exact versions the suite last passed with (`make lock` refreshes them); `make install LOCK=` takes the
# newest versions above pyproject.toml's lower bounds instead.
LOCK ?= constraints.txt
# uv (from PyPI, pinned by the lock) installs the locked packages in parallel; `make install UV=` uses pip alone.
# torch is installed by pip first (uv does not see the local CPU wheel) and uv keeps it: the lock leaves it out.
UV ?= $(VENV)/bin/uv
INSTALLER = $(if $(UV),$(UV) pip install -q --python $(PY),$(PY) -m pip install -q)

.PHONY: demo test test-fast lint format install lock matrix-table coverage-table

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(if $(UV),$(PY) -m pip install -q $(if $(LOCK),-c $(LOCK)) uv)
	$(INSTALLER) $(if $(LOCK),-c $(LOCK)) -e ".[test,plot]"
	touch $@

# A new venv with the newest versions above the lower bounds, frozen into the lock, then the whole suite on it:
# commit constraints.txt once it passes.
lock:
	rm -rf $(VENV)
	$(MAKE) install LOCK=
	{ echo "# make lock: the versions the suite last passed with (torch: the Makefile's TORCH)"; \
	  $(PY) -m pip freeze --exclude-editable | grep -iv '^torch=='; } > constraints.txt
	touch $(VENV)/.installed
	$(MAKE) test

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
