"""The TF Serving test double answers like TensorFlow Serving, checked with a real gRPC client.

The client is `tensorflow_serving.apis`' own stubs over a sync channel, as the matcher's
`tfserving` backend uses them. The double serves the session's exported EfficientNet-Lite0; one
double (and one model load) serves the whole module, and a second serves a copy with two
versions. Tests that inject faults reset them afterwards, so that order does not matter.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from matcher.layout import INPUT_KEY, OUTPUT_KEY, SIGNATURE
from tests import samples
from tests.tfserving_double import AS_PROTO_CONTENT, TFServingDouble, main

ROOT = Path(__file__).resolve().parent.parent
LITE0_DIM = 1280
#: Long enough for a channel to come back from reconnect backoff on a loaded 2-core machine.
RECONNECT_S = 20.0
Stubs = tuple[
    prediction_service_pb2_grpc.PredictionServiceStub, model_service_pb2_grpc.ModelServiceStub
]


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_name(exported_model) -> str:
    return exported_model.model_name


@pytest.fixture(scope="module")
def double(exported_model) -> Iterator[TFServingDouble]:
    """The double over the session's model base path, with a label on the exported version."""
    base = exported_model.path.parent.parent
    labels = {exported_model.model_name: {"stable": exported_model.version}}
    with TFServingDouble(base, version_labels=labels) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean_double(request: pytest.FixtureRequest) -> Iterator[None]:
    """Faults and counters never leak from one test into the next."""
    yield
    if "double" in request.fixturenames:
        running: TFServingDouble = request.getfixturevalue("double")
        running.reset_faults()
        running.reset_counters()


@pytest.fixture(scope="module")
def channel(double: TFServingDouble) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(double.target) as opened:
        yield opened


@pytest.fixture(scope="module")
def predictions(channel: grpc.Channel) -> prediction_service_pb2_grpc.PredictionServiceStub:
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="module")
def model_service(channel: grpc.Channel) -> model_service_pb2_grpc.ModelServiceStub:
    return model_service_pb2_grpc.ModelServiceStub(channel)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """Three real photos in three formats and sizes."""
    good = samples.good_images()
    return [good["jpeg"], good["png"], samples.jpeg((320, 240))]


@pytest.fixture(scope="module")
def reference(exported_model, images: list[bytes]) -> np.ndarray:
    """The features of `images` from the SavedModel loaded directly, without any server."""
    signature = tf.saved_model.load(str(exported_model.path)).signatures[SIGNATURE]
    return signature(**{INPUT_KEY: tf.constant(images)})[OUTPUT_KEY].numpy()


