"""Multi-view queries through the real server: crops and turns of one photo, merged per label,
judged against the threshold calibrated for those views; turned references in the index."""

from __future__ import annotations

import io
import json
import shutil

import grpc
import numpy as np
import pytest
from PIL import Image

from integrity.manifest import write_manifest
from matcher.factory import make_core
from matcher.layout import REPORT_FILE
from matcher.v1 import matcher_pb2
from matcher.views import PLANS
from tests.conftest import query_images

VIEWS = {
    "whole": matcher_pb2.VIEWS_WHOLE,
    "crops": matcher_pb2.VIEWS_CROPS,
    "crops_rotations": matcher_pb2.VIEWS_CROPS_ROTATIONS,
}


async def match(stub, image: bytes, **options) -> matcher_pb2.MatchResponse:
    request = matcher_pb2.ImageRequest(image=image, top_k=3, **options)
    return await stub.Match(request, timeout=120)


def small_on_clutter(path, seed: int) -> bytes:
    """The photo at 40 % of a 640 x 480 frame of coloured noise blotches: an item lying small
    on a busy surface."""
    rng = np.random.default_rng(seed)
    blotches = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    frame = Image.fromarray(blotches).resize((640, 480), Image.Resampling.NEAREST)
    with Image.open(path) as item:
        item = item.convert("RGB")
        item.thumbnail((192, 192))
    frame.paste(
        item, (int(rng.integers(0, 640 - item.width)), int(rng.integers(0, 480 - item.height)))
    )
    buffer = io.BytesIO()
    frame.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


async def test_each_mode_answers_with_its_own_views_and_threshold(stub, demo, trained) -> None:
    label, path = query_images(demo)[0]
    image = path.read_bytes()
    answers = {mode: await match(stub, image, views=value) for mode, value in VIEWS.items()}
    for mode, answer in answers.items():
        assert answer.views == VIEWS[mode]
        # Checked by geometry: the similarity that rescues an unverified answer, per mode.
        calibrated = trained.report["verification"]["views"][mode]["threshold"]
        assert answer.threshold == pytest.approx(calibrated), mode
        unchecked = await match(stub, image, views=VIEWS[mode], min_inliers=0)
        plain = trained.report["no_match_views"][mode]["threshold"]
        assert unchecked.threshold == pytest.approx(plain), mode
        names = {view.name for view in PLANS[mode]}
        assert all(item.query_view in names for item in answer.matches), mode
        assert answer.matches[0].label == label
    # Each label keeps its best view and the whole photo is one of them, so a mode with more
    # views comes at least as close to every label.
    whole = {item.label: item.similarity for item in answers["whole"].matches}
    for item in answers["crops"].matches:
        if item.label in whole:
            assert item.similarity >= whole[item.label] - 1e-5
    assert answers["crops"].verdict_score >= answers["whole"].verdict_score - 1e-5


async def test_a_request_without_views_gets_the_servers_default(stub, demo, settings) -> None:
    _, path = query_images(demo)[0]
    answer = await match(stub, path.read_bytes())
    info = await stub.GetModelInfo(matcher_pb2.GetModelInfoRequest(), timeout=10)
    assert answer.views == info.default_views == VIEWS[settings.views]


async def test_an_unknown_views_value_is_an_invalid_argument(stub, demo) -> None:
    _, path = query_images(demo)[0]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await match(stub, path.read_bytes(), views=9)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown views value 9" in raised.value.details()


async def test_crops_find_an_item_lying_small_on_clutter(stub, demo) -> None:
    queries = query_images(demo)[::4][:8]
    found = {"whole": 0, "crops": 0}
    for seed, (label, path) in enumerate(queries):
        image = small_on_clutter(path, seed)
        for mode in found:
            answer = await match(stub, image, views=VIEWS[mode])
            found[mode] += answer.matches[0].label == label
    print(f"of {len(queries)} items small on clutter, first label right: {found}")
    assert found["crops"] >= found["whole"]
    assert found["crops"] >= 0.75 * len(queries)


async def test_a_turned_reference_shows_the_photo_it_turns(stub, trained) -> None:
    from matcher.index import CatalogueIndex

    index = CatalogueIndex.from_bytes(
        (trained.classifier_path.parent / "index.npz").read_bytes(), "index"
    )
    turned = next(reference for reference in index.ids if reference.endswith("@90"))
    photo = turned.removesuffix("@90")
    shown = await stub.GetReference(
        matcher_pb2.GetReferenceRequest(reference_id=turned), timeout=10
    )
    original = await stub.GetReference(
        matcher_pb2.GetReferenceRequest(reference_id=photo), timeout=10
    )
    assert shown.image == original.image and shown.label == original.label
    assert shown.reference_id == turned


async def test_a_run_calibrated_on_whole_photos_only_judges_the_whole_view(
    settings, embedded_backend, demo, trained, tmp_path
) -> None:
    """A run trained before multi-view queries records only the whole photo's threshold;
    crops then still rank, and the verdict stays on the view that threshold was set on."""
    run = tmp_path / "run"
    shutil.copytree(trained.classifier_path.parent, run)
    report = json.loads((run / REPORT_FILE).read_text())
    del report["no_match_views"]
    del report["verification"]  # geometric verification came later still
    (run / REPORT_FILE).write_text(json.dumps(report))
    write_manifest(run, tool="train", kind="classifier")
    core = make_core(
        settings.model_copy(update={"classifier": run / trained.classifier_path.name}),
        embedded_backend,
    )
    core.load()
    _, path = query_images(demo)[0]
    try:
        whole = await core.match(path.read_bytes(), 0, views="whole")
        crops = await core.match(path.read_bytes(), 0, views="crops")
    finally:
        await core.batcher.close()
    assert crops.views == "crops"
    assert crops.verdict is not None and whole.verdict is not None
    assert crops.verdict.threshold == whole.verdict.threshold == report["no_match"]["threshold"]
    assert crops.verdict.score == pytest.approx(whole.verdict.score)


async def test_a_damaged_photo_with_crops_is_an_invalid_argument_and_serving_goes_on(
    stub, demo
) -> None:
    label, path = query_images(demo)[0]
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], data[:200] + b"\0" * 4000):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await match(stub, damaged, views=matcher_pb2.VIEWS_CROPS)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details().startswith("image could not be decoded")
    answer = await match(stub, data, views=matcher_pb2.VIEWS_CROPS)
    assert answer.matches[0].label == label
