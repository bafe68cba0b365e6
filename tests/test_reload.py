"""Hot reload through a real server: new classifier files and SavedModel versions are swapped in
under load with no failed request; tampered files are refused, logged and counted."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import joblib
import pytest

from integrity.manifest import write_manifest
from matcher.v1 import matcher_pb2, matcher_pb2_grpc
from tests.conftest import query_images

if TYPE_CHECKING:
    from matcher.reload import ModelWatcher, ReloadOutcome

RELOADS = 10


@pytest.fixture
def model_copies(tmp_path: Path, exported_model, trained) -> tuple[Path, Path]:
    """Private copies of the SavedModel base path and the classifier folder, to change."""
    models = tmp_path / "models"
    shutil.copytree(exported_model.path.parent, models)
    classifiers = tmp_path / "classifier"
    shutil.copytree(trained.classifier_path.parent, classifiers)
    return models, classifiers / trained.classifier_path.name


def new_classifier_file(path: Path, generation: int, source: Path) -> None:
    """The estimator of `source` in other bytes (another sha256), put in place as `train` does."""
    from matcher.classifier import Classifier

    estimator = Classifier.load(source)._estimator
    estimator.reload_generation_ = generation  # changes the bytes, not the answers
    staging = path.with_name(f".staging{path.suffix}")
    if path.suffix == ".skops":
        import skops.io

        skops.io.dump(estimator, staging)
    else:
        joblib.dump(estimator, staging)
    os.replace(staging, path)
    write_manifest(path.parent)


def new_backbone_version(models: Path, version: int) -> None:
    """A copy of version 1 renamed into place as version N, as `export` does."""
    staging = models / f".staging-{version}"
    shutil.copytree(models / "1", staging)
    os.rename(staging, models / str(version))


async def start(settings):
    from matcher.factory import make_core
    from service.server import start_server

    running = await start_server(settings, make_core(settings))
    await running.load_models()
    return running


def reload_settings(settings, models: Path, classifier: Path, interval_s: float):
    return settings.model_copy(
        update={"model_dir": models, "classifier": classifier, "reload_interval_s": interval_s}
    )


async def identity(stub: matcher_pb2_grpc.MatcherStub) -> tuple[int, str]:
    info = await stub.GetModelInfo(matcher_pb2.GetModelInfoRequest(), timeout=10)
    return info.model.model_version, info.model.classifier_sha256


class Swaps:
    """Each swap the timer-driven watcher makes, as it makes it: a spy on `check_once` (which
    `ModelWatcher.run` calls for each tick), so that a test waits for the swap itself rather
    than polling what the server answers."""

    def __init__(self, watcher: ModelWatcher, monkeypatch: pytest.MonkeyPatch) -> None:
        self._outcomes: asyncio.Queue[ReloadOutcome] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        check_once = watcher.check_once

        def spied() -> ReloadOutcome:  # on the poll's worker thread
            outcome = check_once()
            if outcome.swapped or outcome.refused:
                loop.call_soon_threadsafe(self._outcomes.put_nowait, outcome)
            return outcome

        monkeypatch.setattr(watcher, "check_once", spied)

    async def next(self) -> ReloadOutcome:
        """The next poll that swapped or refused something; 120 s only fail a hung test."""
        async with asyncio.timeout(120):
            return await self._outcomes.get()


class Answers:
    """How many answers named each pair, with a Condition to wait for a count."""

    def __init__(self) -> None:
        self.by_pair: Counter[tuple[int, str]] = Counter()
        self._changed = asyncio.Condition()

    async def add(self, pair: tuple[int, str]) -> None:
        async with self._changed:
            self.by_pair[pair] += 1
            self._changed.notify_all()

    async def wait_for(self, pair: tuple[int, str], count: int) -> None:
        """Until `count` answers named `pair`; 120 s only fail a hung test."""
        async with asyncio.timeout(120), self._changed:
            await self._changed.wait_for(lambda: self.by_pair[pair] >= count)


#: Answers the clients must have had from each pair before the next change is made.
ANSWERS_PER_PAIR = 5


async def test_ten_reloads_under_load_fail_no_request(
    settings, model_copies, demo, trained, monkeypatch: pytest.MonkeyPatch
):
    models, classifier = model_copies
    running = await start(reload_settings(settings, models, classifier, interval_s=0.1))
    swaps = Swaps(running.watcher, monkeypatch)
    lifecycle = asyncio.create_task(running.watcher.run(running.reload_interval_s))
    images = [path.read_bytes() for _, path in query_images(demo)[:8]]
    outcomes: Counter[str] = Counter()
    answers = Answers()
    stop = asyncio.Event()

    async def client(stub: matcher_pb2_grpc.MatcherStub, worker: int) -> None:
        i = worker
        while not stop.is_set():
            try:
                response = await stub.Match(
                    matcher_pb2.ImageRequest(image=images[i % len(images)], top_k=3), timeout=30
                )
                outcomes["OK"] += 1
                await answers.add((response.model.model_version, response.model.classifier_sha256))
            except grpc.aio.AioRpcError as exc:
                outcomes[exc.code().name] += 1
            i += 1

    try:
        async with grpc.aio.insecure_channel(f"localhost:{running.port}") as channel:
            stub = matcher_pb2_grpc.MatcherStub(channel)
            workers = [asyncio.create_task(client(stub, w)) for w in range(4)]
            served = [await identity(stub)]
            await answers.wait_for(served[-1], ANSWERS_PER_PAIR)
            for n in range(RELOADS):
                if n % 2 == 0:
                    new_backbone_version(models, version=2 + n // 2)
                    changed = "backbone"
                else:
                    new_classifier_file(classifier, generation=n, source=trained.classifier_path)
                    changed = "classifier"
                outcome = await swaps.next()
                assert (outcome.swapped, outcome.refused) == ([changed], {}), outcome
                served.append(await identity(stub))
                # Every pair serves requests under load, the last one too.
                await answers.wait_for(served[-1], ANSWERS_PER_PAIR)
            stop.set()
            await asyncio.gather(*workers)
    finally:
        lifecycle.cancel()
        await running.stop(0)

    print(f"\n{RELOADS} reloads under load: {dict(outcomes)}; pairs served {len(served)}")
    assert set(outcomes) == {"OK"}, outcomes
    assert outcomes["OK"] > 50
    assert len(set(served)) == RELOADS + 1
    assert served[-1][0] == 1 + RELOADS // 2  # the newest backbone version
    # Every answer named a pair that was really served.
    assert set(answers.by_pair) == set(served)


def reload_failures() -> float:
    """matcher_reload_failures_total over both models, from the process's registry."""
    from prometheus_client import REGISTRY

    return sum(
        REGISTRY.get_sample_value("matcher_reload_failures_total", {"model": model}) or 0.0
        for model in ("backbone", "classifier")
    )


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


