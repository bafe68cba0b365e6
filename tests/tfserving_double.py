"""A test double for TensorFlow Serving's gRPC API. It is NOT TensorFlow Serving.

Production runs the real `tensorflow_model_server` (image `tensorflow/serving`), which cannot be
installed in the test environment. `TFServingDouble` stands in for it: a real gRPC server that
speaks the same API protos (`tensorflow_serving.apis`) and answers
`PredictionService.Predict`, `PredictionService.GetModelMetadata` and
`ModelService.GetModelStatus` the way the real server's source does, running the exported
SavedModels with TensorFlow in this process. Every other RPC answers UNIMPLEMENTED.

What it copies from TF Serving (C++ sources in tensorflow/serving, cited where used):

* Models: `<model_base_path>/<model_name>/<version>/`, numbered folders only; the "latest"
  version is the highest number. Which versions load follows a version policy: `"all"` (the
  default here) or `"latest"` (TF Serving's own default, which serves only the newest).
* Model specs: `version` (Int64Value), `version_label` (from a per-model label map; an unknown
  label is INVALID_ARGUMENT), or neither (latest). Unknown models and versions are NOT_FOUND with
  "Servable not found for request: Specific(name, version)" / "Latest(name)".
* Predict: empty `signature_name` means "serving_default"; an unknown signature is
  FAILED_PRECONDITION; missing, extra or misnamed inputs, unparsable tensors and wrong dtypes are
  INVALID_ARGUMENT; graph errors keep TensorFlow's code and message; `output_filter` is honoured.
  Outputs are written as typed fields (`float_val`), as the real server does by default, or as
  `tensor_content` when asked. The response's `model_spec` names the version that answered.
* GetModelMetadata: `metadata_field` must be exactly "signature_def" entries; the answer is the
  SavedModel's own `SignatureDefMap`, read from `saved_model.pb` (the init-op signature too).
* GetModelStatus: one version, or every loaded version newest first, AVAILABLE with status OK.
* Error messages longer than 1024 characters are cut and marked "...TRUNCATED".

What it adds, for tests (all thread-safe and usable while serving): `delay_s` (every RPC) and
`predict_delay_s` (Predict only: a backend slow to compute but quick to answer status checks),
both applied to calls already waiting when changed; `fail_with`, `fail_next`; a count of Predict
calls with the batch size of each, and a wait for that count to reach a number; and
`stop()`/`restart()` on the same port.

Run it by hand: `python -m tests.tfserving_double --model-base-path DIR --port 8500`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from matcher.layout import SIGNATURE, versions

__all__ = ["AS_PROTO_CONTENT", "AS_PROTO_FIELD", "ServingError", "TFServingDouble", "main"]

log = logging.getLogger(__name__)

VersionPolicy = Literal["all", "latest"]
#: TF Serving's names for how Predict writes output tensors (TfrtSavedModelConfig).
AS_PROTO_FIELD = "as_proto_field"
AS_PROTO_CONTENT = "as_proto_content"
TensorSerialization = Literal["as_proto_field", "as_proto_content"]

SERVE_TAG = "serve"
SIGNATURE_DEF_FIELD = "signature_def"
#: model_servers/grpc_status_util.cc cuts longer messages and appends this marker.
ERROR_MESSAGE_LIMIT = 1024
TRUNCATED_MARKER = "...TRUNCATED"
#: The real server calls ServerBuilder::SetMaxMessageSize(kint32max): clients' limits bind first.
MAX_MESSAGE_BYTES = 2**31 - 1
#: TF Serving's default gRPC port, used by the CLI.
DEFAULT_PORT = 8500

#: TensorFlow's error codes are gRPC's, number for number.
_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}
#: Tensor::AsProtoField's repeated field for each dtype the double may return.
_VALUE_FIELDS = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_BOOL: "bool_val",
}

Request = TypeVar("Request")
Response = TypeVar("Response")


class ServingError(Exception):
    """An RPC failure with the gRPC code and message TF Serving would send."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class _Servable:
    """One loaded version of one model."""

    name: str
    version: int
    path: Path
    #: As TF Serving reports them: the MetaGraphDef's map, not a re-derivation from Python.
    signature_defs: Mapping[str, meta_graph_pb2.SignatureDef]
    functions: Mapping[str, Callable[..., Mapping[str, tf.Tensor]]]
    #: The object tf.saved_model.load returned; its variables die with it, so it is kept.
    root: Any


