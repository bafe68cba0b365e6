"""The catalogue index served: each match names its nearest reference view, GetReference shows
it, and the verdict says "no match" for photos of things outside the catalogue."""

from __future__ import annotations

import io
import shutil

import grpc
import pytest
from PIL import Image

from matcher.errors import ModelLoadError, NotReadyError
from matcher.factory import make_core
from matcher.layout import THUMBNAIL_SIDE, photo_of, thumbnail_path
from matcher.v1 import matcher_pb2
from tests.conftest import outside_queries, query_images


async def match(stub, path, **options) -> matcher_pb2.MatchResponse:
    request = matcher_pb2.ImageRequest(image=path.read_bytes(), top_k=3, **options)
    return await stub.Match(request, timeout=60)


async def test_catalogue_photos_match_with_a_reference_view_of_their_label(stub, demo) -> None:
    queries = query_images(demo)
    answers = [await match(stub, path) for _, path in queries]
    matched = [
        label
        for (label, _), answer in zip(queries, answers, strict=True)
        if answer.verdict == matcher_pb2.MATCH and answer.matches[0].label == label
    ]
    print(f"{len(matched)} of {len(queries)} catalogue queries MATCH with their own label")
    assert len(matched) >= 0.9 * len(queries)
    for answer in answers:
        assert answer.verdict in (matcher_pb2.MATCH, matcher_pb2.NO_MATCH)
        for item in answer.matches:
            # Ids are DATA-relative paths: the label folder comes first.
            assert item.reference_id.startswith(f"{item.label}/")
            assert item.HasField("similarity") and -1.0 <= item.similarity <= 1.0
        # The verdict is judged on the nearest view of all labels, not only the returned ones.
        assert answer.verdict_score >= max(item.similarity for item in answer.matches) - 1e-6


async def test_photos_of_things_outside_the_catalogue_get_no_match(stub, demo, trained) -> None:
    answers = [await match(stub, path) for path in outside_queries(demo)]
    rule = trained.report["verification"]
    threshold = rule["views"]["whole"]["threshold"]
    scores = [round(answer.verdict_score, 3) for answer in answers]
    print(f"outside photos against threshold {threshold:.3f}: {scores}")
    print(f"their inliers (min {rule['min_inliers']}): {[a.inliers for a in answers]}")
    assert all(answer.threshold == pytest.approx(threshold) for answer in answers)
    assert all(answer.min_inliers == rule["min_inliers"] for answer in answers)
    # No outside photo shares with a catalogue photo the keypoints that verify an item.
    assert all(
        answer.HasField("inliers") and answer.inliers < answer.min_inliers for answer in answers
    )
    refused = sum(answer.verdict == matcher_pb2.NO_MATCH for answer in answers)
    # Those that similarity alone would let through are the hard case (docs/benchmarks.md,
    # "No match" and "Quality"); the rescue threshold lets fewer through than the plain one.
    assert refused >= len(answers) // 2
    plain = [await match(stub, path, min_inliers=0) for path in outside_queries(demo)]
    assert refused >= sum(answer.verdict == matcher_pb2.NO_MATCH for answer in plain)
    inside = [(await match(stub, path)).verdict_score for _, path in query_images(demo)]
    assert sum(scores) / len(scores) < sum(inside) / len(inside) - 0.1
    for answer in answers:
        assert (answer.verdict == matcher_pb2.MATCH) == (answer.verdict_score >= answer.threshold)


async def test_a_request_threshold_overrides_the_servers(stub, demo) -> None:
    _, path = query_images(demo)[0]
    # With geometry off, the verdict is the similarity against the request's threshold.
    strict = await match(stub, path, no_match_threshold=1.0, min_inliers=0)
    lenient = await match(stub, path, no_match_threshold=-1.0, min_inliers=0)
    assert strict.verdict == matcher_pb2.NO_MATCH and strict.threshold == 1.0
    assert lenient.verdict == matcher_pb2.MATCH and lenient.threshold == -1.0
    # The ranking does not depend on the verdict.
    assert [m.label for m in strict.matches] == [m.label for m in lenient.matches]
    # With geometry on, a verified item matches whatever the similarity threshold; a count
    # no photo reaches leaves the verdict to similarity again.
    verified = await match(stub, path, no_match_threshold=1.0)
    assert verified.verdict == matcher_pb2.MATCH and verified.inliers >= verified.min_inliers
    unreachable = await match(stub, path, no_match_threshold=1.0, min_inliers=100_000)
    assert unreachable.verdict == matcher_pb2.NO_MATCH and unreachable.min_inliers == 100_000
    assert unreachable.matches[0].HasField("inliers")


