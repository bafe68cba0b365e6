"""Hostile and odd inputs thrown at the real server: each gets its status, the server survives.

The corpus (tests/hostile_corpus.py) pins a status per kind of input; a property-based test
then throws random bytes and mutated real images at the live server and only asks that the
answer is OK or INVALID_ARGUMENT, never UNKNOWN or INTERNAL, and that health stays SERVING.
At the end of the module a table kind -> expected -> observed is printed.
"""

from __future__ import annotations

import asyncio
import collections
import io
import resource
import time
from collections.abc import Iterator

import grpc
import hypothesis
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from PIL import Image, ImageOps

from matcher.v1 import matcher_pb2, matcher_pb2_grpc
from tests import hostile_corpus as corpus

SERVING = health_pb2.HealthCheckResponse.SERVING
#: What a readable message must not contain: Python or TensorFlow internals.
INTERNALS = (
    "Traceback (most recent call last)",
    'File "',
    "{{function_node",
    "Graph execution error",
    "Detected at node",
    "[[",
)
FUZZ_EXAMPLES = 150


class UnexpectedStatus(AssertionError):
    """The status differs from the corpus's expectation.

    Known bugs are xfail'ed on this exception only, so a broken health check or a failed
    follow-up request still fails those tests.
    """


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def limits(settings) -> corpus.Limits:
    """The limits of the server under test, to build the edge cases against."""
    return corpus.Limits(
        min_side=settings.min_image_side,
        max_side=settings.max_image_side,
        max_receive_bytes=settings.max_receive_bytes,
    )


@pytest.fixture(scope="module")
async def label_count(stub) -> int:
    info = await stub.GetModelInfo(matcher_pb2.GetModelInfoRequest(), timeout=60)
    return len(info.labels)


@pytest.fixture(scope="module")
def report(request: pytest.FixtureRequest) -> Iterator[dict[str, list[str]]]:
    """Collects the status table and the fuzzing summary; prints them after the module.

    Printed with capture suspended, so the table shows without `-s` too.
    """
    sections: dict[str, list[str]] = {}
    yield sections
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        for title, lines in sections.items():
            print(f"\n{title}")
            print("\n".join(lines))


@pytest.fixture(scope="module")
def status_rows(report: dict[str, list[str]]) -> Iterator[dict[str, tuple[str, str, str]]]:
    """kind -> (expected, observed, note), rendered into `report` after the last case."""
    rows: dict[str, tuple[str, str, str]] = {}
    lines = report.setdefault("hostile inputs: kind -> status", [])
    yield rows
    width = max((len(kind) for kind in rows), default=4)
    lines.append(f"{'kind':<{width}}  {'expected':<18}  {'observed':<18}  details")
    for case in corpus.CASES:
        if case.kind in rows:
            expected, observed, note = rows[case.kind]
            lines.append(f"{case.kind:<{width}}  {expected:<18}  {observed:<18}  {note}")
    lines.append(f"{len(rows)} kinds run of {len(corpus.CASES)} in the corpus")


async def match(
    stub: matcher_pb2_grpc.MatcherStub, image: bytes, top_k: int = 0
) -> tuple[grpc.StatusCode, str, matcher_pb2.MatchResponse | None]:
    """(status, details, response) of one Match call; the response only when OK."""
    request = matcher_pb2.ImageRequest(image=image, top_k=top_k)
    try:
        response = await stub.Match(request, timeout=60)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or "", None
    return grpc.StatusCode.OK, "", response


async def embed(stub: matcher_pb2_grpc.MatcherStub, image: bytes) -> np.ndarray:
    response = await stub.Embed(matcher_pb2.ImageRequest(image=image), timeout=60)
    return np.asarray(response.features, dtype=np.float32)


def assert_readable(details: str) -> None:
    """One short printable line, written for a caller, not a stack dump."""
    assert details.strip(), "empty details"
    assert details.isprintable(), f"not one printable line: {details!r}"
    assert len(details) < 500, f"too long for a caller: {details!r}"
    leaked = [sign for sign in INTERNALS if sign in details]
    assert not leaked, f"internals {leaked} in {details!r}"


