# syntax=docker/dockerfile:1
# The matcher, TensorFlow-free: serves MATCHER_BACKEND=tfserving only (the embedded backend
# needs TensorFlow, which this image does not have). Build from the repository root:
#   docker build -f deploy/matcher.Dockerfile -t matcher:0.1.0 .
# deploy/matcher.Dockerfile.dockerignore keeps the context to the files copied below.

# ---- builder: a virtualenv with exactly the pinned runtime packages ----------------------
FROM python:3.11.14-slim-bookworm AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY deploy/requirements-matcher.txt /tmp/requirements-matcher.txt
# --no-deps + pip check: an unlisted dependency fails the build instead of arriving unpinned.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-deps -r /tmp/requirements-matcher.txt \
 && /opt/venv/bin/pip check

# ---- tfs-api: TF Serving's API descriptors, written once so the runtime needs neither
# TensorFlow nor tensorflow-serving-api. The wheels are only read here (never imported), so
# --no-deps is enough; this stage is thrown away.
FROM python:3.11.14-slim-bookworm AS tfs-api
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-deps \
      protobuf==7.36.2 tensorflow==2.21.0 tensorflow-serving-api==2.21.0
WORKDIR /src
COPY matcher/ matcher/
RUN /opt/venv/bin/python -m matcher.backends.tfs_api /out/tfserving_api.binpb

# ---- runtime ----------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm
# A fixed uid/gid: the Deployment's runAsUser and fsGroup use the same numbers.
RUN groupadd --system --gid 10001 matcher \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin matcher
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MATCHER_HOST=0.0.0.0 \
    MATCHER_BACKEND=tfserving \
    MATCHER_TFSERVING_API_DESCRIPTORS=/app/tfserving_api.binpb
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# What `python -m service` imports: the transports (service/), the library (matcher/, with the
# generated matcher.v1 messages; its TensorFlow modules, the embedded backend and the backbones,
# are imported only when MATCHER_BACKEND=embedded) and the manifest checks (integrity/).
COPY matcher/ matcher/
COPY service/ service/
COPY integrity/ integrity/
COPY --from=tfs-api /out/tfserving_api.binpb /app/tfserving_api.binpb
# Bytecode compiled now: the root filesystem is read-only at run time.
RUN python -m compileall -q /app
USER 10001:10001
EXPOSE 50051 8080
ENTRYPOINT ["python", "-m", "service"]
