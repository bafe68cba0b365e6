"""Backend faults and overload: the matcher on the `tfserving` backend against the TF Serving
test double, real gRPC on both sides.

TF Serving stopped in the middle of a load, TF Serving slower than the callers' deadlines, and
more callers than the server admits. Speeds are printed (`pytest -s`), never asserted: the
assertions are about status codes, health, what reaches the backend and what waits in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest

from matcher.v1 import matcher_pb2, matcher_pb2_grpc
from service.config import Settings
from service.server import RunningServer
from tests import samples
from tests.test_tfserving_backend import Health, health_of, serve, tfserving_settings, wait_health
from tests.tfserving_double import TFServingDouble

OK = grpc.StatusCode.OK
#: Long enough that a held Predict is still held when the test looks; lowered to release it.
HELD_S = 60.0


@dataclass(frozen=True)
class Outcome:
    """What one Match call came to."""

    code: grpc.StatusCode
    details: str
    started: float
    ended: float
    deadline_s: float

    @property
    def elapsed(self) -> float:
        return self.ended - self.started


@pytest.fixture(autouse=True)
def _clean_double(double: TFServingDouble) -> Iterator[None]:
    double.reset_faults()
    double.reset_counters()
    yield
    double.reset_faults()
    if not double.running:
        double.restart()


@contextlib.asynccontextmanager
async def matcher(settings: Settings) -> AsyncIterator[tuple[RunningServer, grpc.aio.Channel]]:
    """A matcher server with its backend watcher, and a channel to it."""
    running, watcher = await serve(settings)
    try:
        async with grpc.aio.insecure_channel(f"localhost:{running.port}") as channel:
            yield running, channel
    finally:
        watcher.cancel()
        await running.stop(0)


async def match(stub: matcher_pb2_grpc.MatcherStub, deadline_s: float) -> Outcome:
    request = matcher_pb2.ImageRequest(image=samples.jpeg(), top_k=1)
    started = time.monotonic()
    try:
        await stub.Match(request, timeout=deadline_s)
    except grpc.aio.AioRpcError as exc:
        return Outcome(exc.code(), exc.details() or "", started, time.monotonic(), deadline_s)
    return Outcome(OK, "", started, time.monotonic(), deadline_s)


async def until(condition: Callable[[], bool], within_s: float = 30.0) -> None:
    """Poll until `condition` holds; a guard against hanging, not a speed check."""
    end = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {within_s} s")
        await asyncio.sleep(0.01)


async def test_tf_serving_stopped_mid_load_fails_fast_then_recovers(settings, double) -> None:
    deadline_s = 5.0
    config = tfserving_settings(settings, double.target, health_check_interval_s=0.1)
    async with matcher(config) as (_, channel):
        stub = matcher_pb2_grpc.MatcherStub(channel)
        outcomes: list[Outcome] = []
        done = asyncio.Event()

        async def client() -> None:
            while not done.is_set():
                outcome = await match(stub, deadline_s)
                outcomes.append(outcome)
                if outcome.code != OK:
                    await asyncio.sleep(0.01)  # as a client would, rather than spin

        def count(code_ok: bool, since: float) -> int:
            return sum((o.code == OK) == code_ok and o.started >= since for o in outcomes)

        clients = [asyncio.create_task(client()) for _ in range(8)]
        try:
            await until(lambda: count(True, 0) >= 16)  # the load is running
            await asyncio.to_thread(double.stop)
            stopped = time.monotonic()
            await wait_health(channel, Health.NOT_SERVING, within_s=10)
            await until(lambda: count(False, stopped) >= 16)
            await asyncio.to_thread(double.restart)
            restarted = time.monotonic()
            to_serving = await wait_health(channel, Health.SERVING, within_s=30)
            await until(lambda: count(True, restarted) >= 1)
        finally:
            done.set()
            await asyncio.gather(*clients)

    failed = [o for o in outcomes if o.code != OK]
    assert {o.code for o in failed} == {grpc.StatusCode.UNAVAILABLE}, {o.code for o in failed}
    assert all("TF Serving" in o.details for o in failed), {o.details for o in failed}
    assert all(o.elapsed < o.deadline_s for o in failed)
    during = [o for o in outcomes if o.started >= stopped and o.ended <= restarted]
    assert during and all(o.code != OK for o in during)
    first_ok = min(o.ended for o in outcomes if o.code == OK and o.started >= restarted)
    print(
        f"\n{len(outcomes)} calls, {len(failed)} UNAVAILABLE; slowest failure "
        f"{max(o.elapsed for o in failed) * 1000:.0f} ms of a {deadline_s:.0f} s deadline; "
        f"restart -> SERVING {to_serving:.2f} s, restart -> first OK Match "
        f"{first_ok - restarted:.2f} s"
    )


async def test_a_slow_backend_meets_the_callers_deadline_without_piling_up(
    settings, double
) -> None:
    config = tfserving_settings(settings, double.target, tfserving_timeout_s=HELD_S / 2)
    async with matcher(config) as (running, channel):
        stub = matcher_pb2_grpc.MatcherStub(channel)
        assert (await match(stub, 30)).code == OK
        double.reset_counters()
        double.predict_delay_s = HELD_S  # TF Serving slower than every caller's deadline
        held = asyncio.create_task(match(stub, 0.5))
        await until(lambda: double.predict_calls == 1)
        gave_up = await asyncio.gather(*(match(stub, 0.5) for _ in range(6)), held)

        assert {o.code for o in gave_up} == {grpc.StatusCode.DEADLINE_EXCEEDED}
        assert all(o.elapsed < HELD_S / 2 for o in gave_up)  # not held until the backend answered
        # The backend still holds the first call, but nobody waits behind it any more. (The
        # server hears of each cancellation a moment after its client gave up: wait for that,
        # well before the backend would answer.)
        await until(lambda: running.core.batcher.queued == 0, within_s=HELD_S / 4)
        assert double.predict_calls == 1
        assert await health_of(channel) == Health.SERVING

        double.predict_delay_s = 0
        assert (await match(stub, 30)).code == OK
        # The held call and the new one; none of the six abandoned calls reached the backend.
        assert double.batch_sizes == [1, 1]


async def test_overload_is_refused_fast_and_the_queue_stays_bounded(settings, double) -> None:
    bound, batch = 4, 2
    config = tfserving_settings(
        settings,
        double.target,
        tfserving_timeout_s=HELD_S / 2,
        max_queued_requests=bound,
        batch_max_size=batch,
    )
    async with matcher(config) as (running, channel):
        stub = matcher_pb2_grpc.MatcherStub(channel)
        double.predict_delay_s = HELD_S
        busy = asyncio.create_task(match(stub, 30))
        await until(lambda: double.predict_calls == 1)  # the model is busy
        largest_queue = 0

        async def watch_queue() -> None:
            nonlocal largest_queue
            while True:
                largest_queue = max(largest_queue, running.core.batcher.queued)
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch_queue())
        offered = [asyncio.create_task(match(stub, 30)) for _ in range(10 * bound)]
        # The refused calls are answered while the model is still held: they do not wait.
        await until(lambda: sum(t.done() for t in offered) == len(offered) - bound)
        queued_at_peak = running.core.batcher.queued
        double.predict_delay_s = 0
        outcomes = await asyncio.gather(busy, *offered)
        watcher.cancel()

    refused = [o for o in outcomes if o.code != OK]
    assert len(refused) == 10 * bound - bound
    assert {o.code for o in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all("overloaded" in o.details and "retry later" in o.details for o in refused)
    assert sum(o.code == OK for o in outcomes) == 1 + bound
    assert queued_at_peak == bound and largest_queue <= bound
    assert double.batch_sizes == [1, batch, batch]
    print(
        f"\n{10 * bound} calls offered while the model was busy: {len(refused)} "
        f"RESOURCE_EXHAUSTED, {bound} queued (largest queue seen {largest_queue}, bound {bound})"
    )


async def test_calls_beyond_max_concurrent_rpcs_are_refused(settings, double) -> None:
    limit = 3
    config = tfserving_settings(
        settings,
        double.target,
        tfserving_timeout_s=HELD_S / 2,
        max_concurrent_rpcs=limit,
        # One image per model call, so that the admitted calls are one in the backend and
        # the rest queued however they arrive (a batch of all three would also be possible).
        batch_max_size=1,
    )
    async with matcher(config) as (running, channel):
        stub = matcher_pb2_grpc.MatcherStub(channel)
        double.predict_delay_s = HELD_S
        admitted = [asyncio.create_task(match(stub, 30)) for _ in range(limit)]
        await until(lambda: double.predict_calls == 1 and running.core.batcher.queued == limit - 1)
        beyond = await asyncio.gather(*(match(stub, 30) for _ in range(5)))
        double.predict_delay_s = 0
        answered = await asyncio.gather(*admitted)

    assert {o.code for o in beyond} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all("Concurrent RPC limit exceeded" in o.details for o in beyond), beyond[0].details
    assert {o.code for o in answered} == {OK}
