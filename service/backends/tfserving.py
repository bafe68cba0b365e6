"""The `tfserving` feature backend: TensorFlow Serving's PredictionService over gRPC.

One long-lived channel; a deadline on every call. Start-up checks, retries and health
following the backend are tracked in the TF Serving issue.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
import numpy as np
from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

from export.layout import INPUT_KEY, OUTPUT_KEY, SIGNATURE
from service.backends.tfserving_protos import features_from_response, predict_request
from service.domain import BackboneInfo
from service.errors import (
    BackendUnavailableError,
    InvalidImageError,
    ModelLoadError,
    NotReadyError,
)

log = logging.getLogger(__name__)

_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class TFServingBackend:
    """Asks TF Serving at `target` for the features of model `model_name`."""

    kind = "tfserving"

    def __init__(
        self,
        target: str,
        model_name: str,
        version: int | None = None,
        timeout_s: float = 10.0,
        max_message_bytes: int = 64 << 20,
    ) -> None:
        self._target = target
        self._model_name = model_name
        self._version = version
        self._timeout_s = timeout_s
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._info: BackboneInfo | None = None

    def load(self) -> None:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = self._model_name
        if self._version is not None:
            request.model_spec.version.value = self._version
        try:
            response = self._stub.GetModelMetadata(request, timeout=self._timeout_s)
        except grpc.RpcError as exc:
            raise ModelLoadError(
                f"TF Serving at {self._target} has no usable model {self._model_name!r}: "
                f"{exc.code().name}: {exc.details()}"
            ) from exc
        self._info = _backbone_info(self._model_name, response)
        log.info("TF Serving %s serves %s", self._target, self._info)

    @property
    def ready(self) -> bool:
        return self._info is not None

    @property
    def info(self) -> BackboneInfo:
        if self._info is None:
            raise NotReadyError("the feature backend is not connected yet")
        return self._info

    def features(self, images: Sequence[bytes]) -> np.ndarray:
        if self._info is None:
            raise NotReadyError("the feature backend is not connected yet")
        request = predict_request(self._model_name, images, self._version)
        try:
            response = self._stub.Predict(request, timeout=self._timeout_s)
        except grpc.RpcError as exc:
            if exc.code() in _UNREACHABLE:
                raise BackendUnavailableError(
                    f"TF Serving at {self._target}: {exc.code().name}"
                ) from exc
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidImageError(f"image could not be decoded: {exc.details()}") from exc
            raise
        return features_from_response(response)

    def close(self) -> None:
        self._channel.close()


def _backbone_info(
    model_name: str, response: get_model_metadata_pb2.GetModelMetadataResponse
) -> BackboneInfo:
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def.get(SIGNATURE)
    if signature is None or INPUT_KEY not in signature.inputs:
        raise ModelLoadError(f"model {model_name!r} has no {SIGNATURE} signature taking images")
    output = signature.outputs.get(OUTPUT_KEY)
    if output is None or len(output.tensor_shape.dim) != 2:
        raise ModelLoadError(f"model {model_name!r} does not return [N, D] features")
    feature_dim = output.tensor_shape.dim[1].size
    version = response.model_spec.version.value
    # TF Serving's metadata does not carry the input size; 0 means "not reported".
    return BackboneInfo(model_name, version, 0, feature_dim)