class TFServingDouble:
    """A test double for TensorFlow Serving: a real gRPC server over `<base>/<name>/<version>/`.

    Args:
        model_base_path: the folder holding one sub-folder per model, each holding numbered
            SavedModel versions (TF Serving's model config `base_path`s, side by side).
        model_names: the models to serve; default every sub-folder with a numbered version. A
            named model with no versions is served as TF Serving serves it: NOT_FOUND.
        version_labels: per model, label -> version (TF Serving's `version_labels`). A label
            must point at a loaded version, as TF Serving requires; else ValueError at load.
        version_policy: "all" loads every version present at load time; "latest" only the
            highest, like TF Serving's default `latest { num_versions: 1 }`.
        tensor_serialization: how Predict writes outputs; "as_proto_field" (`float_val`, the
            real server's default) or "as_proto_content" (`tensor_content`).
        host: where to listen; the port is chosen on the first start when `port` is 0.
        port: the port to bind; later starts reuse the port first bound.
        max_workers: threads answering RPCs.
    """

    def __init__(
        self,
        model_base_path: Path | str,
        *,
        model_names: Sequence[str] | None = None,
        version_labels: Mapping[str, Mapping[str, int]] | None = None,
        version_policy: VersionPolicy = "all",
        tensor_serialization: TensorSerialization = AS_PROTO_FIELD,
        host: str = "localhost",
        port: int = 0,
        max_workers: int = 8,
    ) -> None:
        if version_policy not in ("all", "latest"):
            raise ValueError(f"version_policy must be 'all' or 'latest', not {version_policy!r}")
        if tensor_serialization not in (AS_PROTO_FIELD, AS_PROTO_CONTENT):
            raise ValueError(f"unknown tensor_serialization {tensor_serialization!r}")
        self.model_base_path = Path(model_base_path)
        self._model_names = list(model_names) if model_names is not None else None
        self._labels = {name: dict(labels) for name, labels in (version_labels or {}).items()}
        self._policy = version_policy
        self._serialization = tensor_serialization
        self._host = host
        self._port = port
        self._max_workers = max_workers
        self._models: dict[str, dict[int, _Servable]] | None = None
        # One lock for start/stop/load, another for the fault controls and counters, so that a
        # test can change faults while a slow start or stop is under way.
        self._lifecycle = threading.RLock()
        # A Condition: a test can wait for Predict calls to arrive (`wait_for_predict_calls`).
        self._controls = threading.Condition(threading.Lock())
        self._server: grpc.Server | None = None
        self._executor: futures.ThreadPoolExecutor | None = None
        self._stopping = threading.Event()
        self._delay_s = 0.0
        self._predict_delay_s = 0.0
        self._fail_with: grpc.StatusCode | None = None
        self._fail_next: list[grpc.StatusCode] = []
        self._batch_sizes: list[int] = []

    # --- lifecycle -------------------------------------------------------------------------

    def load(self) -> None:
        """Load the models (once; `start()` calls this). Versions are not re-scanned later."""
        with self._lifecycle:
            if self._models is not None:
                return
            if not self.model_base_path.is_dir():
                raise FileNotFoundError(f"model base path {self.model_base_path} is not a folder")
            chosen = {name: self._versions_to_load(name) for name in self._names()}
            self._check_labels(chosen)
            self._models = {
                name: {v: _load_servable(name, v, self.model_base_path / name / str(v)) for v in vs}
                for name, vs in chosen.items()
            }

    def start(self) -> TFServingDouble:
        """Load the models if needed and start serving; returns self."""
        with self._lifecycle:
            if self._server is not None:
                raise RuntimeError("the TF Serving double is already running")
            self.load()
            self._stopping.clear()
            self._server, self._executor = self._bind()
            self._server.start()
            log.info("TF Serving double serving %s on %s", self.models, self.target)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop serving and free the port; in-flight RPCs end (after `grace` seconds if set)."""
        with self._lifecycle:
            if self._server is None:
                return
            # Wakes handlers sleeping in `delay_s`, so that shutting down does not wait on them.
            self._stopping.set()
            self._server.stop(grace).wait()
            assert self._executor is not None
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._server = self._executor = None

    def restart(self) -> None:
        """Stop if running, then serve again on the same port, so clients' channels reconnect."""
        with self._lifecycle:
            self.stop()
            self.start()

    def __enter__(self) -> TFServingDouble:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the gRPC server is serving now."""
        return self._server is not None

    @property
    def port(self) -> int:
        """The port bound on the first start; kept across stop() for restart()."""
        if self._port == 0:
            raise RuntimeError("the TF Serving double has not been started yet")
        return self._port

    @property
    def target(self) -> str:
        """`host:port`, ready for `grpc.insecure_channel`."""
        return f"{self._host}:{self.port}"

    @property
    def models(self) -> dict[str, list[int]]:
        """The loaded versions of each served model, ascending."""
        if self._models is None:
            return {}
        return {name: sorted(servables) for name, servables in self._models.items()}

    # --- fault controls --------------------------------------------------------------------

    @property
    def delay_s(self) -> float:
        """Seconds every RPC waits before it is answered (0 for none)."""
        with self._controls:
            return self._delay_s

    @delay_s.setter
    def delay_s(self, value: float) -> None:
        if value < 0:
            raise ValueError("delay_s must be >= 0")
        with self._controls:
            self._delay_s = float(value)

    @property
    def predict_delay_s(self) -> float:
        """Seconds each Predict waits, on top of `delay_s`. Lowering it releases waiting calls."""
        with self._controls:
            return self._predict_delay_s

    @predict_delay_s.setter
    def predict_delay_s(self, value: float) -> None:
        if value < 0:
            raise ValueError("predict_delay_s must be >= 0")
        with self._controls:
            self._predict_delay_s = float(value)

    @property
    def fail_with(self) -> grpc.StatusCode | None:
        """When set, every RPC is answered with this status instead (after `delay_s`)."""
        with self._controls:
            return self._fail_with

    @fail_with.setter
    def fail_with(self, code: grpc.StatusCode | None) -> None:
        if code == grpc.StatusCode.OK:
            raise ValueError("fail_with OK makes no sense; use None to stop failing")
        with self._controls:
            self._fail_with = code

    @property
    def predict_calls(self) -> int:
        """Predict RPCs received since the last reset, failed ones included."""
        with self._controls:
            return len(self._batch_sizes)

    @property
    def batch_sizes(self) -> list[int]:
        """The batch size of each Predict received, in order: dim 0 of its first input."""
        with self._controls:
            return list(self._batch_sizes)

    def wait_for_predict_calls(self, count: int, timeout_s: float = 60.0) -> None:
        """Block until `count` Predict calls have been received since the last reset, as each
        one is counted; `timeout_s` only fails (AssertionError) a test that would hang."""
        with self._controls:
            arrived = self._controls.wait_for(lambda: len(self._batch_sizes) >= count, timeout_s)
            assert arrived, f"{len(self._batch_sizes)} of {count} Predict calls in {timeout_s} s"

    def fail_next(self, count: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        """Answer the next `count` RPCs (of any kind) with `code`, then serve normally."""
        with self._controls:
            self._fail_next.extend([code] * count)

    def _take_injected_failure(self) -> grpc.StatusCode | None:
        with self._controls:
            if self._fail_next:
                return self._fail_next.pop()
            return self._fail_with

    def reset_faults(self) -> None:
        """No delay, no injected failure."""
        with self._controls:
            self._delay_s = 0.0
            self._predict_delay_s = 0.0
            self._fail_with = None
            self._fail_next.clear()

    def reset_counters(self) -> None:
        """Forget the Predict calls counted so far."""
        with self._controls:
            self._batch_sizes.clear()

    # --- RPC handlers (called by the servicers on gRPC worker threads) ----------------------

    def _handle(
        self,
        rpc: str,
        handler: Callable[[Request], Response],
        request: Request,
        context: grpc.ServicerContext,
    ) -> Response:
        """Answer one RPC: injected delay, injected failure, then `handler` or its error."""
        self._pause(rpc, context)
        if not context.is_active():
            # The client gave up during the delay: do not spend CPU on an answer nobody reads.
            context.abort(grpc.StatusCode.CANCELLED, "the client went away")
        code = self._take_injected_failure()
        if code is not None:
            context.abort(code, f"TF Serving double: {code.name} injected into {rpc}")
        try:
            return handler(request)
        except ServingError as error:
            context.abort(error.code, _truncate(error.message))

    def _count_predict(self, request: predict_pb2.PredictRequest) -> None:
        """Record a Predict call and its batch size."""
        with self._controls:
            self._batch_sizes.append(_batch_size(request))
            self._controls.notify_all()

    def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        """PredictionService.Predict, as predict_util.cc's RunPredict answers it."""
        servable = self._resolve(request, "model_spec")
        signature_name = request.model_spec.signature_name or SIGNATURE
        signature = servable.signature_defs.get(signature_name)
        function = servable.functions.get(signature_name)
        if signature is None or function is None:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f'Serving signature key "{signature_name}" not found.',
            )
        inputs = _input_values(signature, request)
        aliases = _output_aliases(signature, request.output_filter)
        outputs = _run(function, inputs)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature_name
        for alias in aliases:
            array = outputs[alias].numpy()
            response.outputs[alias].CopyFrom(_tensor_proto(array, self._serialization))
        return response

    def get_model_metadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        """PredictionService.GetModelMetadata, as get_model_metadata_impl.cc answers it."""
        if not request.HasField("model_spec"):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        if not request.metadata_field:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "GetModelMetadataRequest must specify at least one metadata_field",
            )
        for metadata_field in request.metadata_field:
            if metadata_field != SIGNATURE_DEF_FIELD:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Metadata field {metadata_field} is not supported",
                )
        servable = self._resolve(request, "model_spec")
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for key, signature in servable.signature_defs.items():
            signatures.signature_def[key].CopyFrom(signature)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        # The real server names the model and version, not the signature, here.
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signatures)
        return response

    def get_model_status(
        self, request: get_model_status_pb2.GetModelStatusRequest
    ) -> get_model_status_pb2.GetModelStatusResponse:
        """ModelService.GetModelStatus, as get_model_status_impl.cc answers it.

        Like the real server, it looks at `version` only: a `version_label` is ignored and every
        version is reported.
        """
        if not request.HasField("model_spec"):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        spec = request.model_spec
        loaded = self._loaded().get(spec.name, {})
        if spec.HasField("version"):
            wanted = spec.version.value
            if wanted not in loaded:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Could not find version {wanted} of model {spec.name}",
                )
            found = [wanted]
        else:
            if not loaded:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}"
                )
            # ServableStateMonitor::VersionMap is ordered with std::greater: newest first.
            found = sorted(loaded, reverse=True)
        response = get_model_status_pb2.GetModelStatusResponse()
        for version in found:
            status = response.model_version_status.add()
            status.version = version
            status.state = get_model_status_pb2.ModelVersionStatus.State.AVAILABLE
            status.status.error_code = 0  # tensorflow.error.OK
        return response

    # --- internals -------------------------------------------------------------------------

    def _names(self) -> list[str]:
        if self._model_names is not None:
            return self._model_names
        folders = (p for p in self.model_base_path.iterdir() if p.is_dir())
        return sorted(p.name for p in folders if versions(p))

    def _versions_to_load(self, name: str) -> list[int]:
        present = versions(self.model_base_path / name)
        if not present:
            log.warning("no versions of model %s under %s", name, self.model_base_path / name)
        return present if self._policy == "all" else present[-1:]

    def _check_labels(self, chosen: Mapping[str, Sequence[int]]) -> None:
        for name, labels in self._labels.items():
            for label, version in labels.items():
                if version not in chosen.get(name, ()):
                    # TF Serving refuses such a config unless told to allow it.
                    raise ValueError(
                        f"label {label!r} points at version {version} of model {name!r}, "
                        f"which is not loaded (loaded: {list(chosen.get(name, ()))})"
                    )

    def _loaded(self) -> dict[str, dict[int, _Servable]]:
        if self._models is None:
            raise ServingError(grpc.StatusCode.UNAVAILABLE, "models are not loaded yet")
        return self._models

    def _resolve(self, request: Any, spec_field: str) -> _Servable:
        """The servable a request's ModelSpec names, as ServerCore::GetServableHandle finds it."""
        if not request.HasField(spec_field):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        spec: model_pb2.ModelSpec = getattr(request, spec_field)
        if not spec.name:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified.")
        loaded = self._loaded().get(spec.name, {})
        choice = spec.WhichOneof("version_choice")
        if choice is None:
            if not loaded:
                raise _not_found(f"Latest({spec.name})")
            return loaded[max(loaded)]
        if choice == "version_label":
            version = self._version_for_label(spec.name, spec.version_label)
        else:
            version = spec.version.value
        if version not in loaded:
            raise _not_found(f"Specific({spec.name}, {version})")
        return loaded[version]

    def _version_for_label(self, name: str, label: str) -> int:
        # Checked before the model itself, as ServerCore::GetModelVersionForLabel is: an unknown
        # label on an unknown model is INVALID_ARGUMENT, not NOT_FOUND.
        version = self._labels.get(name, {}).get(label)
        if version is None:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, f"Unrecognized servable version label: {label}"
            )
        return version

    def _pause(self, rpc: str, context: grpc.ServicerContext) -> None:
        """Sleep the injected delay, cut short when the client gives up or the server stops.

        The delay is read again while sleeping, so that lowering it releases waiting calls.
        """
        started = time.monotonic()
        while context.is_active() and not self._stopping.is_set():
            remaining = started + self._delay_for(rpc) - time.monotonic()
            if remaining <= 0:
                return
            self._stopping.wait(min(remaining, 0.05))

    def _delay_for(self, rpc: str) -> float:
        with self._controls:
            return self._delay_s + (self._predict_delay_s if rpc == "Predict" else 0.0)

    def _bind(self) -> tuple[grpc.Server, futures.ThreadPoolExecutor]:
        """A new server on the remembered port. Retried briefly: the old socket may linger."""
        deadline = time.monotonic() + 5.0
        while True:
            server, executor = self._new_server()
            try:
                port = server.add_insecure_port(f"{self._host}:{self._port}")
            except RuntimeError:
                port = 0
            if port:
                self._port = port
                return server, executor
            server.stop(None)
            executor.shutdown(wait=False)
            if self._port == 0 or time.monotonic() > deadline:
                raise RuntimeError(
                    f"cannot bind the TF Serving double to {self._host}:{self._port}"
                )
            time.sleep(0.05)

    def _new_server(self) -> tuple[grpc.Server, futures.ThreadPoolExecutor]:
        executor = futures.ThreadPoolExecutor(
            max_workers=self._max_workers, thread_name_prefix="tfserving-double"
        )
        server = grpc.server(
            executor,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # Without this a second server could share the port silently; a restart must
                # really own it.
                ("grpc.so_reuseport", 0),
            ],
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            _PredictionServicer(self), server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelServicer(self), server)
        return server, executor


