"""`python -m export`: what an exported SavedModel must be, checked with real TensorFlow and files.

Covers TF Serving's folder layout and version numbering, the `serving_default` signature, the
warmup records TF Serving replays, the in-graph decoding of every accepted image format,
Inception v3 (random and local weights) and the CLI's one-line errors.

EfficientNet-Lite0 comes from the session fixture `exported_model` (genuine ImageNet weights).
Inception v3 is slow on the 2-core CI machine, so it is built four times in this process (three
module fixtures and the legacy-format check) and twice in CLI subprocesses, and exported twice.
Layout and version-numbering checks use a tiny Keras model instead.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import prediction_log_pb2

from export.savedmodel import ExportedModel, export_backbone
from integrity.manifest import MANIFEST_FILE, read_manifest, verify, write_manifest
from matcher.backbones import inception
from matcher.backbones.builder import Backbone, ExportError, build_backbone, names
from matcher.backends.embedded import EmbeddedBackend
from matcher.errors import ModelLoadError
from matcher.layout import (
    INPUT_KEY,
    MODEL_INFO_FILE,
    OUTPUT_KEY,
    SIGNATURE,
    WARMUP_FILE,
    ExportedModelInfo,
    read_model_info,
    versions,
)
from matcher.preprocess import decode_batch
from tests import samples
from tests.cli_output import cli_stderr_lines

ROOT = Path(__file__).resolve().parent.parent
LITE0_DIM = 1280

#: A loaded `serving_default`: keyword `images` in, {"features": ...} out.
Signature = Callable[..., dict[str, tf.Tensor]]

# Point urllib at a closed local port, so that "no cached weights" really means no weights even
# on a CI machine that is online (Keras would otherwise download the 87 MB file).
NO_NETWORK = {
    "https_proxy": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "no_proxy": "",
    "NO_PROXY": "",
}

# What TensorFlow's C++ runtime writes to stderr on import, whatever TF_CPP_MIN_LOG_LEVEL says
# (TF 2.21 logs before absl is initialised). It is not the CLI's output, so it is not counted.


# --- helpers -------------------------------------------------------------------------------------


def png(image: Image.Image) -> bytes:
    return samples.encode(image, "PNG")


def pillow_rgb(encoded: bytes) -> Image.Image:
    """The first frame of an encoded image as Pillow decodes it, converted to RGB."""
    with Image.open(io.BytesIO(encoded)) as image:
        image.seek(0)
        return image.convert("RGB")


def features(signature: Signature, images: list[bytes]) -> np.ndarray:
    outputs = signature(**{INPUT_KEY: tf.constant(images, dtype=tf.string)})
    return outputs[OUTPUT_KEY].numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def tiny_backbone(normalize: Callable[[tf.Tensor], tf.Tensor] | None = None) -> Backbone:
    """A 4-feature conv net: exports in about a second, enough to check the folder logic."""
    inputs = keras.Input((16, 16, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    return Backbone(
        name="tiny",
        model=keras.Model(inputs, pooled),
        input_size=16,
        feature_dim=4,
        normalize=normalize or (lambda images: images / 255.0),
        weights="random",
    )


def staging_leftovers(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.glob(".export-*"))


def run_cli(
    *args: str, home: Path, python_flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`python -m export ARGS` with an empty HOME and KERAS_HOME, so no weights are cached."""
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(home), "KERAS_HOME": str(home / ".keras"), **NO_NETWORK}
    return subprocess.run(
        [sys.executable, *python_flags, "-m", "export", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def assert_no_version_written(base: Path) -> None:
    """At most empty folders under `base`: no numbered version, no file, no staging leftovers."""
    written = sorted(base.rglob("*")) if base.exists() else []
    assert [p for p in written if p.is_file()] == []
    assert [p for p in written if p.name.isdigit() or p.name.startswith(".export-")] == []


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0_loaded(exported_model: ExportedModel) -> tf.Module:
    # Held for the whole module: the loaded object owns the variables the signature reads.
    return tf.saved_model.load(str(exported_model.path))


@pytest.fixture(scope="module")
def lite0(lite0_loaded: tf.Module) -> Signature:
    """The exported Lite0's `serving_default`, loaded as any TF client would."""
    return lite0_loaded.signatures[SIGNATURE]


@pytest.fixture(scope="module")
def distinct_images() -> list[bytes]:
    """Five different images (content, size, format), so batch neighbours really differ."""
    photo = samples.photo()
    return [
        samples.jpeg((160, 120)),
        png(samples.photo((64, 200))),
        png(ImageOps.invert(photo)),
        samples.encode(samples.photo((300, 300)).rotate(90), "BMP"),
        png(photo.convert("L")),
    ]


@pytest.fixture(scope="module")
def format_features(lite0: Signature) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (features of the encoded image, features of Pillow's decode of it sent as PNG).

    Converting to RGB in Pillow drops alpha and replicates gray, which is what the graph is
    meant to do too. One batch each way keeps this to two calls.
    """
    images = samples.good_images()
    names_ = sorted(images)
    got = features(lite0, [images[n] for n in names_])
    want = features(lite0, [png(pillow_rgb(images[n])) for n in names_])
    return {n: (got[i], want[i]) for i, n in enumerate(names_)}


@pytest.fixture(scope="module")
def inception_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[keras.Model, Path]:
    """A randomly initialised Inception v3 and its weights saved to a local file."""
    model = keras.applications.InceptionV3(
        include_top=False, weights=None, pooling="avg", input_shape=(299, 299, 3)
    )
    # Keras 3's save_weights refuses any name that does not end in `.weights.h5`.
    path = tmp_path_factory.mktemp("inception_weights") / "inception.weights.h5"
    model.save_weights(str(path))
    return model, path


@pytest.fixture(scope="module")
def inception_random(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    return export_backbone(
        build_backbone("inception_v3", "random"), tmp_path_factory.mktemp("inception_random")
    )


@pytest.fixture(scope="module")
def inception_from_file(
    tmp_path_factory: pytest.TempPathFactory, inception_reference: tuple[keras.Model, Path]
) -> ExportedModel:
    _, path = inception_reference
    return export_backbone(
        build_backbone("inception_v3", str(path)), tmp_path_factory.mktemp("inception_file")
    )


# --- 1. layout and version numbering -------------------------------------------------------------


def test_every_exported_file_is_readable_by_other_users(exported_model: ExportedModel) -> None:
    # TF Serving runs as another (non-root) user than the export job.
    for path in (exported_model.path, *exported_model.path.rglob("*")):
        wanted = 0o755 if path.is_dir() else 0o644
        assert path.stat().st_mode & 0o777 == wanted, path


def test_warmup_covers_every_allowed_batch_size() -> None:
    from export.savedmodel import WARMUP_BATCH_SIZES

    config = (ROOT / "deploy/k8s/base/tfserving/batching.config").read_text()
    allowed = [int(n) for n in re.findall(r"^allowed_batch_sizes:\s*(\d+)", config, re.M)]
    assert list(WARMUP_BATCH_SIZES) == allowed


def test_version_folder_has_tf_serving_layout(exported_model: ExportedModel) -> None:
    model_dir = exported_model.path.parent
    assert exported_model.version == 1
    assert exported_model.path == model_dir / "1"
    assert model_dir.name == exported_model.model_name == "efficientnet_lite0"
    version_dir = exported_model.path
    assert (version_dir / "saved_model.pb").is_file()
    assert (version_dir / "variables").is_dir()
    assert (version_dir / "variables" / "variables.index").is_file()
    assert (version_dir / WARMUP_FILE).is_file()
    assert WARMUP_FILE == "assets.extra/tf_serving_warmup_requests"
    assert (version_dir / MODEL_INFO_FILE).is_file()
    assert MODEL_INFO_FILE == "assets.extra/matcher_model.json"
    # The staging folder was renamed into place: only the version remains.
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]


def test_metadata_describes_the_backbone(exported_model: ExportedModel) -> None:
    info = read_model_info(exported_model.path)
    assert info == exported_model.info
    assert (info.backbone, info.input_size, info.feature_dim) == (
        "efficientnet_lite0",
        224,
        LITE0_DIM,
    )
    assert info.weights.startswith("imagenet:")
    assert (info.signature, info.input_key, info.output_key) == (SIGNATURE, INPUT_KEY, OUTPUT_KEY)


def test_versions_count_up_from_one(tmp_path: Path) -> None:
    backbone = tiny_backbone()
    first = export_backbone(backbone, tmp_path)
    second = export_backbone(backbone, tmp_path)
    assert (first.version, second.version) == (1, 2)
    assert second.path == tmp_path / "tiny" / "2"
    assert versions(tmp_path / "tiny") == [1, 2]
    assert staging_leftovers(tmp_path / "tiny") == []
    # An explicit version may skip ahead; the next default continues from the highest.
    assert export_backbone(backbone, tmp_path, version=7).version == 7
    assert export_backbone(backbone, tmp_path).version == 8
    assert export_backbone(backbone, tmp_path, model_name="other").path == tmp_path / "other" / "1"


def test_existing_version_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    backbone = tiny_backbone()
    existing = export_backbone(backbone, tmp_path)
    before = {p: p.read_bytes() for p in existing.path.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="already exists"):
        export_backbone(backbone, tmp_path, version=1)
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["1"]
    assert {p: p.read_bytes() for p in existing.path.rglob("*") if p.is_file()} == before


def test_failed_export_leaves_no_staging_folder(tmp_path: Path) -> None:
    def broken(images: tf.Tensor) -> tf.Tensor:
        raise RuntimeError("normalisation failed while tracing")

    with pytest.raises(RuntimeError, match="while tracing"):
        export_backbone(tiny_backbone(broken), tmp_path)
    # TF Serving must never see a half-written version, nor a staging folder piling up.
    assert_no_version_written(tmp_path)


# --- 1b. the integrity manifest ------------------------------------------------------------------


def test_the_manifest_lists_every_file_of_the_version(exported_model: ExportedModel) -> None:
    manifest = verify(exported_model.path, "savedmodel")
    files = {
        p.relative_to(exported_model.path).as_posix()
        for p in exported_model.path.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE
    }
    assert set(manifest.files) == files
    assert {"saved_model.pb", "variables/variables.index", WARMUP_FILE, MODEL_INFO_FILE} <= files
    assert (manifest.kind, manifest.tool) == ("savedmodel", "export")


def test_a_tampered_version_is_refused_by_the_embedded_backend(tmp_path: Path) -> None:
    exported = export_backbone(tiny_backbone(), tmp_path)
    EmbeddedBackend(exported.path.parent).load()  # as exported: loads
    shard = next((exported.path / "variables").glob("variables.data-*"))
    recorded = read_manifest(exported.path).files[f"variables/{shard.name}"].sha256
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(ModelLoadError) as caught:
        EmbeddedBackend(exported.path.parent).load()
    message = str(caught.value)
    assert str(shard) in message and recorded in message and actual in message
    assert "refusing to load the SavedModel" in message


def test_an_added_variables_shard_is_refused_by_the_embedded_backend(tmp_path: Path) -> None:
    exported = export_backbone(tiny_backbone(), tmp_path)
    (exported.path / "variables" / "variables.data-00001-of-00002").write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError, match=r"variables\.data-00001-of-00002 is not listed"):
        EmbeddedBackend(exported.path.parent).load()


def test_a_version_without_manifest_is_refused_until_one_is_written(tmp_path: Path) -> None:
    exported = export_backbone(tiny_backbone(), tmp_path)
    (exported.path / MANIFEST_FILE).unlink()
    backend = EmbeddedBackend(exported.path.parent)
    with pytest.raises(
        ModelLoadError, match=re.escape(f"python -m integrity write {exported.path}`")
    ):
        backend.load()
    assert not backend.ready
    write_manifest(exported.path)  # what the operator runs after checking the files
    backend.load()
    assert backend.info.version == exported.version


# --- 2. the serving signature --------------------------------------------------------------------


def test_signature_takes_a_string_vector_and_returns_float_features(lite0: Signature) -> None:
    args, kwargs = lite0.structured_input_signature
    assert args == ()
    assert list(kwargs) == [INPUT_KEY]
    spec = kwargs[INPUT_KEY]
    assert spec.dtype == tf.string
    assert spec.shape.as_list() == [None]
    outputs = lite0.structured_outputs
    assert list(outputs) == [OUTPUT_KEY]
    assert outputs[OUTPUT_KEY].dtype == tf.float32
    assert outputs[OUTPUT_KEY].shape.as_list() == [None, LITE0_DIM]


def test_batches_of_one_and_five(lite0: Signature, distinct_images: list[bytes]) -> None:
    batch = features(lite0, distinct_images)
    assert batch.shape == (5, LITE0_DIM)
    assert batch.dtype == np.float32
    alone = np.concatenate([features(lite0, [image]) for image in distinct_images])
    assert alone.shape == (5, LITE0_DIM)
    # An image's features must not depend on what else is in the batch...
    np.testing.assert_allclose(batch, alone, rtol=0, atol=1e-5)
    # ...and the images really are different, so the check above means something.
    spread = [np.abs(batch[i] - batch[j]).max() for i in range(5) for j in range(i + 1, 5)]
    assert min(spread) > 1e-2


def test_batch_order_does_not_matter(lite0: Signature, distinct_images: list[bytes]) -> None:
    forward = features(lite0, distinct_images)
    backward = features(lite0, distinct_images[::-1])[::-1]
    np.testing.assert_allclose(forward, backward, rtol=0, atol=1e-5)


# --- 3. warmup records ---------------------------------------------------------------------------


def test_warmup_records_are_predict_requests_that_replay(
    exported_model: ExportedModel, lite0: Signature
) -> None:
    path = exported_model.path / WARMUP_FILE
    records = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
    assert records
    sizes = []
    for record in records:
        log = prediction_log_pb2.PredictionLog.FromString(record)
        assert log.WhichOneof("log_type") == "predict_log"
        request = log.predict_log.request
        assert request.model_spec.name == exported_model.model_name
        assert request.model_spec.signature_name == SIGNATURE
        assert list(request.inputs) == [INPUT_KEY]
        tensor = request.inputs[INPUT_KEY]
        assert tensor.dtype == types_pb2.DT_STRING
        assert [d.size for d in tensor.tensor_shape.dim] == [len(tensor.string_val)]
        # TensorFlow's own reading of the proto must agree with the fields above.
        images = tf.make_ndarray(tensor)
        assert images.shape == (len(tensor.string_val),)
        replayed = features(lite0, list(images))
        assert replayed.shape == (len(images), LITE0_DIM)
        assert np.isfinite(replayed).all()
        sizes.append(len(images))
    # Both the single-image and a batched path are warmed up.
    assert 1 in sizes
    assert max(sizes) > 1


# --- 4. preprocessing in the graph ---------------------------------------------------------------

LOSSY = {"jpeg", "grayscale_jpeg"}


@pytest.mark.parametrize("name", sorted(samples.good_images()))
def test_every_format_gives_the_features_of_its_pixels(
    name: str, format_features: dict[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    got, want = format_features[name]
    assert got.shape == (LITE0_DIM,)
    assert np.isfinite(got).all()
    if name in LOSSY:
        # libjpeg in TensorFlow and in Pillow may round the IDCT differently.
        assert cosine(got, want) > 0.99
    else:
        # Lossless: the graph decodes exactly the pixels Pillow does (bit-equal features today;
        # the margin is for batch position, as in test_batches_of_one_and_five).
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_formats_agree_with_each_other(
    format_features: dict[str, tuple[np.ndarray, np.ndarray]],
) -> None:
    # PNG, BMP and RGBA hold the same RGB pixels, so they must give the same features.
    png_features = format_features["png"][0]
    for name in ("bmp", "rgba_png"):
        np.testing.assert_allclose(format_features[name][0], png_features, rtol=0, atol=1e-5)


def test_alpha_is_dropped_not_composited(lite0: Signature) -> None:
    rgb = samples.photo()
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))  # from opaque to transparent
    got, want = features(lite0, [png(rgba), png(rgb)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_animated_gif_gives_its_first_frame(lite0: Signature) -> None:
    first = samples.photo().convert("P")
    second = ImageOps.invert(samples.photo()).convert("P")
    buffer = io.BytesIO()
    first.save(buffer, format="GIF", save_all=True, append_images=[second], duration=100)
    gif = buffer.getvalue()
    with Image.open(io.BytesIO(gif)) as check:
        assert check.n_frames == 2
        check.seek(1)
        second_rgb = check.convert("RGB")
    got, want_first, want_second = features(lite0, [gif, png(pillow_rgb(gif)), png(second_rgb)])
    np.testing.assert_allclose(got, want_first, rtol=0, atol=1e-5)
    assert np.abs(got - want_second).max() > 1e-2


# --- 5. Inception v3 -----------------------------------------------------------------------------


def test_inception_random_export(inception_random: ExportedModel) -> None:
    assert inception_random.path == inception_random.path.parent.parent / "inception_v3" / "1"
    assert read_model_info(inception_random.path) == ExportedModelInfo(
        backbone="inception_v3",
        input_size=299,
        feature_dim=2048,
        weights="random",
        layer="mixed10",
        stages=["conv", "conv_1", "mixed_2", "mixed_7"],
    )
    signature = tf.saved_model.load(str(inception_random.path)).signatures[SIGNATURE]
    assert signature.structured_outputs[OUTPUT_KEY].shape.as_list() == [None, 2048]
    out = features(signature, [samples.jpeg(), png(samples.photo((64, 64)))])
    assert out.shape == (2, 2048)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()


def test_inception_local_weights_file_is_used(
    inception_reference: tuple[keras.Model, Path],
    inception_from_file: ExportedModel,
    inception_random: ExportedModel,
) -> None:
    reference, path = inception_reference
    info = read_model_info(inception_from_file.path)
    assert (info.backbone, info.input_size, info.feature_dim) == ("inception_v3", 299, 2048)
    assert info.weights == f"file:{path.name}"

    images = [samples.jpeg(), png(ImageOps.invert(samples.photo((200, 90))))]
    got = features(tf.saved_model.load(str(inception_from_file.path)).signatures[SIGNATURE], images)
    pixels = tf.function(lambda x: inception.normalize(decode_batch(x, inception.INPUT_SIZE)))(
        tf.constant(images)
    )
    want = reference(pixels, training=False).numpy()
    # Randomly initialised features are tiny (~1e-3), so the 1e-4 tolerance is relative.
    scale = float(np.abs(want).max())
    assert scale > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)
    # A model with other random weights is far off: the file really was loaded.
    other = features(tf.saved_model.load(str(inception_random.path)).signatures[SIGNATURE], images)
    assert np.abs(other - want).max() > 1e-2 * scale


def test_inception_loads_the_legacy_h5_format_keras_publishes(
    tmp_path: Path, inception_reference: tuple[keras.Model, Path]
) -> None:
    # The CLI tells offline users to download the published `_notop.h5` and pass it: that file
    # is in Keras' legacy HDF5 layout, which `model.save(".h5")` still writes.
    reference, _ = inception_reference
    legacy = tmp_path / inception.WEIGHTS_FILE
    reference.save(str(legacy))
    backbone = build_backbone("inception_v3", str(legacy))
    assert backbone.weights == f"file:{inception.WEIGHTS_FILE}"
    loaded = backbone.model.get_weights()
    expected = reference.get_weights()
    assert len(loaded) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(loaded, expected, strict=True))


def test_inception_missing_weights_file_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        build_backbone("inception_v3", str(tmp_path / "missing.h5"))


# --- 6 and 7. the command line -------------------------------------------------------------------


def test_cli_without_cached_weights_says_how_to_get_them(tmp_path: Path) -> None:
    base = tmp_path / "base"
    result = run_cli("--backbone", "inception_v3", "--base-path", str(base), home=tmp_path / "h")
    assert result.returncode == 2, result.stderr
    lines = cli_stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("export: error:")
    assert "--weights" in lines[0]
    assert inception.WEIGHTS_FILE in lines[0]
    assert "Traceback" not in result.stderr
    assert_no_version_written(base)
    assert versions(base / "inception_v3") == []


def test_cli_unknown_backbone_names_the_valid_ones(tmp_path: Path) -> None:
    base = tmp_path / "base"
    result = run_cli("--backbone", "nope", "--base-path", str(base), home=tmp_path / "h")
    assert result.returncode == 2, result.stderr
    lines = cli_stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("export: error:")
    assert "'nope'" in lines[0]
    for valid in names():
        assert valid in lines[0]
    assert_no_version_written(base)


def test_cli_missing_weights_file_is_one_line(tmp_path: Path) -> None:
    base = tmp_path / "base"
    result = run_cli(
        "--backbone",
        "inception_v3",
        "--weights",
        "/does/not/exist.h5",
        "--base-path",
        str(base),
        home=tmp_path / "h",
    )
    assert result.returncode == 2, result.stderr
    lines = cli_stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("export: error:")
    assert "/does/not/exist.h5" in lines[0]
    assert_no_version_written(base)


def test_cli_weights_file_of_another_model_is_one_line(tmp_path: Path) -> None:
    base = tmp_path / "base"
    weights = tmp_path / "tiny.weights.h5"
    tiny_backbone().model.save_weights(str(weights))
    result = run_cli(
        "--backbone",
        "inception_v3",
        "--weights",
        str(weights),
        "--base-path",
        str(base),
        home=tmp_path / "h",
    )
    assert result.returncode == 2, result.stderr
    assert_no_version_written(base)
    lines = cli_stderr_lines(result)
    assert len(lines) == 1, f"{len(lines)} lines: {lines[:3]}"
    assert lines[0].startswith("export: error: cannot load weights from")


def test_cli_efficientnet_refuses_a_weights_file(tmp_path: Path) -> None:
    base = tmp_path / "base"
    weights = tmp_path / "somefile.h5"
    weights.write_bytes(b"not used")
    result = run_cli(
        "--backbone",
        "efficientnet_lite0",
        "--weights",
        str(weights),
        "--base-path",
        str(base),
        home=tmp_path / "h",
    )
    assert result.returncode == 2, result.stderr
    lines = cli_stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("export: error:")
    assert "imagenet" in lines[0]
    assert "random" in lines[0]
    assert_no_version_written(base)


def test_efficientnet_refuses_a_weights_file_in_python() -> None:
    with pytest.raises(ExportError, match="imagenet or random"):
        build_backbone("efficientnet_lite0", "somefile")


def test_cli_if_missing_does_nothing_when_a_version_exists(tmp_path: Path) -> None:
    base = tmp_path / "base"
    version_dir = base / "efficientnet_lite0" / "3"
    version_dir.mkdir(parents=True)
    (version_dir / "saved_model.pb").write_bytes(b"placeholder")
    # -X importtime lists every module imported: it shows TensorFlow was never loaded, which
    # is what makes --if-missing quick (and proves nothing was exported).
    result = run_cli(
        "--if-missing",
        "--base-path",
        str(base),
        home=tmp_path / "h",
        python_flags=("-X", "importtime"),
    )
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()]
    assert "tensorflow" not in imported
    assert "keras" not in imported
    assert sorted(p.relative_to(base).as_posix() for p in base.rglob("*")) == [
        "efficientnet_lite0",
        "efficientnet_lite0/3",
        "efficientnet_lite0/3/saved_model.pb",
    ]