async def test_a_threshold_outside_minus_one_to_one_is_invalid(stub, demo) -> None:
    _, path = query_images(demo)[0]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await match(stub, path, no_match_threshold=1.5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no_match_threshold 1.5 is not a similarity in [-1, 1]" in raised.value.details()


async def test_get_reference_returns_the_matched_views_thumbnail(stub, demo) -> None:
    _, path = query_images(demo)[0]
    best = (await match(stub, path)).matches[0]
    reference = await stub.GetReference(
        matcher_pb2.GetReferenceRequest(reference_id=best.reference_id), timeout=10
    )
    assert (reference.reference_id, reference.label) == (best.reference_id, best.label)
    assert reference.media_type == "image/jpeg"
    with Image.open(io.BytesIO(reference.image)) as image:
        assert image.format == "JPEG" and max(image.size) <= THUMBNAIL_SIDE
    original = demo.out / "train" / photo_of(best.reference_id)  # a turned view: its photo
    with Image.open(original) as source:
        assert image.size[0] / image.size[1] == pytest.approx(source.width / source.height, 0.02)


async def test_an_unknown_reference_is_not_found(stub) -> None:
    for reference_id in ("no/such/view.jpg", "../report.json", ""):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetReference(
                matcher_pb2.GetReferenceRequest(reference_id=reference_id), timeout=10
            )
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_model_info_counts_the_references_and_gives_the_threshold(stub, trained) -> None:
    info = await stub.GetModelInfo(matcher_pb2.GetModelInfoRequest(), timeout=10)
    assert info.reference_views == trained.report["index"]["views"]
    # Every photo of the catalogue, held out or not, and its three quarter turns.
    photos = trained.report["data"]["train"] + trained.report["data"]["holdout"]
    assert info.reference_views == 4 * photos == 4 * trained.report["index"]["photos"]
    # Checked by geometry (the default): the rescue threshold of the default views.
    rule = trained.report["verification"]
    assert info.min_inliers == rule["min_inliers"]
    assert info.no_match_threshold == pytest.approx(rule["views"]["whole"]["threshold"])


async def test_the_servers_threshold_setting_overrides_the_calibrated_one(
    settings, embedded_backend, demo
) -> None:
    strict = {"no_match_threshold": 0.999, "min_inliers": 0}  # similarity alone, and strict
    core = make_core(settings.model_copy(update=strict), embedded_backend)
    core.load()
    _, path = query_images(demo)[0]
    result = await core.match(path.read_bytes(), 1)
    await core.batcher.close()
    assert result.verdict is not None and result.verdict.threshold == 0.999
    assert not result.verdict.matched
    assert core.describe().no_match_threshold == 0.999


async def test_a_classifier_pinned_by_sha256_has_no_index_and_no_verdict(
    settings, embedded_backend, demo, trained
) -> None:
    pinned = settings.model_copy(
        update={"classifier_sha256": trained.report["classifier"]["sha256"]}
    )
    core = make_core(pinned, embedded_backend)
    core.load()
    _, path = query_images(demo)[0]
    result = await core.match(path.read_bytes(), 2)
    await core.batcher.close()
    assert result.verdict is None and all(m.reference_id == "" for m in result.matches)
    with pytest.raises(NotReadyError, match="without an index"):
        await core.reference("astronaut/astronaut_0000.jpg")


async def test_a_thumbnail_changed_after_start_is_refused(
    settings, embedded_backend, trained, tmp_path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained.classifier_path.parent, run)
    core = make_core(
        settings.model_copy(update={"classifier": run / trained.classifier_path.name}),
        embedded_backend,
    )
    core.load()
    reference_id = (
        trained.report["no_match"]
        and sorted(
            p.relative_to(run / "references").as_posix().removesuffix(".jpg")
            for p in (run / "references").rglob("*.jpg")
        )[0]
    )
    assert (await core.reference(reference_id)).image
    thumbnail_path(run, reference_id).write_bytes(b"\xff\xd8 someone else's picture")
    with pytest.raises(ModelLoadError, match="differs from its manifest entry"):
        await core.reference(reference_id)