class _PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata; Classify, Regress and MultiInference stay UNIMPLEMENTED."""

    def __init__(self, double: TFServingDouble) -> None:
        self._double = double

    def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> predict_pb2.PredictResponse:
        self._double._count_predict(request)
        return self._double._handle("Predict", self._double.predict, request, context)

    def GetModelMetadata(
        self,
        request: get_model_metadata_pb2.GetModelMetadataRequest,
        context: grpc.ServicerContext,
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        double = self._double
        return double._handle("GetModelMetadata", double.get_model_metadata, request, context)


class _ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus; HandleReloadConfigRequest stays UNIMPLEMENTED."""

    def __init__(self, double: TFServingDouble) -> None:
        self._double = double

    def GetModelStatus(
        self,
        request: get_model_status_pb2.GetModelStatusRequest,
        context: grpc.ServicerContext,
    ) -> get_model_status_pb2.GetModelStatusResponse:
        double = self._double
        return double._handle("GetModelStatus", double.get_model_status, request, context)


# --- SavedModel loading ------------------------------------------------------------------------


def _load_servable(name: str, version: int, path: Path) -> _Servable:
    meta_graph = _serving_meta_graph(path)
    root = tf.saved_model.load(str(path), tags=[SERVE_TAG])
    log.info("TF Serving double loaded %s version %d from %s", name, version, path)
    return _Servable(
        name=name,
        version=version,
        path=path,
        signature_defs=dict(meta_graph.signature_def),
        functions=dict(root.signatures),
        root=root,
    )


