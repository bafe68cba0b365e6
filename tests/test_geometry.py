"""Geometric verification (`matcher.geometry`): keypoints of real photos, the inlier count that
tells the same item from another, the keypoint file, and the verdict it gives when served."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import matcher.core
from matcher.errors import ModelLoadError
from matcher.factory import make_core
from matcher.geometry import (
    FOCUS_MAX_PIXELS,
    FOCUS_REGION_SIDE,
    LEANING_INLIERS,
    MIN_INLIERS,
    PROMOTION_MARGIN,
    Focus,
    KeypointStore,
    LocalFeatures,
    answering,
    focus_decode_pixels,
    focus_decode_side,
    focused_features,
    inliers,
    leading,
    local_features,
    verify_labels,
)
from matcher.images import ImageHeader, ImageLimits, decode_upright, inspect_image
from matcher.index import CatalogueIndex
from matcher.layout import KEYPOINTS_FILE
from matcher.views import PLANS
from tests.conftest import outside_queries, query_images


def _jpeg(image: Image.Image, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def _on_clutter(item: Image.Image, angle: float) -> Image.Image:
    """`item` at a third of a frame of real texture, turned by `angle`."""
    from skimage import data

    frame = Image.fromarray(data.brick()).convert("RGB").resize((480, 480))
    small = item.resize((160, 160)).convert("RGBA").rotate(angle, expand=True)
    frame.paste(small, (200, 120), small)
    return frame


def test_the_same_photo_turned_cropped_or_on_clutter_has_many_inliers(astronaut) -> None:
    reference = local_features(_jpeg(astronaut), 500)
    field = {
        "turned 37 degrees": astronaut.rotate(37, expand=True),
        "turned 180 degrees": astronaut.rotate(180),
        "a 55 % crop": astronaut.crop((60, 40, 440, 420)),
        "small on clutter, turned": _on_clutter(astronaut, 120),
    }
    counts = {
        name: inliers(local_features(_jpeg(photo)), reference) for name, photo in field.items()
    }
    print(counts)
    assert all(count >= 3 * MIN_INLIERS for count in counts.values()), counts


def test_other_photos_stay_below_the_count_that_verifies(astronaut) -> None:
    from skimage import data

    reference = local_features(_jpeg(astronaut), 500)
    others = {
        "coffee": data.coffee(),
        "chelsea": data.chelsea(),
        "rocket": data.rocket(),
        "brick": data.brick(),  # repeated texture: many similar keypoints
        "text": data.text(),
    }
    counts = {
        name: inliers(local_features(_jpeg(Image.fromarray(photo))), reference)
        for name, photo in others.items()
    }
    print(counts)
    assert all(count < MIN_INLIERS for count in counts.values()), counts


def test_mirrored_keypoints_are_what_sift_finds_on_the_mirrored_photo(astronaut) -> None:
    photo = local_features(_jpeg(astronaut), 500)
    mirror = local_features(_jpeg(astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT)), 500)
    derived = photo.mirrored()
    # Pair each keypoint with SIFT's on the mirrored photo at the mirrored place.
    width = astronaut.width
    errors = []
    for point, descriptor in zip(derived.points, derived.descriptors, strict=True):
        place = np.array([width - 1 + point[0], point[1]])  # derived x is -x
        distance = np.linalg.norm(mirror.points - place, axis=1)
        if distance.min() < 0.5:
            found = mirror.descriptors[distance.argmin()].astype(float)
            errors.append(np.linalg.norm(descriptor - found) / np.linalg.norm(found))
    assert len(errors) > 100
    assert float(np.median(errors)) < 0.15, np.median(errors)
    # A mirrored catalogue photo: SIFT alone finds almost nothing; the mirrored keypoints do.
    field = local_features(_jpeg(_on_clutter(astronaut, 30)))
    assert inliers(field, mirror) < MIN_INLIERS
    assert inliers(field.mirrored(), mirror) >= 3 * MIN_INLIERS


def _small_on_texture(
    item: Image.Image,
    share: float,
    side: int = 448,
    textures: tuple[str, ...] = ("brick", "gravel", "grass", "brick"),
) -> Image.Image:
    """`item` `share` of a frame's width, near its top left, on four real photos of
    scikit-image's (`textures`): clutter that takes most of the photo's keypoints."""
    from skimage import data

    frame = Image.new("RGB", (side, side))
    half = side // 2
    for i, texture in enumerate(getattr(data, name)() for name in textures):
        tile = Image.fromarray(texture).convert("RGB").resize((half, half))
        frame.paste(tile, ((i % 2) * half, (i // 2) * half))
    width = int(side * share)
    frame.paste(item.resize((width, width * item.height // item.width)), (side // 10, side // 7))
    return frame


def test_a_closer_look_verifies_an_item_small_on_clutter_and_nothing_else() -> None:
    from skimage import data

    box = (0.0, 0.0, 0.4, 0.4)  # the crop view that holds the item (matcher.views' first)
    others = [data.hubble_deep_field(), data.coffee(), data.camera()]
    strangers = [local_features(_jpeg(Image.fromarray(o).convert("RGB")), 500) for o in others]
    for name in ("chelsea", "rocket"):
        item = Image.fromarray(getattr(data, name)())
        reference = local_features(_jpeg(item), 500)
        photo = _jpeg(_small_on_texture(item, 0.2))
        whole = inliers(local_features(photo), reference)
        closer = focused_features(photo, [box])[0]
        print(name, "whole photo", whole, "closer", inliers(closer, reference))
        assert whole < MIN_INLIERS  # a fifth of the frame wide: too few of its keypoints
        assert inliers(closer, reference) >= 2 * MIN_INLIERS
        for stranger in strangers:
            chance = max(inliers(closer, stranger), inliers(closer.mirrored(), stranger))
            assert chance < MIN_INLIERS, (name, chance)


def test_each_label_is_looked_for_closer_only_where_it_was_found() -> None:
    from skimage import data

    cat, rocket = Image.fromarray(data.chelsea()), Image.fromarray(data.rocket())
    store = KeypointStore.of(
        [
            ("cat/1.jpg", local_features(_jpeg(cat), 500)),
            ("rocket/1.jpg", local_features(_jpeg(rocket), 500)),
        ]
    )
    index = CatalogueIndex.build(
        np.eye(2, 4, dtype=np.float32), ["cat", "rocket"], ["cat/1.jpg", "rocket/1.jpg"]
    )
    photo = _jpeg(_small_on_texture(cat, 0.2))  # the cat in the top left crop, nowhere else
    corner, other = focused_features(photo, [(0.0, 0.0, 0.4, 0.4), (0.6, 0.6, 1.0, 1.0)])
    whole = local_features(photo)
    views = np.eye(1, 4, dtype=np.float32)

    def counts(focus: dict[int, Focus]) -> list[int]:
        found = verify_labels(whole, views, [0, 1], index, store, {}, focus)
        return [found[0][0], found[1][0]]

    plain = counts({})
    assert plain[0] < MIN_INLIERS  # the whole photo's keypoints miss the small cat
    # The cat found in the corner: verified there. The corner given to the rocket only (the
    # cat found elsewhere) verifies neither: a label is checked at its own view alone.
    assert counts({0: Focus("corner", corner)})[0] >= 2 * MIN_INLIERS
    elsewhere = counts({0: Focus("other", other), 1: Focus("corner", corner)})
    assert max(elsewhere) < MIN_INLIERS, elsewhere


def test_a_closer_look_at_a_phone_photo_decodes_only_what_its_region_needs() -> None:
    from skimage import data

    assert focus_decode_side((0.0, 0.0, 1.0, 1.0)) == FOCUS_REGION_SIDE
    assert focus_decode_side((0.3, 0.3, 0.7, 0.7)) == 1200  # 0.4 of 1,200 is 480
    item = Image.fromarray(data.chelsea())
    reference = local_features(_jpeg(item), 500)
    # A phone's 12 megapixels (4032 x 3024): JPEG's half scale keeps 1,512 of 1,200, which
    # gives the region 806 x 605 (brought to 640 x 480, as from the whole decode) and the item
    # its keypoints, from a 3-megapixel decode within FOCUS_MAX_PIXELS (the whole 12 are not).
    textured = _small_on_texture(item, 0.2, side=4032).resize((4032, 3024))
    photo = _jpeg(textured)
    corner = (0.0, 0.0, 0.4, 0.4)
    header = inspect_image(photo, ImageLimits())
    decoded = decode_upright(photo, focus_decode_side(corner))
    assert decoded.size == (2016, 1512)
    assert focus_decode_pixels(header, corner) == 2016 * 1512 < header.width * header.height
    assert header.width * header.height > FOCUS_MAX_PIXELS
    assert inliers(focused_features(photo, [corner])[0], reference) >= 2 * MIN_INLIERS
    # Other cameras' frames: a 24.5-megapixel 4:3 one at half scale, a 12-megapixel 16:9 one
    # whole (its shorter side, 2,268, is under twice 1,200), both within FOCUS_MAX_PIXELS.
    assert focus_decode_pixels(ImageHeader("JPEG", 5712, 4284), corner) == 2856 * 2142
    assert focus_decode_pixels(ImageHeader("JPEG", 4032, 2268), corner) == 4032 * 2268
    # A PNG has no reduced scale: one as large is not looked at closer.
    png = ImageHeader("PNG", 4032, 3024)
    assert focus_decode_pixels(png, corner) is None


def test_geometry_ranks_a_verified_label_first_else_one_it_clearly_leans_to() -> None:
    similarity = np.array([0.50, 0.48, 0.40, 0.10])

    def found(*counts: int) -> dict[int, tuple[int, str]]:
        return {column: (count, f"{column}/a.jpg") for column, count in enumerate(counts)}

    # Verified: most inliers first, among labels near the best similarity.
    verified = found(2, MIN_INLIERS + 3, MIN_INLIERS + 9, 40)
    assert answering(verified, similarity, MIN_INLIERS) == [2, 1]  # column 3 is too far off
    assert leading(verified, similarity, MIN_INLIERS) == 2
    # None verified: a label with LEANING_INLIERS and strictly more than the others leads.
    assert leading(found(2, LEANING_INLIERS, 3, 0), similarity, MIN_INLIERS) == 1
    assert answering(found(2, LEANING_INLIERS, 3, 0), similarity, MIN_INLIERS) == []
    # A tie, chance-level counts, or a label far below the best similarity: no lean.
    assert leading(found(2, LEANING_INLIERS, LEANING_INLIERS, 0), similarity, MIN_INLIERS) is None
    assert leading(found(3, LEANING_INLIERS - 1, 2, 0), similarity, MIN_INLIERS) is None
    far = np.array([0.50, 0.50 - PROMOTION_MARGIN - 0.01, 0.3, 0.1])
    assert leading(found(2, LEANING_INLIERS + 1, 2, 0), far, MIN_INLIERS) is None


def test_a_photo_without_texture_has_no_keypoints_and_no_inliers() -> None:
    plain = local_features(_jpeg(Image.new("RGB", (320, 240), (120, 130, 140))))
    assert plain.size == 0 and plain.descriptors.shape == (0, 128)
    assert inliers(plain, plain) == 0


def test_the_store_round_trips_and_edits(tmp_path: Path, astronaut) -> None:
    first = local_features(_jpeg(astronaut), 200)
    second = local_features(_jpeg(astronaut.rotate(90)), 200)
    store = KeypointStore.of([("a/1.jpg", first), ("b/2.jpg", second)])
    store.save(tmp_path / KEYPOINTS_FILE)
    loaded = KeypointStore.from_bytes((tmp_path / KEYPOINTS_FILE).read_bytes(), "test")
    assert loaded.ids == ["a/1.jpg", "b/2.jpg"] and loaded.size == first.size + second.size
    assert np.array_equal(loaded["b/2.jpg"].descriptors, second.descriptors)
    assert np.array_equal(loaded["a/1.jpg"].points, first.points)
    smaller = loaded.without(lambda photo: not photo.startswith("a/"))
    assert smaller.ids == ["b/2.jpg"] and "a/1.jpg" not in smaller
    grown = smaller.merged(KeypointStore.of([("c/3.jpg", first)]))
    assert grown.ids == ["b/2.jpg", "c/3.jpg"]


def test_a_keypoint_file_that_does_not_fit_together_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(
        path,
        ids=np.asarray(["a/1.jpg"]),
        offsets=np.asarray([0, 5]),
        points=np.zeros((3, 2), np.float32),  # 5 promised
        descriptors=np.zeros((3, 128), np.uint8),
    )
    with pytest.raises(ModelLoadError, match=r"keypoints .* are not readable"):
        KeypointStore.from_bytes(path.read_bytes(), str(path))
    # An object array would need pickle to read: refused, never unpickled.
    np.savez(path, ids=np.asarray([object()], dtype=object))
    with pytest.raises(ModelLoadError):
        KeypointStore.from_bytes(path.read_bytes(), str(path))


def test_training_stores_every_photos_keypoints_and_records_the_rule(trained) -> None:
    run = trained.classifier_path.parent
    rule = trained.report["verification"]
    assert (run / KEYPOINTS_FILE).is_file() and rule["file"] == KEYPOINTS_FILE
    assert rule["min_inliers"] == MIN_INLIERS
    assert rule["photos"] == trained.report["index"]["photos"]
    for mode, found in rule["views"].items():
        # Calibrated like the similarity threshold: <= 2 % of correct matches refused.
        assert found["false_reject_rate"] <= 0.02, mode
        assert 0.0 < found["verified_share"] <= 1.0 and -1.0 <= found["threshold"] <= 1.0


async def test_a_field_photo_of_an_item_is_verified_and_an_outside_one_is_not(
    settings, embedded_backend, demo, trained
) -> None:
    core = make_core(settings, embedded_backend)
    core.load()
    label, path = query_images(demo)[0]
    photo = Image.open(path)
    turned = _jpeg(photo.rotate(150, expand=True))
    try:
        answer = await core.match(turned, 3)
        outside = [await core.match(p.read_bytes(), 3) for p in outside_queries(demo)]
        off = await core.match(turned, 3, min_inliers=0)
    finally:
        await core.close()
    assert answer.verdict is not None and answer.verdict.verified and answer.verdict.matched
    first = answer.matches[0]
    assert first.label == label and first.inliers is not None and first.inliers >= MIN_INLIERS
    assert first.verified_reference_id.startswith(f"{label}/")
    assert answer.verdict.min_inliers == MIN_INLIERS
    assert answer.verdict.threshold == pytest.approx(
        trained.report["verification"]["views"]["whole"]["threshold"]
    )
    counts = [a.verdict.inliers for a in outside if a.verdict is not None]
    print("outside photos' inliers:", counts)
    assert len(counts) == len(outside) and all(count < MIN_INLIERS for count in counts)
    for found in outside:
        assert found.verdict is not None
        assert found.verdict.matched == (found.verdict.score >= found.verdict.threshold)
    # min_inliers=0: similarity alone, against the similarity threshold of the views mode.
    assert off.verdict is not None and off.verdict.inliers is None
    assert all(m.inliers is None for m in off.matches)
    assert off.verdict.threshold == pytest.approx(trained.report["no_match"]["threshold"])


async def test_the_server_looks_closer_only_where_the_whole_photo_verifies_nothing(
    settings, embedded_backend, demo, trained, monkeypatch
) -> None:
    from skimage import data

    looked: list[list[tuple[float, float, float, float]]] = []  # the boxes of each decode
    decoded: list[bytes] = []  # what each decode was given
    real = matcher.core.focused_features

    def spied(image: bytes, boxes: list[tuple[float, float, float, float]]) -> list[LocalFeatures]:
        looked.append(list(boxes))
        decoded.append(image)
        return real(image, boxes)

    monkeypatch.setattr(matcher.core, "focused_features", spied)
    _, path = query_images(demo)[0]
    # The demo's cat, 15 % of the frame wide on textures: too small for the whole photo's
    # keypoints (they verify nothing of it), found by the crop view that holds it.
    upright = _small_on_texture(Image.fromarray(data.chelsea()), 0.15)
    small = _jpeg(upright)
    # A smaller cat, as a phone stores a photo turned: EXIF orientation 6.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    smaller = _small_on_texture(Image.fromarray(data.chelsea()), 0.12)
    smaller.transpose(Image.Transpose.ROTATE_90).save(buffer, "JPEG", quality=85, exif=exif)
    core = make_core(settings, embedded_backend)
    core.load()
    try:
        plain = await core.match(path.read_bytes(), 3, views="crops")
        assert plain.verdict is not None and plain.verdict.verified and looked == []
        answer = await core.match(small, 3, views="crops")
        looked_upright = len(looked)
        await core.match(buffer.getvalue(), 3, views="crops")
        store = core.read_classifier().catalogue.verification.keypoints
    finally:
        await core.close()
    # The turned photo (its whole verifies no label that may answer) is looked at closer as it was
    # sent: its JPEG, decoded at the scale its crops need as training decodes its files, not
    # the graph's upright PNG (cut at the scale the views need, and decoded whole).
    assert decoded[looked_upright:] and all(
        d == buffer.getvalue() for d in decoded[looked_upright:]
    )
    looked = looked[:looked_upright]
    first = answer.matches[0]
    print("answer:", first, "looked at", looked)
    view = next(v for v in PLANS["crops"] if v.name == first.query_view)
    # The request's closer looks: distinct crops of the labels checked, cut from one decode,
    # the cat's crop among them (where the cat was found).
    (boxes,) = looked
    assert view.box == (0.0, 0.0, 0.4, 0.4)
    crops = {v.box for v in PLANS["crops"] if v.is_crop}
    assert view.box in boxes and len(set(boxes)) == len(boxes) and set(boxes) <= crops
    assert first.label == "chelsea" and answer.verdict is not None and answer.verdict.verified
    assert first.inliers is not None and first.inliers >= 3 * MIN_INLIERS
    whole = local_features(small)
    reference = store[first.verified_reference_id]
    assert max(inliers(whole, reference), inliers(whole.mirrored(), reference)) < MIN_INLIERS


async def test_a_keypoint_file_changed_on_disk_is_refused(
    settings, embedded_backend, trained, tmp_path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained.classifier_path.parent, run)
    data = bytearray((run / KEYPOINTS_FILE).read_bytes())
    data[-100] ^= 0xFF
    (run / KEYPOINTS_FILE).write_bytes(bytes(data))
    core = make_core(
        settings.model_copy(update={"classifier": run / trained.classifier_path.name}),
        embedded_backend,
    )
    with pytest.raises(ModelLoadError, match=KEYPOINTS_FILE):
        core.load()


def test_a_negative_min_inliers_setting_is_refused(settings) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="min_inliers"):
        type(settings)(**(settings.model_dump() | {"min_inliers": -1}))


def test_local_features_of_an_empty_result_are_well_formed() -> None:
    empty = LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8))
    assert KeypointStore.of([("x/1.jpg", empty)])["x/1.jpg"].size == 0


def test_a_closer_look_at_a_photo_a_pixel_wide_finds_nothing_and_does_not_fail() -> None:
    tiny = _jpeg(Image.new("RGB", (1, 1), (120, 30, 60)))
    found = focused_features(tiny, [(0.0, 0.0, 0.4, 0.4), (0.6, 0.6, 1.0, 1.0)])
    assert [local.size for local in found] == [0, 0]
    assert all(local.descriptors.shape == (0, 128) for local in found)
