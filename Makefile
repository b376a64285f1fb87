# captionbot: `make run` starts the bot, `make test` runs the checks CI runs.
# Both create the virtual environment on first use.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The torch build this project is tested with; on the project's machines pip takes it from local disk.
# Elsewhere override it, e.g. `make run TORCH_PIN="torch torchvision"`.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install run test lint typecheck unit clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev,encoders,ray,api]'
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m bot

lint: install
	$(PY) -m ruff check .

typecheck: install
	$(PY) -m mypy

unit: install
	$(PY) -m pytest

test: lint typecheck unit

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