async def test_tampered_files_are_refused_logged_counted_and_old_models_keep_serving(
    settings, model_copies, demo, trained, caplog: pytest.LogCaptureFixture
):
    models, classifier = model_copies
    # Polled by hand below (twice: a change must settle), not by the timer.
    running = await start(reload_settings(settings, models, classifier, interval_s=3600))
    watcher = running.watcher
    before = running.core.identity()
    failures_before = reload_failures()
    image = query_images(demo)[0][1].read_bytes()
    try:
        # A classifier replaced without a matching manifest.
        new_classifier_file(classifier, generation=100, source=trained.classifier_path)
        flip_byte(classifier)
        # A new backbone version with one variables byte changed after export.
        new_backbone_version(models, version=2)
        flip_byte(next((models / "2" / "variables").glob("*.data-*")))
        with caplog.at_level(logging.WARNING, logger="matcher.reload"):
            assert watcher.check_once().refused == {}  # first sight: not settled yet
            outcome = await asyncio.to_thread(watcher.check_once)
        assert set(outcome.refused) == {"backbone", "classifier"}
        assert "sha256" in outcome.refused["classifier"]
        assert running.core.identity() == before
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 2
        assert reload_failures() - failures_before == 2
        # Not tried again until the files change.
        assert watcher.check_once().refused == {}

        async with grpc.aio.insecure_channel(f"localhost:{running.port}") as channel:
            stub = matcher_pb2_grpc.MatcherStub(channel)
            response = await stub.Match(matcher_pb2.ImageRequest(image=image), timeout=30)
            assert response.model.classifier_sha256 == before.classifier_sha256
            assert response.model.model_version == before.model_version

        # Mended files are picked up.
        new_classifier_file(classifier, generation=101, source=trained.classifier_path)
        watcher.check_once()
        outcome = await asyncio.to_thread(watcher.check_once)
        assert outcome.swapped == ["classifier"]
        assert running.core.identity().classifier_sha256 != before.classifier_sha256
    finally:
        await running.stop(0)