@pytest.fixture(scope="module")
def two_versions(exported_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model base path holding versions 1 and 2 (a copy of 1: a valid SavedModel too)."""
    base = tmp_path_factory.mktemp("two_versions")
    model_dir = base / exported_model.model_name
    shutil.copytree(exported_model.path, model_dir / "1")
    shutil.copytree(exported_model.path, model_dir / "2")
    return base


@pytest.fixture(scope="module")
def double_v2(two_versions: Path) -> Iterator[TFServingDouble]:
    """Both versions loaded; outputs as `tensor_content`, the other serialization."""
    with TFServingDouble(two_versions, tensor_serialization=AS_PROTO_CONTENT) as running:
        yield running


@pytest.fixture(scope="module")
def stubs_v2(double_v2: TFServingDouble) -> Iterator[Stubs]:
    with grpc.insecure_channel(double_v2.target) as opened:
        yield (
            prediction_service_pb2_grpc.PredictionServiceStub(opened),
            model_service_pb2_grpc.ModelServiceStub(opened),
        )


# --- helpers -------------------------------------------------------------------------------------
# Requests are built here with the stock API classes, independently of the matcher's own client
# code, so that the double is checked against TF Serving's protos and not against the client.


def predict_request(
    name: str, images: list[bytes], version: int | None = None, signature: str = SIGNATURE
) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    request.inputs[INPUT_KEY].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
    return request


def features_from_response(response: predict_pb2.PredictResponse) -> np.ndarray:
    return tf.make_ndarray(response.outputs[OUTPUT_KEY])


def metadata_request(
    name: str, version: int | None = None, fields: tuple[str, ...] = ("signature_def",)
) -> get_model_metadata_pb2.GetModelMetadataRequest:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=list(fields))
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    return request


def status_request(
    name: str, version: int | None = None
) -> get_model_status_pb2.GetModelStatusRequest:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    return request


def rpc_error(call, request, **kwargs) -> grpc.RpcError:
    """The error `call(request)` fails with; fails the test if it succeeds."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=kwargs.pop("timeout", 30), **kwargs)
    return caught.value


def signature_of(response: get_model_metadata_pb2.GetModelMetadataResponse):
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    return signatures.signature_def


# --- Predict -------------------------------------------------------------------------------------


def test_predict_matches_the_savedmodel_run_directly(
    predictions, model_name: str, images: list[bytes], reference: np.ndarray
) -> None:
    response = predictions.Predict(predict_request(model_name, images), timeout=60)

    features = features_from_response(response)
    assert features.shape == (3, LITE0_DIM)
    np.testing.assert_allclose(features, reference, atol=1e-5)


def test_predict_writes_float_val_like_the_real_server(
    predictions, model_name: str, images: list[bytes]
) -> None:
    """tensorflow_model_server serializes outputs with AsProtoField unless configured not to."""
    output = predictions.Predict(predict_request(model_name, images[:1]), timeout=60).outputs[
        OUTPUT_KEY
    ]

    assert output.dtype == types_pb2.DT_FLOAT
    assert [d.size for d in output.tensor_shape.dim] == [1, LITE0_DIM]
    assert len(output.float_val) == LITE0_DIM
    assert not output.tensor_content


def test_predict_without_version_or_signature_uses_latest_and_serving_default(
    predictions, exported_model, images: list[bytes]
) -> None:
    request = predict_request(exported_model.model_name, images[:1], signature="")

    spec = predictions.Predict(request, timeout=60).model_spec

    assert spec.name == exported_model.model_name
    assert spec.version.value == exported_model.version
    assert spec.signature_name == SIGNATURE


def test_predict_with_explicit_version_and_with_label(
    predictions, exported_model, images: list[bytes], reference: np.ndarray
) -> None:
    by_version = predict_request(exported_model.model_name, images, exported_model.version)
    by_label = predict_request(exported_model.model_name, images)
    by_label.model_spec.version_label = "stable"

    for request in (by_version, by_label):
        response = predictions.Predict(request, timeout=60)
        assert response.model_spec.version.value == exported_model.version
        np.testing.assert_allclose(features_from_response(response), reference, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "version", "details"),
    [
        ("no_such_model", None, "Servable not found for request: Latest(no_such_model)"),
        (
            "efficientnet_lite0",
            99,
            "Servable not found for request: Specific(efficientnet_lite0, 99)",
        ),
    ],
)
def test_unknown_model_or_version_is_not_found(
    predictions, images: list[bytes], name: str, version: int | None, details: str
) -> None:
    error = rpc_error(predictions.Predict, predict_request(name, images[:1], version))

    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == details


def test_unknown_version_label_is_invalid_argument(
    predictions, model_name: str, images: list[bytes]
) -> None:
    request = predict_request(model_name, images[:1])
    request.model_spec.version_label = "canary"

    error = rpc_error(predictions.Predict, request)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "Unrecognized servable version label: canary"


def test_unknown_signature_is_failed_precondition(
    predictions, model_name: str, images: list[bytes]
) -> None:
    error = rpc_error(predictions.Predict, predict_request(model_name, images[:1], signature="x"))

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == 'Serving signature key "x" not found.'


def test_wrong_input_key_is_invalid_argument(
    predictions, model_name: str, images: list[bytes]
) -> None:
    request = predict_request(model_name, images[:1])
    request.inputs["pictures"].CopyFrom(request.inputs.pop(INPUT_KEY))

    error = rpc_error(predictions.Predict, request)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Signature input alias: images" in error.details()
    assert "not found in request" in error.details()


def test_extra_input_is_invalid_argument(predictions, model_name: str, images: list[bytes]) -> None:
    request = predict_request(model_name, images[:1])
    request.inputs["extra"].CopyFrom(request.inputs[INPUT_KEY])

    error = rpc_error(predictions.Predict, request)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input size does not match signature: 2!=1" in error.details()
    assert "Sent extra: {extra}" in error.details()


def test_wrong_dtype_is_invalid_argument(predictions, model_name: str) -> None:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.inputs[INPUT_KEY].CopyFrom(tf.make_tensor_proto(np.zeros(2, np.float32)))

    error = rpc_error(predictions.Predict, request)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "Expects arg[0] to be string but float is provided"


