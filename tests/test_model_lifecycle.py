"""The model lifecycle on real files and real servers: a second real backbone (EfficientNet-
Lite1, ImageNet weights) swapped in with its own classifier under load; a classifier of the
same feature size from the other backbone refused; a pinned version kept at start and at
reload; SIGHUP; SIGTERM with calls in flight and while the models are still loading."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from matcher.classifier import Classifier
from matcher.core import check_fit, request_pixels
from matcher.errors import ModelLoadError
from matcher.images import ImageLimits, inspect_image
from matcher.v1 import matcher_pb2, matcher_pb2_grpc
from tests import samples
from tests.conftest import copy_small_catalogue
from tests.test_lifecycle import service_process, until_serving, wait_for_port


@pytest.fixture(scope="module")
def small_catalogue(demo, tmp_path_factory) -> Path:
    """Three items of four photos each: quick to train again and again."""
    return copy_small_catalogue(demo, tmp_path_factory.mktemp("lifecycle") / "data")


@pytest.fixture(scope="module")
def lite1(tmp_path_factory):
    """A second real backbone: EfficientNet-Lite1 with its ImageNet weights (also 1280
    features), exported as the first is, and its embedded backend."""
    from export.savedmodel import export_backbone
    from matcher.backbones.builder import build_backbone
    from matcher.backends.embedded import EmbeddedBackend

    exported = export_backbone(
        build_backbone("efficientnet_lite1", "imagenet"), tmp_path_factory.mktemp("lite1")
    )
    backend = EmbeddedBackend(exported.path.parent)
    backend.load()
    return exported, backend


def _train(data: Path, out: Path, backend, cache: Path):
    from train.pipeline import TrainConfig, train

    config = TrainConfig(
        data=data, out=out, cache_dir=cache, progress=False, matcher="knn", turned_views=False
    )
    return train(config, backend)


def test_a_classifier_of_the_other_backbone_is_refused_though_its_size_fits(
    small_catalogue, lite1, embedded_backend, tmp_path
) -> None:
    _, lite1_backend = lite1
    run = _train(small_catalogue, tmp_path / "lite1-run", lite1_backend, tmp_path / "cache")
    classifier = Classifier.load(run.classifier_path)
    assert classifier.info.feature_dim == embedded_backend.info.feature_dim == 1280
    with pytest.raises(ModelLoadError, match="trained on efficientnet_lite1 features but the "
                       "backend serves efficientnet_lite0"):  # fmt: skip
        check_fit(embedded_backend.info, classifier)


async def test_a_new_backbone_and_its_classifier_swap_in_together_under_load(
    settings, exported_model, small_catalogue, lite1, embedded_backend, tmp_path
) -> None:
    from matcher.factory import make_core
    from service.server import start_server

    lite1_model, lite1_backend = lite1
    models = tmp_path / "models"
    shutil.copytree(exported_model.path, models / "1")
    out = tmp_path / "classifier"
    first = _train(small_catalogue, out, embedded_backend, tmp_path / "cache")
    served = settings.model_copy(
        update={"model_dir": models, "classifier": out, "reload_interval_s": 3600}
    )
    running = await start_server(served, make_core(served))
    await running.load_models()
    photo = next(p for p in sorted(small_catalogue.rglob("*")) if p.is_file()).read_bytes()
    answered: Counter[tuple[str, int, str]] = Counter()
    failures: list[str] = []
    stop = asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(f"localhost:{running.port}") as channel:
            stub = matcher_pb2_grpc.MatcherStub(channel)

            async def client() -> None:
                while not stop.is_set():
                    try:
                        reply = await stub.Match(matcher_pb2.ImageRequest(image=photo), timeout=60)
                    except grpc.aio.AioRpcError as exc:
                        failures.append(f"{exc.code().name}: {exc.details()}")
                        continue
                    model = reply.model
                    answered[(model.backbone, model.model_version, model.classifier_sha256)] += 1

            clients = [asyncio.create_task(client()) for _ in range(4)]
            # The new backbone appears as version 2 (renamed into place, as export does), and
            # its classifier is published over the served name, as train does.
            staging = models / ".staging"
            shutil.copytree(lite1_model.path, staging)
            os.rename(staging, models / "2")
            second = await asyncio.to_thread(
                _train, small_catalogue, out, lite1_backend, tmp_path / "cache"
            )
            watcher = running.watcher
            assert watcher is not None
            outcomes = [await asyncio.to_thread(watcher.check_once) for _ in range(2)]
            assert sorted(outcomes[-1].swapped) == ["backbone", "classifier"], outcomes
            new = ("efficientnet_lite1", 2, second.report["classifier"]["sha256"])
            while answered[new] < 5:  # answers from the new pair, under the same load
                await asyncio.sleep(0)
                if all(task.done() for task in clients):
                    break
            stop.set()
            await asyncio.gather(*clients)
            embedded = await stub.Embed(matcher_pb2.ImageRequest(image=photo), timeout=60)
    finally:
        await running.stop(0)
    assert failures == []
    old = ("efficientnet_lite0", 1, first.report["classifier"]["sha256"])
    assert set(answered) == {old, new}, answered
    # The features are Lite1's own, not Lite0's under a new name.
    expected = lite1_backend.features([photo])[0]
    assert np.allclose(np.asarray(embedded.features), expected, atol=1e-4)
    assert not np.allclose(expected, embedded_backend.features([photo])[0], atol=1e-2)


class ServerLog:
    """A server process's log lines, read by a thread (so the pipe never fills), awaited by
    pattern."""

    def __init__(self, process: subprocess.Popen[str], seen: list[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen = list(seen)
        threading.Thread(target=self._read, args=(process,), daemon=True).start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self.lines.put(line)
        self.lines.put("")  # the end

    async def wait_for(self, pattern: str, within_s: float = 120) -> str:
        """The next line matching `pattern`; `within_s` only fails a server that never logs it."""
        while True:
            line = await asyncio.to_thread(self.lines.get, True, within_s)
            self.seen.append(line)
            assert line, f"server exited before logging {pattern!r}: {self.seen[-20:]}"
            if re.search(pattern, line):
                return line


async def _start(*flags: str) -> tuple[subprocess.Popen[str], int, ServerLog]:
    process = service_process("--port", "0", *flags)
    port, lines = await wait_for_port(process)
    return process, port, ServerLog(process, lines)


async def _model(stub: matcher_pb2_grpc.MatcherStub) -> tuple[str, int, str]:
    reply = await stub.Match(matcher_pb2.ImageRequest(image=samples.jpeg()), timeout=60)
    return reply.model.backbone, reply.model.model_version, reply.model.classifier_sha256


def _fewer_photos(catalogue: Path, out: Path) -> Path:
    """The catalogue less one photo per item: another index, so another classifier."""
    for label in catalogue.iterdir():
        (out / label.name).mkdir(parents=True)
        for photo in sorted(label.iterdir())[1:]:
            shutil.copy(photo, out / label.name / photo.name)
    return out


async def test_a_pinned_version_is_served_at_start_and_kept_on_sighup(
    exported_model, small_catalogue, embedded_backend, tmp_path
) -> None:
    models = tmp_path / "models"
    shutil.copytree(exported_model.path, models / "1")
    shutil.copytree(exported_model.path, models / "2")
    out = tmp_path / "classifier"
    _train(small_catalogue, out, embedded_backend, tmp_path / "cache")
    common = ("--model-dir", str(models), "--classifier", str(out), "--reload-interval-s", "3600")
    pinned, port, log = await _start(*common, "--model-version", "1", "--views", "whole")
    latest, latest_port, _ = await _start(*common, "--views", "whole")
    try:
        async with (
            grpc.aio.insecure_channel(f"localhost:{port}") as channel,
            grpc.aio.insecure_channel(f"localhost:{latest_port}") as latest_channel,
        ):
            await until_serving(channel)
            await until_serving(latest_channel)
            stub = matcher_pb2_grpc.MatcherStub(channel)
            assert (await _model(stub))[1] == 1
            assert (await _model(matcher_pb2_grpc.MatcherStub(latest_channel)))[1] == 2
            # A version 3 and a new classifier appear. SIGHUP asks for a poll at once; a change
            # is acted on when it looks the same on two polls in a row.
            shutil.copytree(exported_model.path, models / "3")
            smaller = _fewer_photos(small_catalogue, tmp_path / "smaller")
            second = _train(smaller, out, embedded_backend, tmp_path / "cache")
            pinned.send_signal(signal.SIGHUP)
            seen = await log.wait_for(r"hot reload: the \w+ changed")
            assert "classifier" in seen  # not the backbone: version 3 is not for it
            pinned.send_signal(signal.SIGHUP)
            line = await log.wait_for(r"hot reload: now serving")
            assert "version 1 " in line and "(swapped classifier)" in line, line
            assert await _model(stub) == (
                "efficientnet_lite0",
                1,
                second.report["classifier"]["sha256"],
            )
    finally:
        for process in (pinned, latest):
            process.kill()
            process.wait(30)


def _big_png(width: int, height: int) -> bytes:
    """A photo-like PNG of `width` x `height`: slow to match, quick to send."""

    return samples.encode(samples.photo().resize((width, height)), "PNG", compress_level=1)


async def test_sigterm_lets_calls_in_flight_finish_and_turns_new_ones_away(settings) -> None:
    # Calls that take seconds each (crops of a 15-megapixel PNG), so that they are in flight;
    # two of them fit the default decode budget (100 megapixels: each holds ~38, its decode
    # beside its keypoints' and its views), the other two wait behind them.
    big = _big_png(4800, 3200)
    one = request_pixels(inspect_image(big, ImageLimits()), "crops", 224, keypoints=True)
    assert 2 * one <= 100e6 < 3 * one
    process, port, log = await _start(
        "--model-dir", str(settings.model_dir), "--classifier", str(settings.classifier),
        "--grace-s", "120", "--views", "crops",
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
            await until_serving(channel)
            stub = matcher_pb2_grpc.MatcherStub(channel)

            async def call() -> matcher_pb2.MatchResponse:
                return await stub.Match(matcher_pb2.ImageRequest(image=big), timeout=300)

            calls = [asyncio.create_task(call()) for _ in range(4)]
            metrics = re.search(r"metrics on http://\S+:(\d+)", "".join(log.seen)) or re.search(
                r"metrics on http://\S+:(\d+)", await log.wait_for(r"metrics on")
            )
            assert metrics
            # The decode budget holds two calls: they are decoding.
            await _until_gauge(int(metrics[1]), "matcher_decode_pixels_in_flight", 2 * one)
            process.send_signal(signal.SIGTERM)
            await log.wait_for(r"shutting down")
            # Calls that still got in are answered; from the stop on, UNAVAILABLE.
            while True:
                try:
                    await stub.Match(matcher_pb2.ImageRequest(image=samples.jpeg()), timeout=60)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    break
            replies = await asyncio.gather(*calls)
        assert all(reply.matches for reply in replies)
        assert await asyncio.to_thread(process.wait, 120) == 0
    finally:
        process.kill()


async def _until_gauge(port: int, name: str, value: float, within_s: float = 120) -> None:
    """Until the server's /metrics shows `name` at `value` or more (read as the server
    changes it; `within_s` only fails a server that never gets there)."""
    import urllib.request

    def read() -> float:
        with urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        return float(found[1]) if found else 0.0

    async with asyncio.timeout(within_s):
        while await asyncio.to_thread(read) < value:
            await asyncio.sleep(0.05)  # scrape again: /metrics has no change notification


async def test_sigterm_while_the_models_are_loading_stops_at_once(settings) -> None:
    # A TF Serving that never answers: the server stays in loading, retrying it.
    unreachable = "localhost:9"  # the discard port: nothing serves gRPC there
    process, _, log = await _start(
        "--backend", "tfserving", "--tfserving-target", unreachable,
        "--classifier", str(settings.classifier), "--grace-s", "5",
    )  # fmt: skip
    try:
        await log.wait_for(r"retrying in")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 60) == 0
        rest = "".join(log.seen) + "".join(iter(lambda: log.lines.get(timeout=10), ""))
        assert "shutting down" in rest and "Traceback" not in rest, rest
    finally:
        process.kill()
