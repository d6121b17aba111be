# Two commands for a fresh machine with Python 3.10+ and pip: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.distill-installed
PYTEST_ARGS ?=

.PHONY: venv demo notebooks test test-all clean-runs

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) -m distill.tools.demo

# the notebooks run at full size, in place: their committed outputs are this command's (about 10 minutes)
notebooks: venv
	$(PY) scripts/run_notebooks.py

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

# also the slow end-to-end checks (DDP on CPU, bf16); minutes more
test-all: venv
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

clean-runs:
	rm -rf runs