def test_truncated_jpeg_is_invalid_argument_with_tensorflows_message(
    predictions, model_name: str, images: list[bytes]
) -> None:
    truncated = samples.bad_images()["truncated_jpeg"]

    error = rpc_error(predictions.Predict, predict_request(model_name, [images[0], truncated]))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Invalid JPEG data" in error.details()


def test_output_filter_is_checked(predictions, model_name: str, images: list[bytes]) -> None:
    request = predict_request(model_name, images[:1])
    request.output_filter.append("logits")

    error = rpc_error(predictions.Predict, request)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output tensor alias not found in signature: logits" in error.details()


# --- GetModelMetadata ----------------------------------------------------------------------------


def test_metadata_reports_the_savedmodels_signature(predictions, exported_model) -> None:
    response = predictions.GetModelMetadata(metadata_request(exported_model.model_name), timeout=30)

    assert response.model_spec.name == exported_model.model_name
    assert response.model_spec.version.value == exported_model.version
    signature = signature_of(response)[SIGNATURE]
    images = signature.inputs[INPUT_KEY]
    features = signature.outputs[OUTPUT_KEY]
    assert images.dtype == types_pb2.DT_STRING
    assert [d.size for d in images.tensor_shape.dim] == [-1]
    assert features.dtype == types_pb2.DT_FLOAT
    assert [d.size for d in features.tensor_shape.dim] == [-1, LITE0_DIM]
    assert signature.method_name == "tensorflow/serving/predict"


@pytest.mark.parametrize(
    ("fields", "details"),
    [
        ((), "GetModelMetadataRequest must specify at least one metadata_field"),
        (("signature_def", "labels"), "Metadata field labels is not supported"),
    ],
)
def test_metadata_needs_signature_def_field(
    predictions, model_name: str, fields: tuple[str, ...], details: str
) -> None:
    error = rpc_error(predictions.GetModelMetadata, metadata_request(model_name, fields=fields))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == details


def test_metadata_of_unknown_version_is_not_found(predictions, model_name: str) -> None:
    error = rpc_error(predictions.GetModelMetadata, metadata_request(model_name, 7))

    assert error.code() == grpc.StatusCode.NOT_FOUND


# --- GetModelStatus ------------------------------------------------------------------------------


@pytest.mark.parametrize("named", [True, False])
def test_status_is_available(model_service, exported_model, named: bool) -> None:
    version = exported_model.version if named else None
    response = model_service.GetModelStatus(
        status_request(exported_model.model_name, version), timeout=30
    )

    [status] = response.model_version_status
    assert status.version == exported_model.version
    assert status.state == get_model_status_pb2.ModelVersionStatus.State.AVAILABLE
    assert status.status.error_code == 0


@pytest.mark.parametrize(
    ("name", "version", "details"),
    [
        ("no_such_model", None, "Could not find any versions of model no_such_model"),
        ("efficientnet_lite0", 5, "Could not find version 5 of model efficientnet_lite0"),
    ],
)
def test_status_of_unknown_model_or_version_is_not_found(
    model_service, name: str, version: int | None, details: str
) -> None:
    error = rpc_error(model_service.GetModelStatus, status_request(name, version))

    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == details


# --- fault controls ------------------------------------------------------------------------------


def test_fail_with_fails_every_rpc_until_cleared(
    double: TFServingDouble, predictions, model_service, model_name: str, images: list[bytes]
) -> None:
    calls = [
        (predictions.Predict, predict_request(model_name, images[:1])),
        (predictions.GetModelMetadata, metadata_request(model_name)),
        (model_service.GetModelStatus, status_request(model_name)),
    ]
    double.fail_with = grpc.StatusCode.UNAVAILABLE

    for call, request in calls:
        assert rpc_error(call, request).code() == grpc.StatusCode.UNAVAILABLE

    double.fail_with = None
    for call, request in calls:
        call(request, timeout=60)


def test_delay_exceeds_a_short_client_deadline(
    double: TFServingDouble, model_service, model_name: str
) -> None:
    double.delay_s = 3.0
    started = time.monotonic()

    error = rpc_error(model_service.GetModelStatus, status_request(model_name), timeout=0.3)

    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.5
    double.delay_s = 0
    model_service.GetModelStatus(status_request(model_name), timeout=30)


