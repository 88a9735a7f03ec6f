# `make run` and `make test` work on a fresh clone: each sets up what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
MODEL := models/smollm2-135m-instruct/model_gateway.json

.PHONY: install model run test lint format bench dashboard load images

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch==2.13.0 (the convert extra) is a CPU build; serving itself never imports torch.
	$(BIN)/python -m pip install --quiet -e '.[convert,quantize,dev]'
	# TGI's official client, for the e2e tests: its last release pins huggingface-hub<1,
	# which the one installed above (2.x) contradicts; it uses nothing that changed.
	$(BIN)/python -m pip install --quiet --no-deps text-generation==0.7.0
	touch $@

model: $(MODEL)

$(MODEL): | $(INSTALLED)
	$(BIN)/model-gateway prepare-model

# The embedded default has no API keys: its door is open, to this machine only (the log
# says so). Serving others: `model-gateway serve --config FILE` with `keys:` (README).
run: install model
	$(BIN)/model-gateway serve --host 127.0.0.1 --auth off

# Every tier: tests/system-deps.sh installs what they talk to (or says how), starts dockerd.
test: install model
	tests/system-deps.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff format --check app tests bench deploy loadtest
	$(BIN)/ruff check app tests bench deploy loadtest
	$(BIN)/mypy app

format: install
	$(BIN)/ruff format app tests bench deploy loadtest
	$(BIN)/ruff check --fix app tests bench deploy loadtest

bench: install model
	$(BIN)/python bench/bench_serving.py $(BENCH_ARGS)

dashboard: install
	$(BIN)/python deploy/grafana/dashboard.py

# Load test against a running gateway (`make run` in another shell, or the compose stack):
# CSV and HTML report under loadtest/results/. USER_CLASSES picks scenarios (default: all);
# API_KEY=mg-... for a gateway that requires keys (the compose stack).
HOST ?= http://localhost:8000
USERS ?= 8
DURATION ?= 60s
USER_CLASSES ?=
API_KEY ?=
load: install
	mkdir -p loadtest/results
	API_KEY=$(API_KEY) $(BIN)/locust -f loadtest/locustfile.py --headless --host $(HOST) --users $(USERS) \
		--spawn-rate $(USERS) --run-time $(DURATION) --csv loadtest/results/load \
		--csv-full-history --html loadtest/results/load.html $(USER_CLASSES)
	$(BIN)/python loadtest/plot.py loadtest/results/load_stats_history.csv loadtest/results/load.png

# The serving image (model-gateway:TAG) and the model preparation image
# (model-gateway-prepare:TAG). Where no registry can be pulled, make a base first:
# `deploy/docker/base-image.sh`, then `make images BASE_IMAGE=model-gateway-base:bookworm`.
# The build reads the package index through this machine's CA bundle (CA_BUNDLE, if it
# exists), and prefers wheels put in .docker-build/ (a CPU build of torch).
BASE_IMAGE ?= python:3.12-slim
TAG ?= latest
CA_BUNDLE ?= /etc/ssl/certs/ca-certificates.crt
DOCKER ?= docker
# A client without buildx gets the plain builder: the Dockerfile needs nothing more.
DOCKER_BUILD = $(shell $(DOCKER) buildx version >/dev/null 2>&1 || echo DOCKER_BUILDKIT=0) \
	$(DOCKER) build --network host --build-arg BASE_IMAGE=$(BASE_IMAGE)
images:
	$(if $(wildcard $(CA_BUNDLE)),cp $(CA_BUNDLE) .docker-build/ca.crt)
	$(DOCKER_BUILD) --target runtime -t model-gateway:$(TAG) .
	$(DOCKER_BUILD) --target prepare -t model-gateway-prepare:$(TAG) .