async def test_a_load_failing_unexpectedly_is_refused_once_and_counted(
    settings, model_copies, monkeypatch: pytest.MonkeyPatch
):
    models, classifier = model_copies
    running = await start(reload_settings(settings, models, classifier, interval_s=3600))
    backend = running.core.backend
    calls = []

    def broken_prepare():
        calls.append(1)
        raise RuntimeError("an error no one foresaw")

    failures_before = reload_failures()
    try:
        new_backbone_version(models, version=2)
        monkeypatch.setattr(backend, "prepare", broken_prepare)
        running.watcher.check_once()
        outcome = running.watcher.check_once()
        assert outcome.refused == {"backbone": "RuntimeError: an error no one foresaw"}
        assert running.watcher.check_once().refused == {}  # not loaded again every poll
        assert len(calls) == 1
        assert reload_failures() - failures_before == 1
        assert running.core.identity().model_version == 1
    finally:
        await running.stop(0)


def backend_channel_ready(running) -> Callable[[float], None]:
    """Blocks until the `tfserving` backend's channel is connected (or its timeout passes);
    gRPC signals each connectivity change, so this waits for the connection, not a time."""
    return grpc.channel_ready_future(running.core.backend._channel).result


async def test_the_tfserving_backend_follows_a_new_version(
    settings, tmp_path: Path, exported_model, demo
):
    from tests.tfserving_double import TFServingDouble

    base = tmp_path / "serving"
    shutil.copytree(exported_model.path.parent, base / "efficientnet_lite0")
    image = query_images(demo)[0][1].read_bytes()
    request = matcher_pb2.ImageRequest(image=image, top_k=1)
    with TFServingDouble(base, version_policy="latest") as first:
        port = first.port
        config = settings.model_copy(
            update={
                "backend": "tfserving",
                "tfserving_target": first.target,
                "model_name": "efficientnet_lite0",
                "reload_interval_s": 3600,
            }
        )
        running = await start(config)
    try:
        async with grpc.aio.insecure_channel(f"localhost:{running.port}") as channel:
            stub = matcher_pb2_grpc.MatcherStub(channel)
            # TF Serving restarted with version 2 only (its `latest` policy).
            new_backbone_version(base / "efficientnet_lite0", version=2)
            with TFServingDouble(base, version_policy="latest", port=port) as second:
                # The matcher's channel to TF Serving reconnects on its own; wait until it
                # has (the 60 s only fail a hung test), so that what follows reaches TF Serving.
                await asyncio.to_thread(backend_channel_ready(running), 60)
                # The matcher asks for the version it describes, which is gone: UNAVAILABLE
                # (never an answer named after one version and computed by another).
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Match(request, timeout=30)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert second.predict_calls >= 1, "the refusal did not come from TF Serving"
                # Two polls, as the timer would make them: version 2 seen, then settled.
                assert (await asyncio.to_thread(running.watcher.check_once)).swapped == []
                swapped = (await asyncio.to_thread(running.watcher.check_once)).swapped
                assert swapped == ["backbone"]
                response = await stub.Match(request, timeout=30)
                assert response.model.model_version == 2
                assert response.matches[0].label == query_images(demo)[0][0]
    finally:
        await running.stop(0)