async def assert_still_serving(
    stub: matcher_pb2_grpc.MatcherStub, health_stub: health_pb2_grpc.HealthStub
) -> None:
    """Health is SERVING and a normal image is still matched."""
    health = await health_stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == SERVING
    code, details, response = await match(stub, corpus.plain_jpeg(), top_k=1)
    assert code == grpc.StatusCode.OK, details
    assert response is not None and len(response.matches) == 1


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def peak_rss_mib() -> float:
    """Peak resident memory of this process (the server runs in it), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def case_params() -> list[object]:
    """The corpus as pytest params; known bugs xfail on UnexpectedStatus only."""
    params = []
    for case in corpus.CASES:
        marks = []
        if case.known_bug:
            marks.append(
                pytest.mark.xfail(strict=True, raises=UnexpectedStatus, reason=case.known_bug)
            )
        params.append(pytest.param(case, id=case.kind, marks=marks))
    return params


# --- the tests ------------------------------------------------------------------------------


def test_corpus_is_broad() -> None:
    assert len(corpus.CASES) >= 30
    assert {case.expected for case in corpus.CASES} == {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }


@pytest.mark.parametrize("case", [c for c in corpus.CASES if c.bomb], ids=lambda c: c.kind)
async def test_decompression_bomb_is_refused_from_the_header(stub, limits, case) -> None:
    # Runs before the corpus so that the peak memory it compares with is the server's own.
    image = case.build(limits)
    peak_before = peak_rss_mib()
    code, details, _ = await match(stub, image)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit" in details, details  # the header check's words, not the decoder's
    # Decoding even one of these would need gigabytes (memory, not time, is the evidence: a
    # busy machine can be slow either way).
    assert peak_rss_mib() - peak_before < 64


@pytest.mark.parametrize("case", case_params())
async def test_each_kind_gets_its_status_and_the_server_keeps_serving(
    stub, health_stub, limits, label_count, status_rows, case: corpus.Case
) -> None:
    code, details, response = await match(stub, case.build(limits), case.top_k)
    # The table's note: the message a caller reads, shortened, and whether this is a known bug.
    note = ("KNOWN BUG (xfail) " if case.known_bug else "") + shorten(details, 72)
    status_rows[case.kind] = (case.expected.name, code.name, note)

    # Whatever the status, the server must survive it and say something a caller can read.
    if code != grpc.StatusCode.OK:
        assert_readable(details)
    await assert_still_serving(stub, health_stub)

    if code != case.expected:
        raise UnexpectedStatus(
            f"{case.kind}: {code.name} ({details!r}), expected {case.expected.name}"
        )
    if response is not None:
        expected_count = min(case.top_k or label_count, label_count)
        assert len(response.matches) == expected_count
        scores = [m.score for m in response.matches]
        assert scores == sorted(scores, reverse=True)


async def test_exif_orientation_is_applied_before_the_graph(stub) -> None:
    rotated = corpus.exif_rotated_jpeg()
    with Image.open(io.BytesIO(rotated)) as image:
        assert image.getexif()[0x0112] == 6
        # What for_graph sends the graph: the decoded photo turned upright, as a PNG.
        upright = corpus.encode(ImageOps.exif_transpose(image).convert("RGB"), "PNG")
        stored = corpus.encode(image.convert("RGB"), "PNG")
    with_tag = await embed(stub, rotated)
    # The tag is obeyed: the features are those of the upright pixels...
    np.testing.assert_allclose(with_tag, await embed(stub, upright), atol=1e-5)
    # ...not of the pixels as stored, which the graph alone would have read.
    assert np.abs(with_tag - await embed(stub, stored)).max() > 1e-2


async def test_heic_and_webp_match_like_the_same_pixels_in_png(stub) -> None:
    image = corpus.photo()
    png = await embed(stub, corpus.encode(image, "PNG"))
    np.testing.assert_allclose(
        await embed(stub, corpus.encode(image, "WEBP", lossless=True)), png, atol=1e-5
    )
    # HEIC is lossy: close to the PNG's features, not equal.
    heic = await embed(stub, corpus.heic(image))
    cosine = float(heic @ png / (np.linalg.norm(heic) * np.linalg.norm(png)))
    assert cosine > 0.95


async def test_grayscale_bmp_is_decoded_like_its_24_bit_twin(stub) -> None:
    # 8-bit grey BMPs carry an identity palette, so reading indices as grey is right for them.
    grey = corpus.photo().convert("L")
    eight = await embed(stub, corpus.encode(grey, "BMP"))
    twenty_four = await embed(stub, corpus.encode(grey.convert("RGB"), "BMP"))
    np.testing.assert_allclose(eight, twenty_four, atol=1e-4)


async def test_palette_bmp_is_refused_rather_than_decoded_wrongly(stub) -> None:
    # TensorFlow's BMP decoder ignores the palette and reads indices as grey levels.
    paletted = corpus.encode(corpus.photo().convert("P"), "BMP")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await embed(stub, paletted)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "palette" in caught.value.details()


# --- property-based: random and mutated bytes ----------------------------------------------

MUTATIONS = ("flip", "truncate", "insert", "overwrite", "copy_range", "dup_segment", "drop_segment")


def hostile_bytes() -> st.SearchStrategy[bytes]:
    """Half mutated real images, half noise (a quarter of it behind a real signature)."""
    edit = st.builds(
        corpus.Mutation,
        op=st.sampled_from(MUTATIONS),
        pos=st.integers(0, 1 << 20),
        arg=st.integers(0, 255),
        payload=st.binary(min_size=1, max_size=16),
    )
    mutated = st.builds(
        lambda name, edits: corpus.mutate(corpus.seeds()[name], edits),
        st.sampled_from(sorted(corpus.seeds())),
        st.lists(edit, min_size=1, max_size=4),
    )
    noise = st.binary(max_size=2048)
    behind_magic = st.builds(
        lambda magic, tail: magic + tail, st.sampled_from(corpus.MAGICS), st.binary(max_size=1024)
    )
    # one_of() would give each a third (it flattens and dedupes): weight by sampling names.
    kinds = {"mutated": mutated, "noise": noise, "behind_magic": behind_magic}
    return st.sampled_from(("mutated", "mutated", "noise", "behind_magic")).flatmap(
        kinds.__getitem__
    )


def fuzz_server(target: str) -> collections.Counter[str]:
    """Run the property on a sync channel (in a worker thread); returns statuses seen."""
    seen: collections.Counter[str] = collections.Counter()
    with grpc.insecure_channel(target) as channel:
        stub = matcher_pb2_grpc.MatcherStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        @hypothesis.settings(
            max_examples=FUZZ_EXAMPLES,
            derandomize=True,  # the same examples on every run: CI stays deterministic
            database=None,  # no example database (.hypothesis/ keeps only a constants cache)
            deadline=None,  # a mutated header may legitimately ask for a large decode
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            print_blob=False,
        )
        @given(image=hostile_bytes())
        def answered_and_serving(image: bytes) -> None:
            details = ""
            try:
                stub.Match(matcher_pb2.ImageRequest(image=image, top_k=1), timeout=60)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
            # Which stage refused tells whether the examples reach the decoder at all.
            stage = " (decoder)" if "could not be decoded" in details else ""
            seen[code.name + (stage or (" (header)" if details else ""))] += 1
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), code
            check = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert check.status == SERVING

        answered_and_serving()
    return seen


async def test_random_and_mutated_bytes_get_ok_or_invalid_argument(
    target, stub, health_stub, report
) -> None:
    # The server runs on this (the session's) event loop: a sync test would block it, so the
    # hypothesis examples run in a worker thread over a sync channel while the loop serves.
    started = time.perf_counter()
    seen = await asyncio.to_thread(fuzz_server, target)
    elapsed = time.perf_counter() - started
    report["property-based: statuses seen"] = [
        *(f"{name:<28}  {count}" for name, count in sorted(seen.items())),
        f"{sum(seen.values())} examples in {elapsed:.1f} s",
    ]
    await assert_still_serving(stub, health_stub)
