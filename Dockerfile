# syntax=docker/dockerfile:1
#
# qustream worker image.
#
#   GPU (default, CUDA wheels):  docker build -t qustream .
#   CPU only (much smaller):     docker build -t qustream:cpu \
#                                  --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# The Hugging Face / model cache lives in the volume /home/qustream/.cache; fill it once with
#   docker run --rm -v qustream-hf-cache:/home/qustream/.cache qustream qustream model prepare

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
# builder: resolve and install everything into /opt/venv
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# Wheel index for torch. Default: CUDA 12.6 wheels. CPU alternative:
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# A compiler only for any dependency that has no wheel; this stage is thrown away.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip setuptools wheel

# torch first, from the chosen index, so the PyPI resolution below keeps that build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.3"

WORKDIR /src
# Dependencies in their own layer: a source change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

COPY . .
RUN pip install .

# ---------------------------------------------------------------------------------------------
# runtime: slim image, non-root, only the venv from the builder
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="qustream" \
      org.opencontainers.image.description="Kafka / Redis Streams worker that parses search queries with a language model" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 qustream \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/qustream \
      --shell /usr/sbin/nologin qustream \
 && mkdir -p /home/qustream/.cache/huggingface \
 && chown -R 10001:10001 /home/qustream

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/qustream \
    XDG_CACHE_HOME=/home/qustream/.cache \
    HF_HOME=/home/qustream/.cache/huggingface \
    QUSTREAM_WEB_HOST=0.0.0.0 \
    QUSTREAM_WEB_PORT=6066 \
    QUSTREAM_LOG_FORMAT=json

USER 10001:10001
WORKDIR /home/qustream

# Model weights and the parse cache's on-disk state (HF_HOME, XDG_CACHE_HOME) persist here.
VOLUME ["/home/qustream/.cache"]

EXPOSE 6066

# slim has no curl: ask /ready with the interpreter itself (urlopen raises on 503).
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:6066/ready', timeout=4).status == 200 else 1)"]

STOPSIGNAL SIGTERM
CMD ["qustream", "worker"]