def _serving_meta_graph(path: Path) -> meta_graph_pb2.MetaGraphDef:
    """The MetaGraphDef tagged "serve", the one TF Serving loads and reports."""
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((path / "saved_model.pb").read_bytes())
    for meta_graph in saved_model.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return meta_graph
    raise ValueError(f"{path} has no MetaGraphDef tagged {SERVE_TAG!r}")


# --- Predict, step by step (tensorflow_serving/servables/tensorflow/predict_util.cc) -----------


def _input_values(
    signature: meta_graph_pb2.SignatureDef, request: predict_pb2.PredictRequest
) -> dict[str, tf.Tensor]:
    """The request's inputs as tensors keyed by signature alias, checked as TF Serving checks."""
    expected = sorted(signature.inputs)
    sent = sorted(request.inputs)
    if len(sent) > len(expected) or (len(sent) < len(expected) and not signature.defaults):
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, _size_mismatch(sent, expected))
    tensors: dict[str, tf.Tensor] = {}
    for position, alias in enumerate(expected):
        info = signature.inputs[alias]
        if alias in request.inputs:
            proto = request.inputs[alias]
        elif alias in signature.defaults:
            proto = signature.defaults[alias]
        else:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Signature input alias: {alias}(feed name: {info.name}) not found in request "
                f"and no default value provided. Inputs expected to be in the request "
                f"{{{','.join(sent)}}}, or default input alias set: "
                f"{','.join(sorted(signature.defaults))}",
            )
        tensors[alias] = _parse_input(alias, position, proto, info.dtype)
    return tensors


