"""The HoG baseline: the backend on every accepted format, bad inputs, the training feature path,
nearest-reference matching by SAD, and a small end-to-end check on real photos."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile
from skimage import data as skdata
from skimage.feature import hog

import train.hog as hog_module
from matcher.errors import InvalidImageError
from matcher.extraction import extract_features
from tests.samples import bad_images, encode, good_images
from train.hog import HogBackend, HogParams, nearest_reference_sad

#: Bad inputs that must fail to decode. The 1x1 PNG is a valid image: refusing it for its size
#: is `matcher.images.inspect_image`'s job, which `matcher.extraction` runs before the backend.
UNDECODABLE = sorted(set(bad_images()) - {"one_pixel_png"})


@pytest.fixture(scope="module")
def backend() -> HogBackend:
    return HogBackend()


def expected_dim(params: HogParams) -> int:
    """Blocks slide one cell at a time; each holds cells_per_block cells of `orientations` bins."""
    cells = [params.size // p for p in params.pixels_per_cell]
    blocks = [c - b + 1 for c, b in zip(cells, params.cells_per_block, strict=True)]
    return blocks[0] * blocks[1] * params.cells_per_block[0] * params.cells_per_block[1] * 9


def test_dimension_is_what_skimage_gives(backend: HogBackend) -> None:
    params = HogParams()
    from_skimage = hog(
        np.zeros((128, 128)),
        orientations=9,
        pixels_per_cell=(8, 8),
        cells_per_block=(2, 2),
        block_norm="L2-Hys",
        feature_vector=True,
    ).size
    # 128 / 8 = 16 cells a side, 15 block positions a side, 2 x 2 cells x 9 bins per block.
    assert expected_dim(params) == 15 * 15 * 2 * 2 * 9 == 8100
    assert backend.info.feature_dim == from_skimage == expected_dim(params)


@pytest.mark.parametrize("name", sorted(good_images()))
def test_features_for_every_accepted_format(backend: HogBackend, name: str) -> None:
    features = backend.features([good_images()[name]])
    assert features.shape == (1, backend.info.feature_dim)
    assert features.dtype == np.float32
    assert np.isfinite(features).all()
    assert features.any()


def test_identical_bytes_give_identical_features(backend: HogBackend) -> None:
    image = good_images()["jpeg"]
    batch = backend.features([image, image, image])
    assert np.array_equal(batch[0], batch[1]) and np.array_equal(batch[0], batch[2])
    # The thread pool (batch) and the single-image path agree.
    assert np.array_equal(backend.features([image])[0], batch[0])
    assert np.array_equal(HogBackend(workers=1).features([image, image]), batch[:2])


def test_a_different_image_gives_different_features(backend: HogBackend) -> None:
    coffee = encode(Image.fromarray(skdata.coffee()), "JPEG")
    astronaut, other = backend.features([good_images()["jpeg"], coffee])
    assert np.abs(astronaut - other).sum() > 0.1 * np.abs(astronaut).sum()


def test_empty_batch(backend: HogBackend) -> None:
    assert backend.features([]).shape == (0, backend.info.feature_dim)


@pytest.mark.parametrize("name", UNDECODABLE)
def test_undecodable_images_are_refused(backend: HogBackend, name: str) -> None:
    with pytest.raises(InvalidImageError):
        backend.features([good_images()["png"], bad_images()[name]])


def test_truncated_jpeg_is_refused_not_padded(backend: HogBackend) -> None:
    # With this flag set, Pillow would fill the missing half with grey and say nothing.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(InvalidImageError, match="truncated"):
        backend.features([bad_images()["truncated_jpeg"]])


def test_info_and_protocol_members() -> None:
    backend = HogBackend()
    backend.load()
    info = backend.info
    assert backend.ready and backend.kind == "hog"
    assert (info.name, info.version, info.input_size, info.layer) == ("hog", 1, 128, "hog")
    assert len(info.fingerprint) == 16 and info.fingerprint in info.cache_key
    assert HogBackend(HogParams()).info == info
    other = HogBackend(HogParams(size=64, orientations=8))
    assert other.info.fingerprint != info.fingerprint
    assert other.info.feature_dim == expected_dim(HogParams(size=64)) // 9 * 8


def test_extract_features_through_the_training_path(tmp_path) -> None:
    paths = []
    for name, body in sorted(good_images().items()):
        paths.append(tmp_path / name)
        paths[-1].write_bytes(body)
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(bad_images()["truncated_jpeg"])
    paths.insert(3, bad)
    # batch_size 4: the bad file fails its batch, which is then retried one image at a time.
    result = extract_features(paths, HogBackend(), cache=None, batch_size=4, progress=False)
    assert list(result.rejected) == [bad]
    assert result.kept == [i for i in range(len(paths)) if i != 3]
    assert result.features.shape == (len(paths) - 1, 8100)
    assert result.features.dtype == np.float32


def test_sad_picks_the_smallest_sum_of_absolute_differences() -> None:
    reference = np.array([[3, 0, 0, 0], [1, 1, 1, 1]], np.float32)
    queries = np.array([[0, 0, 0, 0], [1, 1, 1, 2]], np.float32)
    # Query 0: SAD 3 vs 4 picks "spike"; Euclidean 3 vs 2 would pick "flat".
    euclidean = np.linalg.norm(queries[:, None] - reference[None], axis=2).argmin(axis=1)
    assert list(euclidean) == [1, 1]
    assert nearest_reference_sad(reference, ["spike", "flat"], queries) == ["spike", "flat"]


def test_sad_chunking_does_not_change_the_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    reference = rng.random((50, 30), np.float32)
    reference[40] = reference[5]  # a tie across reference chunks: the earlier one must win
    queries = np.vstack([rng.random((36, 30), np.float32), reference[5:6]])
    labels = [f"r{i}" for i in range(len(reference))]
    brute = np.abs(queries[:, None] - reference[None]).sum(axis=2).argmin(axis=1)
    expected = [labels[i] for i in brute]
    assert expected[-1] == "r5"
    assert nearest_reference_sad(reference, labels, queries, batch=1000) == expected
    monkeypatch.setattr(hog_module, "SAD_CHUNK_ELEMENTS", 30 * 7)  # 7-row reference chunks
    for batch in (1, 7, 1000):
        assert nearest_reference_sad(reference, labels, queries, batch=batch) == expected


def test_sad_refuses_mismatched_inputs() -> None:
    with pytest.raises(ValueError):
        nearest_reference_sad(np.zeros((2, 3)), ["a", "b"], np.zeros((1, 4)))
    with pytest.raises(ValueError):
        nearest_reference_sad(np.zeros((2, 3)), ["a"], np.zeros((1, 3)))


def view(photo: Image.Image, angle: float, crop: float, shift: int) -> bytes:
    """A slightly rotated, cropped and shifted view of a photo, as a JPEG."""
    w, h = photo.size
    turned = photo.rotate(angle, resample=Image.Resampling.BILINEAR)
    box = (
        int(w * crop) + shift,
        int(h * crop) + shift,
        int(w * (1 - crop)) + shift,
        int(h * (1 - crop)) + shift,
    )
    buffer = io.BytesIO()
    turned.crop(box).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def test_hog_sad_matches_held_out_views_of_real_photos(backend: HogBackend) -> None:
    photos = {
        name: Image.fromarray(getattr(skdata, name)()).resize((256, 192))
        for name in ("astronaut", "coffee", "chelsea")
    }
    settings = [(0, 0.0, 0), (-4, 0.05, 3), (3, 0.08, -4), (6, 0.04, 5), (-2, 0.1, 0)]
    reference_views, reference_labels, query_views, query_labels = [], [], [], []
    for name, photo in photos.items():
        for i, (angle, crop, shift) in enumerate(settings):
            target = (reference_views, reference_labels) if i < 2 else (query_views, query_labels)
            target[0].append(view(photo, angle, crop, shift))
            target[1].append(name)
    predicted = nearest_reference_sad(
        backend.features(reference_views), reference_labels, backend.features(query_views)
    )
    accuracy = np.mean([p == t for p, t in zip(predicted, query_labels, strict=True)])
    assert accuracy > 1 / 3  # better than chance over three photos


def test_an_animated_gif_gives_its_first_frame(backend: HogBackend) -> None:
    first = Image.fromarray(skdata.astronaut()).resize((160, 120)).convert("P")
    second = Image.fromarray(skdata.coffee()).resize((160, 120)).convert("P")
    buffer = io.BytesIO()
    first.save(buffer, format="GIF", save_all=True, append_images=[second], duration=100)
    animated, alone = backend.features([buffer.getvalue(), encode(first, "GIF")])
    assert np.array_equal(animated, alone)
