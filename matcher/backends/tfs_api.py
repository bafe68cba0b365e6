"""TensorFlow Serving's API messages without importing TensorFlow.

`tensorflow_serving.apis` imports `tensorflow.core.framework`, which imports all of TensorFlow
(seconds and hundreds of MB) just to get a handful of message classes. The installed
`*_pb2.py` modules each embed their serialized FileDescriptorProto, so this module reads those
bytes from the files as text (never importing them), builds the messages in a private
descriptor pool, and calls the RPCs by their method paths. The wire format is identical.

The descriptors can also be written to a file once (`python -m matcher.backends.tfs_api OUT`),
so a container needs neither TensorFlow nor tensorflow-serving-api at run time.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

#: The API files the matcher uses; their dependencies are followed from here.
ROOT_FILES = (
    "tensorflow_serving/apis/predict.proto",
    "tensorflow_serving/apis/get_model_metadata.proto",
    "tensorflow_serving/apis/get_model_status.proto",
)
PREDICT = "/tensorflow.serving.PredictionService/Predict"
GET_MODEL_METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"
GET_MODEL_STATUS = "/tensorflow.serving.ModelService/GetModelStatus"
#: tensorflow.DataType values (types.proto); fixed by the wire format.
DT_FLOAT = 1
DT_STRING = 7


class DescriptorError(RuntimeError):
    """The API descriptors cannot be found or read."""


def _embedded_descriptor(module_file: Path) -> bytes:
    """The bytes passed to AddSerializedFile in a generated *_pb2.py, read without running it."""
    tree = ast.parse(module_file.read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
        ):
            serialized = ast.literal_eval(node.args[0])
            if isinstance(serialized, bytes):
                return serialized
    raise DescriptorError(f"no serialized descriptor in {module_file}")


#: Where TensorFlow's wheel puts the generated modules of protos it vendors (XLA, TSL).
_VENDORED_UNDER = ("", "tensorflow/compiler/", "tensorflow/")


def _find_module_file(proto_name: str) -> Path:
    relative = Path(proto_name).with_name(Path(proto_name).stem + "_pb2.py")
    for entry in sys.path:
        for prefix in _VENDORED_UNDER:
            candidate = Path(entry or ".") / prefix / relative
            if candidate.is_file():
                return candidate
    raise DescriptorError(
        f"{relative} not found: install tensorflow-serving-api (its files are read, not "
        "imported) or pass the descriptor file written by `python -m matcher.backends.tfs_api`"
    )


def _file_descriptor(proto_name: str) -> descriptor_pb2.FileDescriptorProto:
    if proto_name.startswith("google/protobuf/"):
        # Well-known types ship with protobuf itself and import nothing heavy.
        module = importlib.import_module("google.protobuf." + Path(proto_name).stem + "_pb2")
        serialized = module.DESCRIPTOR.serialized_pb
    else:
        serialized = _embedded_descriptor(_find_module_file(proto_name))
    return descriptor_pb2.FileDescriptorProto.FromString(serialized)


def collect_descriptors(roots: tuple[str, ...] = ROOT_FILES) -> descriptor_pb2.FileDescriptorSet:
    """The root files and all their dependencies, dependencies first."""
    ordered: list[descriptor_pb2.FileDescriptorProto] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        proto = _file_descriptor(name)
        for dependency in proto.dependency:
            visit(dependency)
        ordered.append(proto)

    for root in roots:
        visit(root)
    return descriptor_pb2.FileDescriptorSet(file=ordered)


@dataclass(frozen=True)
class TFServingApi:
    """Message classes of TF Serving's API, built in a private descriptor pool."""

    PredictRequest: Any
    PredictResponse: Any
    GetModelMetadataRequest: Any
    GetModelMetadataResponse: Any
    SignatureDefMap: Any
    GetModelStatusRequest: Any
    GetModelStatusResponse: Any
    TensorProto: Any
    #: ModelVersionStatus.State.AVAILABLE
    AVAILABLE: int


def load_api(descriptor_file: Path | None = None) -> TFServingApi:
    """Build the API classes from `descriptor_file`, or from the installed packages' files."""
    if descriptor_file is not None:
        try:
            files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_file.read_bytes())
        except OSError as exc:
            raise DescriptorError(f"cannot read {descriptor_file}: {exc.strerror}") from exc
    else:
        files = collect_descriptors()
    # A private pool: a process that also imports TensorFlow keeps its own definitions.
    pool = descriptor_pool.DescriptorPool()
    for proto in files.file:
        pool.Add(proto)

    def message(name: str) -> Any:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))

    state = pool.FindEnumTypeByName("tensorflow.serving.ModelVersionStatus.State")
    return TFServingApi(
        PredictRequest=message("tensorflow.serving.PredictRequest"),
        PredictResponse=message("tensorflow.serving.PredictResponse"),
        GetModelMetadataRequest=message("tensorflow.serving.GetModelMetadataRequest"),
        GetModelMetadataResponse=message("tensorflow.serving.GetModelMetadataResponse"),
        SignatureDefMap=message("tensorflow.serving.SignatureDefMap"),
        GetModelStatusRequest=message("tensorflow.serving.GetModelStatusRequest"),
        GetModelStatusResponse=message("tensorflow.serving.GetModelStatusResponse"),
        TensorProto=message("tensorflow.TensorProto"),
        AVAILABLE=state.values_by_name["AVAILABLE"].number,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m matcher.backends.tfs_api",
        description="Write TF Serving's API descriptors to a file, for a TensorFlow-free image.",
    )
    parser.add_argument("out", type=Path, help="FileDescriptorSet file to write")
    args = parser.parse_args(argv)
    try:
        files = collect_descriptors()
    except DescriptorError as exc:
        print(f"tfs_api: error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(files.SerializeToString())
    print(f"wrote {len(files.file)} API files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