def _size_mismatch(sent: list[str], expected: list[str]) -> str:
    extra = [a for a in sent if a not in expected]
    missing = [a for a in expected if a not in sent]
    return (
        f"input size does not match signature: {len(sent)}!={len(expected)} "
        f"len({{{','.join(sent)}}}) != len({{{','.join(expected)}}}). "
        f"Sent extra: {{{','.join(extra)}}}. Missing but required: {{{','.join(missing)}}}."
    )


def _parse_input(alias: str, position: int, proto: tensor_pb2.TensorProto, dtype: int) -> tf.Tensor:
    try:
        array = tf.make_ndarray(proto)
    except (TypeError, ValueError) as exc:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT, f"tensor parsing error: {alias}"
        ) from exc
    if proto.dtype != dtype:
        # The words of FunctionCallFrame::SetArgs, which refuses the feed in the real server.
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Expects arg[{position}] to be {_dtype_name(dtype)} but "
            f"{_dtype_name(proto.dtype)} is provided",
        )
    return tf.constant(array, dtype=tf.dtypes.as_dtype(dtype))


def _dtype_name(dtype: int) -> str:
    """TensorFlow's DataTypeString: DT_FLOAT -> "float"."""
    return types_pb2.DataType.Name(dtype).removeprefix("DT_").lower()


