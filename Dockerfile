# syntax=docker/dockerfile:1
# Three stages: `build` resolves the package and its dependencies to wheels (the one stage
# that reads the package index for serving), `runtime` serves (installs those wheels only:
# no compilers, no torch), `prepare` converts the default model into a volume once
# (`docker compose` runs it as the `prepare-model` service).
ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MODEL_GATEWAY_MODEL_DIR=/models \
    MODEL_GATEWAY_HOST=0.0.0.0 \
    MODEL_GATEWAY_PORT=8000
# Our own wheelhouse, built above from pyproject.toml: pinned by construction.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels model-gateway \
    && useradd --create-home --uid 10001 gateway \
    && mkdir -p /models /var/log/model-gateway \
    && chown gateway:gateway /models /var/log/model-gateway
WORKDIR /home/gateway
USER 10001
EXPOSE 8000
# Config: MODEL_GATEWAY_* variables, and a YAML file mounted where MODEL_GATEWAY_CONFIG says.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('MODEL_GATEWAY_PORT', '8000') + '/ready', timeout=2)"]
CMD ["model-gateway", "serve"]

# Model preparation: torch and transformers, which serving never needs. TORCH_INDEX_URL can
# name an index with CPU-only torch builds (much smaller than the default CUDA ones).
FROM runtime AS prepare
ARG TORCH_INDEX_URL=""
USER 0
# Our wheel by its file name: the index is open here (for torch), and a project of the same
# name there must not replace ours.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    wheel="$(find /wheels -name 'model_gateway-*.whl')" \
    && pip install --no-cache-dir --find-links=/wheels \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "${wheel}[convert]"
USER 10001
HEALTHCHECK NONE
CMD ["model-gateway", "prepare-model"]
