"""Write a backbone as a TensorFlow SavedModel in TensorFlow Serving's layout.

`<base>/<model_name>/<version>/` holds `saved_model.pb`, `variables/`, the TF Serving warmup
requests, our metadata and `manifest.json` (every other file's sha256, see
`integrity.manifest`). The `serving_default` signature maps a 1-D batch of encoded images
(`images`, tf.string) to `features` (float32 [N, D]); decoding and resizing live in the graph.
`openvino/` holds the same network for the fast engine (`export.openvino_model`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from export.openvino_model import write_openvino_model
from integrity.manifest import write_manifest
from matcher.backbones.builder import Backbone
from matcher.backends.tfs_api import load_api
from matcher.backends.tfserving_protos import predict_request
from matcher.layout import (
    FEATURE_MAPS_SIGNATURE,
    INPUT_KEY,
    MODEL_INFO_FILE,
    OUTPUT_KEY,
    SIGNATURE,
    WARMUP_FILE,
    ExportedModelInfo,
    versions,
)
from matcher.preprocess import decode_batch

#: Batch sizes replayed at load time: TF Serving's allowed_batch_sizes in
#: deploy/k8s/base/tfserving/batching.config, so no batch shape is first seen by a client.
WARMUP_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class ExportedModel:
    """Where a SavedModel version was written and what it holds."""

    path: Path
    model_name: str
    version: int
    info: ExportedModelInfo


class FeatureModule(tf.Module):
    """Encoded images in, pooled backbone features out."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__(name=backbone.name)
        self.model = backbone.model
        self.stages = backbone.stages
        self._size = backbone.input_size
        self._normalize = backbone.normalize
        if backbone.stages is not None:
            # Only a backbone with stages gets the signature (saving traces every tf.function).
            self.feature_maps = tf.function(
                self._feature_maps,
                input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_KEY)],
            )

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_KEY)])
    def serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        pixels = self._normalize(decode_batch(images, self._size))
        features = tf.cast(self.model(pixels, training=False), tf.float32)
        return {OUTPUT_KEY: features}

    def _feature_maps(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        assert self.stages is not None, "traced only for a backbone with stages (see __init__)"
        pixels = self._normalize(decode_batch(images, self._size))
        maps = self.stages(pixels, training=False)
        return {f"stage{i}": tf.cast(m, tf.float32) for i, m in enumerate(maps, start=1)}

    def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
        signatures = {SIGNATURE: self.serve}
        if self.stages is not None:
            signatures[FEATURE_MAPS_SIGNATURE] = self.feature_maps
        return signatures


def export_backbone(
    backbone: Backbone,
    base_path: Path,
    model_name: str | None = None,
    version: int | None = None,
) -> ExportedModel:
    """Export `backbone` to `<base_path>/<model_name>/<version>/` and return where it went.

    The version defaults to one above the highest present. The folder is written under a
    temporary name, its manifest last, and renamed at the end, so TF Serving never sees a
    half-written version and the matcher never a version without its manifest.
    """
    name = model_name or backbone.name
    model_dir = base_path / name
    existing = versions(model_dir)
    version = version if version is not None else (existing[-1] + 1 if existing else 1)
    final = model_dir / str(version)
    if final.exists():
        raise FileExistsError(f"{final} already exists; choose another --version")
    model_dir.mkdir(parents=True, exist_ok=True)
    info = ExportedModelInfo(
        backbone=backbone.name,
        input_size=backbone.input_size,
        feature_dim=backbone.feature_dim,
        weights=backbone.weights,
        layer=backbone.layer,
        stages=list(backbone.stage_names),
        precision=backbone.precision,
    )
    staging = Path(tempfile.mkdtemp(prefix=f".export-{version}-", dir=model_dir))
    try:
        module = FeatureModule(backbone)
        tf.saved_model.save(module, str(staging), signatures=module.signatures())
        _write_assets_extra(staging, name, info)
        write_openvino_model(backbone, staging)
        # Last, so it covers every file: the service refuses a version that differs from it.
        write_manifest(staging, tool="export", kind="savedmodel")
        _make_readable(staging)
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportedModel(final, name, version, info)


def _make_readable(root: Path) -> None:
    """Let any user read the version (mkdtemp makes it 0700; TF Serving runs as another uid)."""
    for path in (root, *root.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _write_assets_extra(version_dir: Path, model_name: str, info: ExportedModelInfo) -> None:
    (version_dir / MODEL_INFO_FILE).parent.mkdir(parents=True, exist_ok=True)
    (version_dir / MODEL_INFO_FILE).write_text(info.to_json())
    with tf.io.TFRecordWriter(str(version_dir / WARMUP_FILE)) as writer:
        for log in warmup_logs(model_name, info.input_size):
            writer.write(log.SerializeToString())


def warmup_logs(model_name: str, size: int) -> list[prediction_log_pb2.PredictionLog]:
    """PredictionLog records of real encoded images, one per warmup batch size."""
    # A smooth gradient: a real JPEG of the input size that stays small in the file.
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    image = np.stack([*np.meshgrid(ramp, ramp[::-1]), np.full((size, size), 128.0)], axis=-1)
    jpeg = tf.io.encode_jpeg(image.astype(np.uint8)).numpy()
    api = load_api()
    logs = []
    for batch in WARMUP_BATCH_SIZES:
        log = prediction_log_pb2.PredictionLog()
        # Same wire format: the request built for serving is the one TF Serving replays.
        request = predict_request(api, model_name, [jpeg] * batch)
        log.predict_log.request.ParseFromString(request.SerializeToString())
        logs.append(log)
    return logs
