# syntax=docker/dockerfile:1
# The trainer image: the full pinned environment (TensorFlow, OpenVINO, Ray) and the tools that
# export and train, for the Ray cluster of deploy/kuberay/ (head and workers run this image).
# Build from the repository root:
#   docker build -f deploy/trainer.Dockerfile -t matcher-trainer:0.1.0 .
FROM python:3.11.14-slim-bookworm
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 TF_CPP_MIN_LOG_LEVEL=2 \
    PATH=/opt/venv/bin:$PATH PYTHONPATH=/src
COPY requirements.lock /tmp/requirements.lock
RUN python -m venv /opt/venv && pip install -r /tmp/requirements.lock
WORKDIR /src
# The tools (export/, train/) and what they import: the library (matcher/) and integrity/.
# The Ray actors import matcher/ from the same path on every node.
COPY matcher/ matcher/
COPY integrity/ integrity/
COPY export/ export/
COPY train/ train/
COPY pyproject.toml pyproject.toml
# Ray writes its session files under /tmp; the shared volume (photos, cache, models) is
# mounted at /work by the RayCluster.
RUN useradd --uid 10001 --create-home --shell /bin/bash matcher
USER 10001:10001