def test_predict_calls_and_batch_sizes_are_counted(
    double: TFServingDouble, predictions, model_name: str, images: list[bytes]
) -> None:
    double.reset_counters()
    predictions.Predict(predict_request(model_name, images), timeout=60)
    predictions.Predict(predict_request(model_name, images[:1]), timeout=60)
    rpc_error(predictions.Predict, predict_request("no_such_model", images[:2]))

    assert double.predict_calls == 3
    assert double.batch_sizes == [3, 1, 2]


def test_stop_frees_the_port_and_restart_serves_through_the_same_channel(
    double: TFServingDouble, model_service, model_name: str
) -> None:
    port = double.port
    model_service.GetModelStatus(status_request(model_name), timeout=30)

    double.stop()
    assert not double.running
    error = rpc_error(model_service.GetModelStatus, status_request(model_name), timeout=5)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))

    double.restart()
    assert double.port == port
    # The channel is in reconnect backoff; wait_for_ready rides it out instead of failing.
    response = model_service.GetModelStatus(
        status_request(model_name), timeout=RECONNECT_S, wait_for_ready=True
    )
    assert (
        response.model_version_status[0].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    )


async def test_serves_the_event_loop_and_worker_threads_at_once(
    double: TFServingDouble, model_name: str, images: list[bytes], reference: np.ndarray
) -> None:
    """As in the matcher: its grpc.aio server on the session loop, sync calls in worker threads."""
    double.reset_counters()
    request = predict_request(model_name, images)
    with grpc.insecure_channel(double.target) as sync_channel:
        sync_stub = prediction_service_pb2_grpc.PredictionServiceStub(sync_channel)
        async with grpc.aio.insecure_channel(double.target) as aio_channel:
            aio_stub = prediction_service_pb2_grpc.PredictionServiceStub(aio_channel)
            responses = await asyncio.gather(
                aio_stub.Predict(request, timeout=60),
                asyncio.to_thread(sync_stub.Predict, request, timeout=60),
                asyncio.to_thread(sync_stub.Predict, request, timeout=60),
            )

    for response in responses:
        np.testing.assert_allclose(features_from_response(response), reference, atol=1e-5)
    assert double.batch_sizes == [3, 3, 3]


# --- versions ------------------------------------------------------------------------------------


def test_two_versions_latest_is_highest_and_both_are_addressable(
    stubs_v2: Stubs, double_v2: TFServingDouble, model_name: str, images: list[bytes], reference
) -> None:
    predictions, model_service = stubs_v2
    assert double_v2.models == {model_name: [1, 2]}

    for version, expected in ((None, 2), (1, 1), (2, 2)):
        response = predictions.Predict(predict_request(model_name, images, version), timeout=60)
        assert response.model_spec.version.value == expected
        # The other serialization: raw little-endian bytes in tensor_content.
        assert response.outputs[OUTPUT_KEY].tensor_content
        np.testing.assert_allclose(features_from_response(response), reference, atol=1e-5)

    metadata = predictions.GetModelMetadata(metadata_request(model_name), timeout=30)
    assert metadata.model_spec.version.value == 2
    statuses = model_service.GetModelStatus(status_request(model_name), timeout=30)
    assert [s.version for s in statuses.model_version_status] == [2, 1]


def test_latest_policy_loads_only_the_highest_version(two_versions: Path, model_name: str) -> None:
    with (
        TFServingDouble(two_versions, version_policy="latest") as latest,
        grpc.insecure_channel(latest.target) as channel,
    ):
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        assert latest.models == {model_name: [2]}
        error = rpc_error(stub.GetModelStatus, status_request(model_name, 1))
        assert error.code() == grpc.StatusCode.NOT_FOUND


def test_label_on_a_version_that_is_not_loaded_is_refused(two_versions: Path) -> None:
    double = TFServingDouble(two_versions, version_labels={"efficientnet_lite0": {"old": 7}})

    with pytest.raises(ValueError, match="version 7"):
        double.start()
    assert not double.running


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_prints_the_port_and_serves_until_interrupted(exported_model, model_name: str) -> None:
    base = exported_model.path.parent.parent
    command = [sys.executable, "-m", "tests.tfserving_double", "--model-base-path", str(base)]
    process = subprocess.Popen(
        [*command, "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            response = stub.GetModelStatus(status_request(model_name), timeout=30)
        assert response.model_version_status[0].version == exported_model.version
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()


def test_cli_refuses_a_missing_base_path_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing"

    assert main(["--model-base-path", str(missing), "--port", "0"]) == 2

    assert (
        capsys.readouterr().err == f"tfserving_double: model base path {missing} is not a folder\n"
    )
