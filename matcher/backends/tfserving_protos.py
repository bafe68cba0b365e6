"""TensorFlow Serving request and response messages, built and read by hand.

`tf.make_tensor_proto` costs about as much as a predict call and `float_val` is slow to read
from Python, so the DT_STRING input is built field by field and features are read from
`tensor_content` with `np.frombuffer`. The message classes come from `tfs_api` (no TensorFlow).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from matcher.backends.tfs_api import DT_FLOAT, DT_STRING, TFServingApi
from matcher.layout import INPUT_KEY, OUTPUT_KEY, SIGNATURE


def predict_request(
    api: TFServingApi,
    model_name: str,
    images: Sequence[bytes],
    version: int | None = None,
    version_label: str | None = None,
    signature: str = SIGNATURE,
) -> Any:
    """A PredictRequest sending encoded images as a 1-D DT_STRING tensor to `signature`."""
    request = api.PredictRequest()
    set_model_spec(request.model_spec, model_name, version, version_label, signature)
    tensor = request.inputs[INPUT_KEY]
    tensor.dtype = DT_STRING
    tensor.tensor_shape.dim.add().size = len(images)
    tensor.string_val.extend(images)
    return request


def set_model_spec(
    spec: Any,
    model_name: str,
    version: int | None = None,
    version_label: str | None = None,
    signature: str | None = None,
) -> None:
    """Fill a ModelSpec: the name, at most one of version and label, the signature."""
    spec.name = model_name
    if version is not None:
        spec.version.value = version
    elif version_label:
        spec.version_label = version_label
    if signature:
        spec.signature_name = signature


def float_matrix(tensor: Any) -> np.ndarray:
    """Read a DT_FLOAT [N, D] TensorProto into a float32 array."""
    if tensor.dtype != DT_FLOAT:
        raise ValueError(f"expected DT_FLOAT features, got dtype {tensor.dtype}")
    shape = tuple(d.size for d in tensor.tensor_shape.dim)
    if tensor.tensor_content:
        flat = np.frombuffer(tensor.tensor_content, dtype="<f4")
    else:
        flat = np.asarray(tensor.float_val, dtype=np.float32)
    return flat.astype(np.float32, copy=False).reshape(shape)


def features_from_response(response: Any) -> np.ndarray:
    """The feature matrix in a PredictResponse of our signature."""
    if OUTPUT_KEY not in response.outputs:
        raise ValueError(f"response has no {OUTPUT_KEY!r} output: {sorted(response.outputs)}")
    return float_matrix(response.outputs[OUTPUT_KEY])
