"""The matcher with the `tfserving` backend against the TF Serving test double.

The double (tests/tfserving_double.py) implements TF Serving's API with its own protos over the
exported SavedModel; production runs the real tensorflow/serving image.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from matcher.backends.tfserving import TFServingBackend, TFServingOptions
from matcher.errors import BackendUnavailableError, InvalidImageError, ModelLoadError
from matcher.factory import make_core
from matcher.v1 import matcher_pb2, matcher_pb2_grpc
from service.config import Settings
from service.server import RunningServer, start_server
from tests import samples
from tests.conftest import query_images
from tests.tfserving_double import TFServingDouble

ROOT = Path(__file__).resolve().parent.parent
MODEL = "efficientnet_lite0"
Health = health_pb2.HealthCheckResponse


@pytest.fixture(autouse=True)
def _clean_double(double: TFServingDouble) -> Iterator[None]:
    yield
    double.reset_faults()
    if not double.running:
        double.restart()


def backend_for(target: str, **options: object) -> TFServingBackend:
    return TFServingBackend(TFServingOptions(target=target, model_name=MODEL, **options))


def tfserving_settings(settings: Settings, target: str, **overrides: object) -> Settings:
    return settings.model_copy(
        update={
            "backend": "tfserving",
            "tfserving_target": target,
            "tfserving_timeout_s": 5.0,
            "health_check_interval_s": 0.1,
            **overrides,
        }
    )


async def serve(settings: Settings) -> tuple[RunningServer, asyncio.Task]:
    running = await start_server(settings, make_core(settings))
    await running.load_models()
    return running, asyncio.create_task(running.watch_backend(settings.health_check_interval_s))


@pytest.fixture(scope="module")
async def tfs_server(settings, double) -> AsyncIterator[RunningServer]:
    running, watcher = await serve(tfserving_settings(settings, double.target))
    yield running
    watcher.cancel()
    await running.stop(0)


@pytest.fixture(scope="module")
async def tfs_channel(tfs_server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"localhost:{tfs_server.port}") as channel:
        yield channel


async def test_same_ranked_labels_as_the_embedded_backend(tfs_channel, stub, demo) -> None:
    tfs_stub = matcher_pb2_grpc.MatcherStub(tfs_channel)
    for label, path in query_images(demo)[:: demo.query_views]:  # one query per label
        request = matcher_pb2.ImageRequest(image=path.read_bytes())
        via_tfs, embedded = await asyncio.gather(
            tfs_stub.Match(request, timeout=60), stub.Match(request, timeout=60)
        )
        assert [m.label for m in via_tfs.matches] == [m.label for m in embedded.matches]
        assert via_tfs.matches[0].label == label
        np.testing.assert_allclose(
            [m.score for m in via_tfs.matches], [m.score for m in embedded.matches], atol=1e-4
        )
        assert via_tfs.model.backbone == MODEL and via_tfs.model.model_version == 1


async def test_same_features_as_the_embedded_backend(tfs_channel, stub) -> None:
    tfs_stub = matcher_pb2_grpc.MatcherStub(tfs_channel)
    for image in samples.good_images().values():
        request = matcher_pb2.ImageRequest(image=image)
        via_tfs = await tfs_stub.Embed(request, timeout=60)
        embedded = await stub.Embed(request, timeout=60)
        # The embedded backend runs OpenVINO by default: the same network, its own kernels.
        np.testing.assert_allclose(via_tfs.features, embedded.features, atol=1e-4)


async def test_model_info_names_the_backend(tfs_channel) -> None:
    info = await matcher_pb2_grpc.MatcherStub(tfs_channel).GetModelInfo(
        matcher_pb2.GetModelInfoRequest(), timeout=30
    )
    assert (info.feature_backend, info.backbone, info.feature_dim) == ("tfserving", MODEL, 1280)


def test_features_are_read_from_float_val_and_from_tensor_content(exported_model, double):
    # Real TF Serving answers with float_val unless told otherwise; both encodings must work.
    images = list(samples.good_images().values())[:3]
    with TFServingDouble(
        exported_model.path.parent.parent, tensor_serialization="as_proto_content"
    ) as content_double:
        from_content = backend_for(content_double.target)
        from_content.load()
        from_fields = backend_for(double.target)
        from_fields.load()
        np.testing.assert_array_equal(from_content.features(images), from_fields.features(images))


def test_a_corrupt_image_is_an_image_error(double) -> None:
    backend = backend_for(double.target)
    backend.load()
    with pytest.raises(InvalidImageError, match="could not be decoded"):
        backend.features([samples.bad_images()["truncated_jpeg"]])


def test_unavailable_is_retried_with_backoff_and_nothing_else_is(double) -> None:
    backend = backend_for(double.target, max_attempts=3)
    backend.load()
    double.reset_counters()
    double.fail_next(2)  # UNAVAILABLE twice: the third attempt succeeds
    assert backend.features([samples.jpeg()]).shape == (1, 1280)
    assert len(double.batch_sizes) == 3
    double.reset_counters()
    double.fail_next(3)  # more failures than attempts: the caller hears UNAVAILABLE
    with pytest.raises(BackendUnavailableError):
        backend.features([samples.jpeg()])
    assert len(double.batch_sizes) == 3
    double.reset_faults()
    double.reset_counters()
    double.fail_next(1, grpc.StatusCode.INTERNAL)  # not retried
    with pytest.raises(ModelLoadError, match="INTERNAL"):
        backend.features([samples.jpeg()])
    assert len(double.batch_sizes) == 1


def test_a_slow_backend_hits_the_deadline(double) -> None:
    backend = backend_for(double.target, timeout_s=0.3)
    backend.load()
    # It would answer, far too late; it stops waiting as soon as the client has gone.
    double.predict_delay_s = 60.0
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="DEADLINE_EXCEEDED"):
        backend.features([samples.jpeg()])
    # Given up at the 0.3 s deadline, not after the double's answer (the deadline being honoured
    # is the behaviour under test): a 30 s bound is 100x the deadline, for a loaded 2-core CPU.
    assert time.monotonic() - started < double.predict_delay_s / 2


def test_calls_are_spread_over_every_replica(exported_model) -> None:
    base = exported_model.path.parent.parent
    with TFServingDouble(base) as first, TFServingDouble(base) as second:
        # A static address list stands in for what dns:/// resolves for a headless Service.
        backend = backend_for(f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}")
        backend.load()
        for _ in range(8):
            backend.features([samples.jpeg()])
        assert len(first.batch_sizes) >= 2 and len(second.batch_sizes) >= 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model_name": "nope"}, "NOT_FOUND"),
        ({"version": 7}, "NOT_FOUND"),
        ({"signature": "other"}, "has no signature 'other'"),
    ],
)
def test_a_model_that_does_not_fit_is_refused_at_start(double, options, message) -> None:
    settings = {"target": double.target, "model_name": MODEL, **options}
    with pytest.raises(ModelLoadError, match=message):
        TFServingBackend(TFServingOptions(**settings)).load()


def test_a_classifier_for_other_features_is_refused_at_start(settings, double, tmp_path):
    import joblib
    from sklearn.linear_model import LogisticRegression

    from matcher.classifier import file_sha256

    rng = np.random.default_rng(0)
    path = tmp_path / "other.joblib"
    joblib.dump(LogisticRegression().fit(rng.normal(size=(20, 2048)), [0, 1] * 10), path)
    core = make_core(
        tfserving_settings(
            settings, double.target, classifier=path, classifier_sha256=file_sha256(path)
        )
    )
    with pytest.raises(ModelLoadError, match="expects 2048 features but backbone"):
        core.load()


def test_the_process_refuses_a_mismatch_with_one_log_line(settings, double) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "--port",
            "0",
            "--backend",
            "tfserving",
            "--tfserving-target",
            double.target,
            "--model-name",
            "nope",
            "--classifier",
            str(settings.classifier),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "NOT_FOUND" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


async def health_of(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(), timeout=30)).status


async def wait_health(channel: grpc.aio.Channel, wanted: int, within_s: float = 60) -> float:
    """Seconds until the server reports `wanted`, told by health `Watch` as the status changes
    (not polled); `within_s` only fails a test that would otherwise hang."""
    started = time.monotonic()
    name = Health.ServingStatus.Name(wanted)
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(), timeout=within_s
    )
    try:
        async for answer in watch:
            if answer.status == wanted:
                return time.monotonic() - started
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
        raise AssertionError(f"health did not become {name} within {within_s} s") from exc
    finally:
        watch.cancel()
    raise AssertionError(f"the health watch ended before {name}")


async def test_health_follows_the_backend_through_loss_and_return(settings, exported_model):
    with TFServingDouble(exported_model.path.parent.parent) as own:
        # Deadlines far above the "fails fast" bound below, both the backend's and the caller's.
        config = tfserving_settings(settings, own.target, tfserving_timeout_s=30.0)
        running, watcher = await serve(config)
        try:
            async with grpc.aio.insecure_channel(f"localhost:{running.port}") as channel:
                stub = matcher_pb2_grpc.MatcherStub(channel)
                request = matcher_pb2.ImageRequest(image=samples.jpeg(), top_k=1)
                assert (await stub.Match(request, timeout=30)).matches
                own.stop()
                await wait_health(channel, Health.NOT_SERVING)
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Match(request, timeout=60)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "TF Serving" in caught.value.details()
                # Fails fast (the behaviour under test), not at the backend's 30 s deadline nor
                # the caller's 60 s: it takes well under a second; 10 s holds on a loaded CPU.
                assert time.monotonic() - started < 10
                own.restart()
                await wait_health(channel, Health.SERVING)
                assert (await stub.Match(request, timeout=30)).matches
        finally:
            watcher.cancel()
            await running.stop(0)


class LoggedRetries(logging.Handler):
    """The loader's "retrying in" warnings (service.server), as each is logged."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._loop = asyncio.get_running_loop()
        self._lines: asyncio.Queue[str] = asyncio.Queue()

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying in" in record.getMessage():
            self._loop.call_soon_threadsafe(self._lines.put_nowait, record.getMessage())

    async def wait(self, count: int) -> None:
        """Until `count` retries have been logged; 60 s only fail a hung test."""
        async with asyncio.timeout(60):
            for _ in range(count):
                await self._lines.get()


