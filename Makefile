# `make run` and `make test` work on a fresh clone: each sets up what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
MODEL := models/smollm2-135m-instruct/model_gateway.json

.PHONY: install model run test lint format bench dashboard

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch==2.13.0 (the convert extra) is a CPU build; serving itself never imports torch.
	$(BIN)/python -m pip install --quiet -e '.[convert,dev]'
	touch $@

model: $(MODEL)

$(MODEL): | $(INSTALLED)
	$(BIN)/model-gateway prepare-model

run: install model
	$(BIN)/model-gateway serve

test: install model
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff format --check app tests bench deploy
	$(BIN)/ruff check app tests bench deploy
	$(BIN)/mypy app

format: install
	$(BIN)/ruff format app tests bench deploy
	$(BIN)/ruff check --fix app tests bench deploy

bench: install model
	$(BIN)/python bench/bench_serving.py $(BENCH_ARGS)

dashboard: install
	$(BIN)/python deploy/grafana/dashboard.py
