# Matcher: the verbs. `make run` and `make test` work on a fresh clone; everything they need is
# built here, into .venv/, models/, data/ and cache/ (all ignored by git).

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

PORT ?= 50051
BACKBONE ?= efficientnet_lite0
WEIGHTS ?= imagenet
MODELS ?= models/backbones
MODEL_DIR := $(MODELS)/$(BACKBONE)
CLASSIFIER_DIR ?= models/classifiers/$(BACKBONE)
# The run folder is what is served, whichever matcher trained it (svm, knn, prototype); its
# manifest, written last, marks a finished training.
CLASSIFIER := $(CLASSIFIER_DIR)
TRAINED := $(CLASSIFIER_DIR)/manifest.json
MATCHER ?= auto
DEMO := data/demo
DATA ?= $(DEMO)/train
IMAGE ?= $(firstword $(wildcard $(DEMO)/queries/*/*))
TARGET ?= localhost:$(PORT)
TOP_K ?= 5

.PHONY: help setup proto export demo train report run serve match browser test check format bench fashion-data soak chaos clean

help:
	@echo "make run      set up, export $(BACKBONE), train the demo if needed, serve on :$(PORT)"
	@echo "make test     run the test suite"
	@echo "make export   BACKBONE=... WEIGHTS=imagenet|PATH|random"
	@echo "make train    DATA=folder-of-label-folders [MATCHER=auto|knn|prototype|linear|svm] (the run folder and its HTML report)"
	@echo "make report   [RUN=models/classifiers/$(BACKBONE)] [REPORT_IMAGE=photo.jpg]: redraw the report"
	@echo "make match    IMAGE=photo.jpg [TARGET=host:port] [TOP_K=5]"
	@echo "make serve    serve without building anything"
	@echo "make check    lint, format check, types (mypy), generated-code check, the import rule"
	@echo "make bench    (about 2 h on 2 cores) Fashion-MNIST (70,000 photos: accuracy per backbone, layer and matcher), index search (exact vs faiss), Ray against local extraction, extraction (loop, pipeline, ceiling; Inception v3 and Lite0, fp32 and bf16), engines (openvino vs tensorflow: network, pipeline, service), bf16 vs fp32, the service under load beside the model ceiling, peak memory under worst-case images (bench.memory), HTTP against gRPC, start-up, training time, matching quality per query kind, matcher and views (bench.quality)"
	@echo "make chaos    [CHAOS_S=600]: load while TF Serving restarts, training retrains, is killed and reloads; 0 lost"
	@echo "make soak     [SOAK_S=1200]: steady load for 20 minutes; errors and server memory over time (RSS growth <= 5 %)"

setup: $(INSTALLED)

# Reinstalls when the pins or the project change. pip reads only the package registry. The
# project itself goes in editable, for the console scripts (.venv/bin/matcher-serve, ...).
$(INSTALLED): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

proto: $(INSTALLED)
	$(PY) protos/generate.py

# A backbone is exported once; delete $(MODEL_DIR) or pass a new version to export again.
export: $(INSTALLED)
	$(PY) -m export --backbone $(BACKBONE) --weights $(WEIGHTS) --base-path $(MODELS) --if-missing

demo: $(INSTALLED)
	$(PY) -m train.demo --out $(DEMO)

train: export
	$(if $(filter $(DEMO)/train,$(DATA)),$(MAKE) demo)
	$(PY) -m train $(DATA) --out $(CLASSIFIER_DIR) --model-dir $(MODEL_DIR) --matcher $(MATCHER)

RUN ?= $(CLASSIFIER_DIR)
report: $(INSTALLED)
	$(PY) -m train.visual_report $(RUN) $(if $(REPORT_IMAGE),--image $(REPORT_IMAGE))

# The demo classifier is trained only when none exists for this backbone.
$(TRAINED):
	$(MAKE) train DATA=$(DEMO)/train

run: export
	$(MAKE) $(TRAINED)
	$(MAKE) serve

serve: $(INSTALLED)
	$(PY) -m service --port $(PORT) --model-dir $(MODEL_DIR) --classifier $(CLASSIFIER)

match: $(INSTALLED)
	$(PY) -m service.client $(IMAGE) --target $(TARGET) --top-k $(TOP_K)

# The page's browser test drives Debian's chromium (no browser download works here), and the
# README's HTTP examples run with curl: installed with apt when missing and we are root,
# otherwise one line says what to do.
browser:
	@{ command -v chromium && command -v curl; } >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing Debian's chromium and curl for the page and README tests"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium curl >/dev/null; \
		else \
			echo "make test needs Debian's chromium and curl (tests/test_web_page.py, the README's curl examples): sudo apt-get install chromium curl"; \
			exit 1; \
		fi; }

test: $(INSTALLED) browser
	$(PY) -m pytest -q

check: $(INSTALLED)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q tests/test_proto_generated.py tests/test_import_graph.py

format: $(INSTALLED)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Figures, printed and written to build/bench-*.json (see each script's docstring).
# Speed does not depend on weight values: Inception v3 is timed with random weights (its
# ImageNet weights cannot be downloaded here). Figures go to build/bench-*.json.
BENCH_MODELS := build/bench-models
bench: export demo
	$(MAKE) $(TRAINED)
	mkdir -p build
	$(PY) -m export --backbone inception_v3 --weights random --base-path $(BENCH_MODELS)/fp32 --if-missing
	$(PY) -m export --backbone inception_v3 --weights random --precision bf16 \
		--base-path $(BENCH_MODELS)/bf16 --if-missing
	$(PY) -m export --backbone efficientnet_lite0 --precision bf16 --base-path $(BENCH_MODELS)/bf16 --if-missing
	$(PY) -m bench.pipeline --images $(DEMO)/train --json build/bench-pipeline.json \
		--model-dir $(BENCH_MODELS)/fp32/inception_v3 --model-dir $(BENCH_MODELS)/bf16/inception_v3 \
		--model-dir $(MODEL_DIR) --model-dir $(BENCH_MODELS)/bf16/efficientnet_lite0
	$(PY) -m bench.engines --model-dir $(MODEL_DIR) --classifier $(CLASSIFIER) \
		--model-dir $(BENCH_MODELS)/fp32/inception_v3 --json build/bench-engines.json
	$(PY) -m bench.precision --json build/bench-precision.json
	$(PY) -m bench.openvino_bf16 --model-dir $(MODEL_DIR) --json build/bench-openvino-bf16.json || [ $$? -eq 2 ]  # 2: no bf16 CPU
	$(PY) -m bench.no_match --model-dir $(MODEL_DIR) --json build/bench-no-match.json
	$(PY) -m bench.quality --model-dir $(MODEL_DIR) --engine-agreement --json build/bench-quality.json
	$(PY) -m bench.phone_photos --json build/bench-phone-photos.json
	$(PY) -m bench.service --model-dir $(MODEL_DIR) --classifier $(CLASSIFIER) --json build/bench-service.json
	$(PY) -m bench.http --model-dir $(MODEL_DIR) --classifier $(CLASSIFIER) --json build/bench-http.json
	$(PY) -m bench.startup --model-base-path $(MODELS) --model-name $(BACKBONE) --classifier $(CLASSIFIER) \
		--image deploy/ghz/chelsea.jpg --json build/bench-startup.json
	$(PY) -m bench.training --json build/bench-training.json
	$(PY) -m bench.memory --model-base-path $(MODELS) --model-name $(BACKBONE) --classifier $(CLASSIFIER) \
		--json build/bench-memory.json
	$(PY) -m bench.index_search --json build/bench-index-search.json
	$(PY) -m bench.ray_scale --model-dir $(MODEL_DIR) --json build/bench-ray-scale.json
	$(MAKE) fashion-data
	$(PY) -m bench.fashion --model-dir $(MODEL_DIR) --json build/bench-fashion.json

# Fashion-MNIST (bench.fashion): Debian's package, installed with apt when missing and root.
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
fashion-data:
	@test -f $(FASHION) || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing Debian's dataset-fashion-mnist for bench.fashion"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
		else \
			echo "bench.fashion needs Debian's dataset-fashion-mnist: sudo apt-get install dataset-fashion-mnist"; \
			exit 1; \
		fi; }

# Steady load on a matcher process; fails on any error or on RSS growth above 5 % after warm-up.
SOAK_S ?= 1200
soak: export demo
	$(MAKE) $(TRAINED)
	mkdir -p build
	$(PY) -m bench.soak --model-dir $(MODEL_DIR) --classifier $(CLASSIFIER) \
		--image deploy/ghz/chelsea.jpg --duration-s $(SOAK_S) --json build/bench-soak.json

CHAOS_S ?= 600
chaos: export demo
	mkdir -p build
	$(PY) -m bench.chaos --model-base-path $(MODELS) --model-name $(BACKBONE) \
		--duration-s $(CHAOS_S) --json build/bench-chaos.json

clean:
	rm -rf models data cache
