# syntax=docker/dockerfile:1
#
# Frontier container image: one `frontier serve` process (one uvicorn worker) per container.
#
#   CPU (default):  docker build -t frontier:cpu .
#   CUDA:           docker build -t frontier:cuda --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#                   (PyPI's Linux torch wheel is the CUDA build; or name one of PyTorch's CUDA
#                   indexes, e.g. https://download.pytorch.org/whl/cu128, that publishes torch 2.13.0
#                   for the CUDA version your driver supports). The CUDA runtime libraries come in
#                   as pip wheels (nvidia-*), so the base stays python:3.11-slim; the host needs the
#                   NVIDIA driver and the NVIDIA Container Toolkit, and the container FRONTIER_DEVICE=cuda.
#   Models at start: docker build --build-arg PULL_MODELS=0 ...   (then mount a volume on /models;
#                   `frontier serve` pulls the start-up models into it on first start)
#
# The torch version is read from pyproject.toml (the one place it is pinned, torch==2.13.0) and
# installed alone from TORCH_INDEX_URL, so that a CPU image never pulls the multi-GB CUDA build;
# every other dependency comes from PyPI with torch held at that version.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
# builder: a virtual environment in /opt/venv with the dependencies and the frontier package.
FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src

# Dependencies first (their layer survives source edits): split pyproject's list into the torch
# pin and the rest.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; torch = [d for d in deps if d.replace(' ', '').startswith('torch==')]; assert torch, 'pyproject.toml must pin torch exactly (torch==X.Y.Z)'; open('/tmp/torch.txt', 'w').write(torch[0] + '\n'); open('/tmp/requirements.txt', 'w').write('\n'.join(d for d in deps if d not in torch) + '\n')" \
 && cat /tmp/torch.txt

RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX_URL}" -r /tmp/torch.txt \
 && pip install -c /tmp/torch.txt -r /tmp/requirements.txt

# The package itself (no dependency resolution: everything is already there).
COPY README.md ./
COPY service/ ./service/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
 && python -c "import torch, service.cli; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# ---------------------------------------------------------------------------------------------
# models: `frontier pull` at build time (PULL_MODELS=1) into /models; PULL_MODELS=0 leaves it
# empty and the models are pulled at start into a volume. PULL_MODEL_IDS names other models than
# the start-up ones (space-separated manifest ids; then set FRONTIER_MODELS to match at run time).
FROM builder AS models

ARG PULL_MODELS=1
ARG PULL_MODEL_IDS=""

ENV FRONTIER_MODELS_DIR=/models \
    FRONTIER_MANIFESTS_DIR=/app/models

COPY models/ /app/models/
# hadolint ignore=SC2086
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir -p /models \
 && if [ "${PULL_MODELS}" = "1" ]; then frontier pull ${PULL_MODEL_IDS}; \
    else echo "PULL_MODELS=${PULL_MODELS}: models are pulled when the container starts"; fi

# ---------------------------------------------------------------------------------------------
# runtime: the venv, the manifests, the pulled models; a non-root user.
FROM ${PYTHON_IMAGE} AS runtime

ARG UID=10001
ARG GID=10001

LABEL org.opencontainers.image.title="frontier" \
      org.opencontainers.image.description="Frontier: an OpenAI-compatible model-serving microservice" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid "${GID}" frontier \
 && useradd --system --uid "${UID}" --gid frontier --home-dir /home/frontier --create-home \
      --shell /usr/sbin/nologin frontier \
 && mkdir -p /models /data /app \
 && chown frontier:frontier /models /data

COPY --from=builder /opt/venv /opt/venv
COPY models/ /app/models/
COPY --from=models --chown=${UID}:${GID} /models /models

# FRONTIER_MANIFESTS_DIR: the installed package cannot find the repo's models/ next to itself.
# FRONTIER_DATA_DIR: durable state (RAG collections); mount a volume there.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FRONTIER_HOST=0.0.0.0 \
    FRONTIER_PORT=8000 \
    FRONTIER_MODELS_DIR=/models \
    FRONTIER_MANIFESTS_DIR=/app/models \
    FRONTIER_DATA_DIR=/data

WORKDIR /app
USER ${UID}:${GID}

EXPOSE 8000

# Liveness only (/health answers as soon as the server listens); readiness (/ready: 503 until
# the start-up models are loaded) is for orchestrators: see docker-compose.yml and deploy/kubernetes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('FRONTIER_PORT', '8000'), timeout=4)"]

CMD ["frontier", "serve"]
