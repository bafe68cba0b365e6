"""The `tfserving` feature backend: TensorFlow Serving's PredictionService over gRPC.

One long-lived channel for the process. Retries (only on UNAVAILABLE, bounded, with
exponential backoff) and round-robin over every address a `dns:///` target resolves to are
gRPC's own, set by the channel's service config. Every call has a deadline. TensorFlow is
never imported: the messages come from `tfs_api`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from matcher.backends import tfs_api
from matcher.backends.base import PreparedModel
from matcher.backends.tf_messages import invalid_argument_error
from matcher.backends.tfserving_protos import (
    features_from_response,
    predict_request,
    set_model_spec,
)
from matcher.domain import BackboneInfo
from matcher.errors import (
    BackendUnavailableError,
    ModelLoadError,
    NotReadyError,
)
from matcher.layout import INPUT_KEY, OUTPUT_KEY, SIGNATURE

log = logging.getLogger(__name__)

#: Statuses that mean "TF Serving is not there right now", as opposed to "it said no".
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
#: gRPC waits longer and longer between reconnection attempts (up to 120 s by default), so after
#: a long outage the matcher would notice TF Serving's return minutes late. One attempt a second
#: per address is cheap and brings service back within about a second of TF Serving's return.
MAX_RECONNECT_BACKOFF_MS = 1000


@dataclass(frozen=True)
class TFServingOptions:
    """Where the model is and how to call it."""

    target: str
    model_name: str
    version: int | None = None
    version_label: str | None = None
    signature: str = SIGNATURE
    timeout_s: float = 10.0
    #: Attempts per call, the first included; gRPC retries only UNAVAILABLE answers.
    max_attempts: int = 3
    max_message_bytes: int = 64 << 20
    descriptors: Path | None = None


def service_config(max_attempts: int) -> str:
    """gRPC service config: round-robin over resolved addresses, retry UNAVAILABLE only."""
    retry = {
        "maxAttempts": max(2, max_attempts),
        "initialBackoff": "0.05s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if max_attempts > 1:
        config["methodConfig"] = [
            {
                "name": [
                    {"service": "tensorflow.serving.PredictionService"},
                    {"service": "tensorflow.serving.ModelService"},
                ],
                "retryPolicy": retry,
            }
        ]
    return json.dumps(config)


class TFServingBackend:
    """Asks TF Serving for the features of one model."""

    kind = "tfserving"

    def __init__(self, options: TFServingOptions) -> None:
        self._options = options
        self._api = tfs_api.load_api(options.descriptors)
        self._channel = grpc.insecure_channel(
            options.target,
            options=[
                ("grpc.max_send_message_length", options.max_message_bytes),
                ("grpc.max_receive_message_length", options.max_message_bytes),
                ("grpc.service_config", service_config(options.max_attempts)),
                ("grpc.enable_retries", 1),
                ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            ],
        )
        api = self._api
        self._predict = self._channel.unary_unary(
            tfs_api.PREDICT, api.PredictRequest.SerializeToString, api.PredictResponse.FromString
        )
        self._metadata = self._channel.unary_unary(
            tfs_api.GET_MODEL_METADATA,
            api.GetModelMetadataRequest.SerializeToString,
            api.GetModelMetadataResponse.FromString,
        )
        self._status = self._channel.unary_unary(
            tfs_api.GET_MODEL_STATUS,
            api.GetModelStatusRequest.SerializeToString,
            api.GetModelStatusResponse.FromString,
        )
        self._info: BackboneInfo | None = None

    def load(self) -> None:
        """Check that the model is AVAILABLE and its signature fits; remember what it serves.

        Raises BackendUnavailableError while TF Serving cannot be reached (the caller retries)
        and ModelLoadError when it answers but the model does not fit.
        """
        self.activate(self.prepare())

    def candidate(self) -> Hashable | None:
        """TF Serving's newest AVAILABLE version, when it is not the one described now.

        TF Serving loads and unloads versions itself; the matcher only follows, so that its
        answers name the version that computed them and a new feature size is caught.
        """
        version = self._available_version()
        if self._info is not None and self._info.version == version:
            return None
        return version

    def prepare(self) -> PreparedModel:
        info = self._signature_info(self._available_version())
        log.info(
            "TF Serving %s serves %s version %d (%d features)",
            self._options.target,
            info.name,
            info.version,
            info.feature_dim,
        )
        return PreparedModel(info)

    def activate(self, prepared: PreparedModel) -> None:
        self._info = prepared.info

    def check(self) -> None:
        """Raise BackendUnavailableError unless the model is still AVAILABLE."""
        self._available_version()

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
        options = self._options
        # Unpinned, TF Serving would answer with its newest version, which may not be the
        # one the classifier was checked against and the answer names: ask for that one.
        # A newer version is followed by hot reload (candidate/prepare/activate).
        version = options.version
        if version is None and options.version_label is None:
            version = self._info.version
        request = predict_request(
            self._api,
            options.model_name,
            images,
            version,
            options.version_label,
            options.signature,
        )
        return features_from_response(self._call(self._predict, request, "Predict"))

    def close(self) -> None:
        self._channel.close()

    def _call(self, rpc: grpc.UnaryUnaryMultiCallable[Any, Any], request: Any, method: str) -> Any:
        """One RPC with the configured deadline, its failure mapped to a core error."""
        try:
            return rpc(request, timeout=self._options.timeout_s)
        except grpc.RpcError as exc:
            raise self._error(exc, method) from exc

    def _error(self, exc: grpc.RpcError, method: str) -> Exception:
        code = exc.code()
        where = f"TF Serving {self._options.target} {method}"
        if code in UNREACHABLE:
            return BackendUnavailableError(f"{where}: {code.name}")
        details = exc.details() or ""
        if method == "Predict" and code == grpc.StatusCode.INVALID_ARGUMENT:
            return invalid_argument_error(details, where)
        # The model went away (NOT_FOUND) or no longer fits (a wrong key or dtype): this
        # matcher cannot answer until the deployment is fixed.
        return ModelLoadError(f"{where}: {code.name}: {_first_line(details)}")

    def _available_version(self) -> int:
        options = self._options
        request = self._api.GetModelStatusRequest()
        set_model_spec(
            request.model_spec, options.model_name, options.version, options.version_label
        )
        response = self._call(self._status, request, "GetModelStatus")
        available = [
            s.version for s in response.model_version_status if s.state == self._api.AVAILABLE
        ]
        if not available:
            states = {s.version: s.state for s in response.model_version_status}
            raise ModelLoadError(
                f"model {options.model_name!r} has no AVAILABLE version in TF Serving "
                f"{options.target} (states {states})"
            )
        return int(max(available))

    def _signature_info(self, version: int) -> BackboneInfo:
        options = self._options
        request = self._api.GetModelMetadataRequest(metadata_field=["signature_def"])
        set_model_spec(
            request.model_spec, options.model_name, options.version, options.version_label
        )
        response = self._call(self._metadata, request, "GetModelMetadata")
        signatures = self._api.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        feature_dim = _check_signature(signatures, options.model_name, options.signature)
        served = response.model_spec.version.value or version
        return BackboneInfo(options.model_name, served, 0, feature_dim)


def _check_signature(signatures: Any, model_name: str, name: str) -> int:
    """The feature dimension, after checking the signature takes strings and returns [N, D]."""
    if name not in signatures.signature_def:
        raise ModelLoadError(
            f"model {model_name!r} has no signature {name!r} "
            f"(has {sorted(signatures.signature_def)})"
        )
    signature = signatures.signature_def[name]
    images = signature.inputs.get(INPUT_KEY)
    if images is None or images.dtype != tfs_api.DT_STRING:
        raise ModelLoadError(
            f"signature {name!r} of {model_name!r} does not take {INPUT_KEY!r} as strings "
            f"(inputs {dict((k, v.dtype) for k, v in signature.inputs.items())})"
        )
    features = signature.outputs.get(OUTPUT_KEY)
    dims = [d.size for d in features.tensor_shape.dim] if features is not None else []
    if features is None or features.dtype != tfs_api.DT_FLOAT or len(dims) != 2 or dims[1] < 1:
        raise ModelLoadError(
            f"signature {name!r} of {model_name!r} does not return {OUTPUT_KEY!r} as float "
            f"[N, D] (outputs {sorted(signature.outputs)}, shape {dims})"
        )
    return int(dims[1])


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else "no details"
