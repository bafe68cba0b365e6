"""Shared fixtures, layered: exported SavedModel -> demo catalogue -> trained classifier ->
running server -> channel -> stubs. Everything is real and built once per test session."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

from matcher.v1 import matcher_pb2_grpc

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Every server the suite starts, in this process or as a child, serves HTTP on a free port:
# the default 8080 may be taken on a shared machine, and servers run side by side here.
os.environ["MATCHER_HTTP_PORT"] = "0"

#: Small enough for a 2-core CI machine, large enough for every label to be learnt.
TRAIN_VIEWS = 16
QUERY_VIEWS = 4


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory: pytest.TempPathFactory):
    """EfficientNet-Lite0 with its genuine ImageNet weights, exported as a SavedModel."""
    from export.savedmodel import export_backbone
    from matcher.backbones.builder import build_backbone

    base = tmp_path_factory.mktemp("backbones")
    return export_backbone(build_backbone("efficientnet_lite0", "imagenet"), base)


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory):
    from train.demo import build_demo_catalogue

    out = tmp_path_factory.mktemp("demo")
    return build_demo_catalogue(out, TRAIN_VIEWS, QUERY_VIEWS, seed=0, progress=False)


@pytest.fixture(scope="session")
def embedded_backend(exported_model):
    from matcher.backends.embedded import EmbeddedBackend

    backend = EmbeddedBackend(exported_model.path.parent)
    backend.load()
    return backend


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature cache for the session's trainings of the demo: keyed by model and content,
    so a second training of the same photos (another matcher) reads what the first computed."""
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, demo, embedded_backend, feature_cache):
    """The demo classifier trained through the embedded backend, as `make run` does, but
    with the original's SVM: the lifecycle tests swap its classifier file (knn and prototype
    runs are trained and served by tests/test_matchers.py)."""
    from train.pipeline import TrainConfig, train

    root = tmp_path_factory.mktemp("trained")
    config = TrainConfig(
        data=demo.out / "train",
        out=root / "classifier",
        cache_dir=feature_cache,
        folds=5,
        progress=False,
        matcher="svm",
    )
    return train(config, embedded_backend)


@pytest.fixture(scope="module")
def double(exported_model):
    """The TF Serving test double serving the exported model's base path, for one module."""
    from tests.tfserving_double import TFServingDouble

    with TFServingDouble(exported_model.path.parent.parent) as double:
        yield double


@pytest.fixture(scope="session")
def settings(exported_model, trained):
    from service.config import Settings

    return Settings(
        port=0,
        model_dir=exported_model.path.parent,
        classifier=trained.classifier_path,
        grace_s=0.5,
        metrics_port=0,  # a free port: the default 9464 may be taken on a shared machine
        http_port=0,
        # One view per photo keeps the suite's hundreds of calls quick on 2 cores; the default
        # (crops) and every other mode are asked for by name in tests/test_multiview.py.
        views="whole",
    )


@pytest.fixture(scope="session")
async def server(settings) -> AsyncIterator:
    """The real gRPC server on a free port, models loaded."""
    from matcher.factory import make_core
    from service.server import start_server

    running = await start_server(settings, make_core(settings))
    await running.load_models()
    yield running
    await running.stop(0)


@pytest.fixture(scope="session")
def target(server) -> str:
    return f"localhost:{server.port}"


@pytest.fixture(scope="session")
async def channel(target) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield channel


@pytest.fixture(scope="session")
def stub(channel) -> matcher_pb2_grpc.MatcherStub:
    return matcher_pb2_grpc.MatcherStub(channel)


@pytest.fixture(scope="session")
def health_stub(channel) -> health_pb2_grpc.HealthStub:
    return health_pb2_grpc.HealthStub(channel)


def query_images(demo) -> list[tuple[str, Path]]:
    """(label, path) of every held-out demo query view of a catalogue item."""
    root = demo.out / "queries"
    return [
        (p.parent.name, p)
        for p in sorted(root.glob("*/*"))
        if p.is_file() and not p.parent.name.startswith("_")
    ]


def copy_small_catalogue(demo, root: Path, items: int = 3, photos: int = 4) -> Path:
    """The first `items` demo items with their first `photos` training photos each, copied to
    `root`: a catalogue quick enough to train many times in a test."""
    import shutil

    for label in sorted(p for p in (demo.out / "train").iterdir() if p.is_dir())[:items]:
        (root / label.name).mkdir(parents=True)
        for photo in sorted(label.iterdir())[:photos]:
            shutil.copy(photo, root / label.name / photo.name)
    return root


def outside_queries(demo) -> list[Path]:
    """The demo's query photos of things outside the catalogue (never seen in training)."""
    return sorted((demo.out / "queries" / "_outside").iterdir())
