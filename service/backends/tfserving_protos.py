"""TensorFlow Serving request and response messages, built and read by hand.

`tf.make_tensor_proto` costs about as much as a predict call and `float_val` is slow to read
from Python, so the DT_STRING input is built field by field and features are read from
`tensor_content` with `np.frombuffer`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2

from export.layout import INPUT_KEY, OUTPUT_KEY, SIGNATURE


def string_tensor(values: Sequence[bytes]) -> tensor_pb2.TensorProto:
    """A 1-D DT_STRING TensorProto holding `values`."""
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(values))]
    )
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=shape, string_val=values)


def predict_request(
    model_name: str,
    images: Sequence[bytes],
    version: int | None = None,
    signature: str = SIGNATURE,
) -> predict_pb2.PredictRequest:
    """A PredictRequest sending encoded images to our SavedModel's signature."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    request.inputs[INPUT_KEY].CopyFrom(string_tensor(images))
    return request


def float_matrix(tensor: tensor_pb2.TensorProto) -> np.ndarray:
    """Read a DT_FLOAT [N, D] TensorProto into a float32 array."""
    if tensor.dtype != types_pb2.DT_FLOAT:
        raise ValueError(f"expected DT_FLOAT features, got dtype {tensor.dtype}")
    shape = tuple(d.size for d in tensor.tensor_shape.dim)
    if tensor.tensor_content:
        flat = np.frombuffer(tensor.tensor_content, dtype="<f4")
    else:
        flat = np.asarray(tensor.float_val, dtype=np.float32)
    return flat.astype(np.float32, copy=False).reshape(shape)


def features_from_response(response: predict_pb2.PredictResponse) -> np.ndarray:
    """The feature matrix in a PredictResponse of our signature."""
    return float_matrix(response.outputs[OUTPUT_KEY])
