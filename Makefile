# Two entry points: `make up` runs the service on embedded defaults, `make test` runs the tests.
# Each creates its own virtual environment and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: up test clean

$(VENV)/.run-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(TORCH)"
	$(VENV)/bin/pip install --quiet -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.run-installed
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

up: $(VENV)/.run-installed
	$(VENV)/bin/lockstep up

test: $(VENV)/.dev-installed
	$(VENV)/bin/python -m pytest -m "integration or not integration" --durations=10 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