def _output_aliases(
    signature: meta_graph_pb2.SignatureDef, output_filter: Sequence[str]
) -> list[str]:
    """The outputs to return: the filter's, checked, or every output of the signature."""
    seen: list[str] = []
    for alias in output_filter:
        if alias not in signature.outputs:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"output tensor alias not found in signature: {alias} Outputs expected to be in "
                f"the set {{{','.join(sorted(signature.outputs))}}}.",
            )
        if alias in seen:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, f"duplicate output tensor alias: {alias}"
            )
        seen.append(alias)
    return seen or sorted(signature.outputs)


def _run(
    function: Callable[..., Mapping[str, tf.Tensor]], inputs: Mapping[str, tf.Tensor]
) -> Mapping[str, tf.Tensor]:
    """Run the signature; TensorFlow's own errors keep their code and message, as in TF Serving."""
    try:
        return function(**inputs)
    except tf.errors.OpError as exc:
        code = _GRPC_CODES.get(exc.error_code, grpc.StatusCode.UNKNOWN)
        raise ServingError(code, exc.message) from exc


def _tensor_proto(array: np.ndarray, serialization: str) -> tensor_pb2.TensorProto:
    """Tensor::AsProtoField (typed repeated values) or AsProtoTensorContent (raw bytes)."""
    proto = tf.make_tensor_proto(array)
    field = _VALUE_FIELDS.get(proto.dtype)
    if serialization == AS_PROTO_FIELD and field is not None and proto.tensor_content:
        proto.ClearField("tensor_content")
        getattr(proto, field).extend(array.ravel().tolist())
    return proto


