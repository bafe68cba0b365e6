"""The engines of the embedded backend: OpenVINO (the default) against TensorFlow's SavedModel.

The accuracy guard: on real photos, every image's features from the openvino engine (the
network converted at export, decoding and resizing in Python, `matcher.pixels`) have a cosine
similarity of at least 0.999 with `serving_default`'s (the graph TF Serving runs), and the demo
queries get the same top-1 label from both, so a classifier trained with one engine serves
with the other and with TF Serving.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

from bench.openvino_bf16 import package_photos
from matcher.backends import openvino_engine
from matcher.backends.embedded import EmbeddedBackend
from matcher.classifier import Classifier
from matcher.errors import ModelLoadError
from matcher.layout import OPENVINO_MODEL_FILE
from tests import samples
from tests.conftest import outside_queries, query_images

ROOT = Path(__file__).resolve().parent.parent
#: The guard's bound, per image (issue 12).
MIN_COSINE = 0.999


@pytest.fixture(scope="module")
def tensorflow_backend(exported_model) -> EmbeddedBackend:
    backend = EmbeddedBackend(exported_model.path.parent, engine="tensorflow")
    backend.load()
    return backend


@pytest.fixture(scope="module")
def openvino_backend(exported_model) -> EmbeddedBackend:
    backend = EmbeddedBackend(exported_model.path.parent, engine="openvino")
    backend.load()
    return backend


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_the_default_engine_is_openvino_where_the_export_wrote_its_model(
    exported_model, embedded_backend
) -> None:
    assert (exported_model.path / OPENVINO_MODEL_FILE).is_file()
    manifest = (exported_model.path / "manifest.json").read_text()
    assert "openvino/model.xml" in manifest and "openvino/model.bin" in manifest
    assert embedded_backend.info.engine == "openvino"
    assert embedded_backend.info.precision == "fp32"


def test_guard_package_photos_give_the_same_features_in_both_engines(
    tensorflow_backend, openvino_backend
) -> None:
    photos = package_photos()
    assert len(photos) >= 25, photos  # PNG and JPEG, grey and colour, 102 to 1411 px
    images = [p.read_bytes() for p in photos]
    reference = np.concatenate([tensorflow_backend.features([image]) for image in images])
    fast = openvino_backend.features(images)  # one batch: decoded in parallel
    found = cosines(reference, fast)
    worst = int(np.argmin(found))
    print(f"package photos: {len(images)}, min cosine {found.min():.7f} ({photos[worst].name})")
    assert found.min() >= MIN_COSINE, photos[worst]


def test_guard_demo_queries_get_the_same_features_and_top1_in_both_engines(
    demo, trained, tensorflow_backend, openvino_backend
) -> None:
    paths = [path for _, path in query_images(demo)] + outside_queries(demo)
    images = [p.read_bytes() for p in paths]
    reference = tensorflow_backend.features(images)
    fast = openvino_backend.features(images)
    found = cosines(reference, fast)
    print(f"demo queries: {len(images)}, min cosine {found.min():.7f}")
    assert found.min() >= MIN_COSINE, paths[int(np.argmin(found))]
    classifier = Classifier.load(trained.classifier_path)
    top1 = [np.argmax(classifier.rank(f)[0], axis=1) for f in (reference, fast)]
    differ = [p.name for p, a, b in zip(paths, *top1, strict=True) if a != b]
    assert not differ, differ


def test_every_accepted_format_and_colour_layout_decodes_alike(
    tensorflow_backend, openvino_backend
) -> None:
    # GIF (palette), BMP, grey and RGBA PNG, grey JPEG: channels=3 in the graph, RGB in Pillow.
    images = list(samples.good_images().values())
    # A 16-bit grey PNG (medical and scientific cameras): the graph keeps each sample's high
    # byte, where Pillow's own conversion would clip at 255.
    ramp = np.linspace(0, 65535, 160 * 120).reshape(120, 160).astype(np.uint16)
    images.append(samples.encode(Image.fromarray(ramp), "PNG"))
    found = cosines(
        np.concatenate([tensorflow_backend.features([i]) for i in images]),
        openvino_backend.features(images),
    )
    assert found.min() >= MIN_COSINE, found


def phone_sized_jpegs() -> list[bytes]:
    """Real photos enlarged to phone-camera sizes: each decodes at a reduced DCT scale."""
    photos = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea()]
    sizes = [(4032, 3024), (1920, 1080), (1280, 960)]
    return [
        samples.encode(Image.fromarray(photo).resize(size), "JPEG", quality=92)
        for photo, size in zip(photos, sizes, strict=True)
    ]


def test_large_jpegs_decode_at_the_same_reduced_scale_in_both_engines(
    tensorflow_backend, openvino_backend
) -> None:
    from matcher.pixels import jpeg_scale

    assert [jpeg_scale(w, h, 224) for w, h in ((4032, 3024), (1920, 1080), (1280, 960))] == [
        4,
        2,
        2,
    ]
    assert jpeg_scale(640, 480, 224) == 1  # under 4x the input: decoded whole
    images = phone_sized_jpegs()
    found = cosines(
        np.concatenate([tensorflow_backend.features([i]) for i in images]),
        openvino_backend.features(images),
    )
    assert found.min() >= MIN_COSINE, found


def test_a_reduced_scale_decode_keeps_the_features_of_a_full_decode(openvino_backend) -> None:
    from matcher.pixels import decode, resize

    runner = openvino_backend.runner
    for image in phone_sized_jpegs():
        full = runner.run(resize(decode(image), 224)[None])
        scaled = runner.run(resize(decode(image, 224), 224)[None])
        assert decode(image, 224).width < decode(image).width  # it did decode smaller
        assert cosines(full, scaled)[0] >= MIN_COSINE


def test_a_bad_image_is_invalid_argument_in_the_openvino_engine_too(openvino_backend) -> None:
    from matcher.errors import InvalidImageError

    with pytest.raises(InvalidImageError, match="could not be decoded"):
        openvino_backend.features([samples.jpeg()[:200]])


def test_a_version_without_its_openvino_model(exported_model, tmp_path) -> None:
    import shutil

    from integrity.manifest import write_manifest

    version = tmp_path / "lite0" / "1"
    shutil.copytree(exported_model.path, version)
    shutil.rmtree(version / "openvino")
    write_manifest(version, tool="export", kind="savedmodel")  # an older export: no openvino/
    with pytest.raises(ModelLoadError, match=r"no OpenVINO model.*--engine tensorflow"):
        EmbeddedBackend(version.parent, engine="openvino").load()
    auto = EmbeddedBackend(version.parent)
    auto.load()
    assert auto.info.engine == "tensorflow"


def test_a_changed_openvino_model_is_refused_before_it_is_read(exported_model, tmp_path) -> None:
    import shutil

    version = tmp_path / "lite0" / "1"
    shutil.copytree(exported_model.path, version)
    weights = version / "openvino" / "model.bin"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0xFF  # one weight changed after export
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"openvino/model\.bin"):
        EmbeddedBackend(version.parent, engine="openvino").load()


def test_bf16_runs_only_where_the_cpu_computes_it(exported_model) -> None:
    backend = EmbeddedBackend(exported_model.path.parent, engine="openvino", precision="bf16")
    if not openvino_engine.cpu_has_bf16():
        with pytest.raises(ModelLoadError, match="AVX512_BF16 or AMX"):
            backend.load()
        auto = EmbeddedBackend(exported_model.path.parent, precision="auto")
        auto.load()
        assert auto.info.precision == "fp32"
        return
    backend.load()
    assert backend.info.precision == "bf16"
    # auto stays fp32 even here (matcher.backends.openvino_engine's docstring).
    auto = EmbeddedBackend(exported_model.path.parent, precision="auto")
    auto.load()
    assert auto.info.precision == "fp32"
    # By name, the mixed network (a float32 head, a bf16 tail) keeps the guard.
    photos = package_photos()
    reference = EmbeddedBackend(exported_model.path.parent, engine="tensorflow")
    reference.load()
    images = [p.read_bytes() for p in photos]
    found = cosines(reference.features(images), backend.features(images))
    print(f"bf16: min cosine {found.min():.5f} (the guard asks {MIN_COSINE})")
    worst = {p.name: round(float(c), 5) for p, c in zip(photos, found, strict=True) if c < 0.9995}
    assert found.min() >= MIN_COSINE, worst


def test_a_network_is_cut_where_no_residual_connection_crosses(exported_model) -> None:
    import openvino as ov

    path = exported_model.path / OPENVINO_MODEL_FILE
    head, tail, cut = openvino_engine.split_network(path, openvino_engine.FP32_CONVOLUTIONS)
    assert cut >= openvino_engine.FP32_CONVOLUTIONS
    kinds = ("Convolution", "GroupConvolution")
    assert sum(op.get_type_name() in kinds for op in head.get_ops()) == cut
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    core, f32 = ov.Core(), {"INFERENCE_PRECISION_HINT": "f32"}  # (bf16 is the CPU's default)
    whole = core.compile_model(str(path), "CPU", f32)([pixels])[0]
    middle = core.compile_model(head, "CPU", f32)([pixels])[0]
    assert np.allclose(core.compile_model(tail, "CPU", f32)([middle])[0], whole, atol=1e-4)
    with pytest.raises(ValueError, match="no clean cut"):
        openvino_engine.split_network(path, 10_000)


def test_the_openvino_engine_serves_without_importing_tensorflow(settings) -> None:
    # The core a real server builds from its settings, loaded and answering one photo.
    program = f"""
import asyncio, sys
from pathlib import Path
from service.config import Settings
from matcher.factory import make_core
import service.server
settings = Settings(model_dir=Path({str(settings.model_dir)!r}),
                    classifier=Path({str(settings.classifier)!r}))
core = make_core(settings)
core.load()
photo = Path({str(ROOT / "deploy/ghz/chelsea.jpg")!r}).read_bytes()
result = asyncio.run(core.match(photo, top_k=1))
assert result.matches, result
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
print("engine:", core.describe().backbone.engine, "heavy:", heavy)
"""
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "engine: openvino heavy: []"