async def test_start_waits_for_an_unreachable_backend(settings, exported_model) -> None:
    with TFServingDouble(exported_model.path.parent.parent) as own:
        own.stop()  # TF Serving not up yet when the matcher starts
        config = tfserving_settings(settings, own.target)
        running = await start_server(config, make_core(config))
        retries = LoggedRetries()
        logging.getLogger("service.server").addHandler(retries)
        loader = asyncio.create_task(running.load_models(first_delay_s=0.1, max_delay_s=0.2))
        try:
            async with grpc.aio.insecure_channel(f"localhost:{running.port}") as channel:
                await retries.wait(2)  # the loader has failed twice and waits to try again
                assert await health_of(channel) == Health.NOT_SERVING
                assert not loader.done()
                own.restart()
                await asyncio.wait_for(loader, 60)  # only fails a hung start
                assert await health_of(channel) == Health.SERVING
        finally:
            logging.getLogger("service.server").removeHandler(retries)
            loader.cancel()
            await running.stop(0)


def test_the_backend_never_imports_tensorflow(double, tmp_path) -> None:
    descriptors = tmp_path / "tfserving_api.binpb"
    subprocess.run(
        [sys.executable, "-m", "matcher.backends.tfs_api", str(descriptors)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    program = f"""
import sys
from pathlib import Path
from matcher.backends.tfserving import TFServingBackend, TFServingOptions
backend = TFServingBackend(TFServingOptions(
    target={double.target!r}, model_name={MODEL!r}, descriptors=Path({str(descriptors)!r})))
backend.load()
features = backend.features([Path({str(ROOT / "deploy/ghz/chelsea.jpg")!r}).read_bytes()])
assert features.shape == (1, 1280), features.shape
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
print("heavy:", heavy)
"""
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "heavy: []"


def test_training_cuts_views_for_tf_serving_as_the_server_does(double) -> None:
    from matcher.views import FALLBACK_INPUT_SIDE, PLANS, TURNED, render
    from train.photo_views import photo_views

    # TF Serving's signature takes encoded strings: the backend cannot say its input side (0),
    # and the views are cut for the fallback, as the server's core cuts them; a side of 0 had
    # made every view of every photo "could not be decoded" (a division by zero in the draft).
    backend = backend_for(double.target)
    backend.load()
    assert backend.info.input_size == 0
    photo = samples.jpeg()
    plan = (PLANS["crops"][1], *TURNED)
    found = photo_views([photo], 1, plan, backend)
    expected = backend.features(render(photo, plan, FALLBACK_INPUT_SIDE))
    np.testing.assert_allclose(found[0], expected, atol=1e-6)