def _batch_size(request: predict_pb2.PredictRequest) -> int:
    if not request.inputs:
        return 0
    dims = request.inputs[sorted(request.inputs)[0]].tensor_shape.dim
    return dims[0].size if dims else 0


def _not_found(servable_request: str) -> ServingError:
    return ServingError(
        grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {servable_request}"
    )


def _truncate(message: str) -> str:
    if len(message) <= ERROR_MESSAGE_LIMIT:
        return message
    return message[:ERROR_MESSAGE_LIMIT] + TRUNCATED_MARKER


# --- CLI -----------------------------------------------------------------------------------------


def _label(text: str) -> tuple[str, str, int]:
    """`MODEL:LABEL=VERSION` -> (model, label, version)."""
    try:
        model, rest = text.split(":", 1)
        label, version = rest.split("=", 1)
        return model, label, int(version)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected MODEL:LABEL=VERSION, got {text!r}") from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.tfserving_double",
        description="A TEST DOUBLE for TensorFlow Serving's gRPC API (not TensorFlow Serving).",
    )
    parser.add_argument("--model-base-path", type=Path, required=True, help="<base>/<name>/<v>/")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--model-name", action="append", help="serve only these (repeatable)")
    parser.add_argument("--version-policy", choices=["all", "latest"], default="all")
    parser.add_argument(
        "--label", type=_label, action="append", default=[], help="MODEL:LABEL=VERSION"
    )
    parser.add_argument(
        "--tensor-serialization", choices=[AS_PROTO_FIELD, AS_PROTO_CONTENT], default=AS_PROTO_FIELD
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until interrupted; prints the port alone on the first stdout line."""
    args = _parser().parse_args(argv)
    labels: dict[str, dict[str, int]] = {}
    for model, label, version in args.label:
        labels.setdefault(model, {})[label] = version
    double = TFServingDouble(
        args.model_base_path,
        model_names=args.model_name,
        version_labels=labels,
        version_policy=args.version_policy,
        tensor_serialization=args.tensor_serialization,
        host=args.host,
        port=args.port,
    )
    try:
        double.start()
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"tfserving_double: {exc}", file=sys.stderr)
        return 2
    finished = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: finished.set())
    try:
        print(double.port, flush=True)
        print(
            f"TF Serving test double serving {double.models} on {double.target}; Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )
        finished.wait()
    finally:
        double.stop()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(main())
