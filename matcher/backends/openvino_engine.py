"""The `openvino` engine: the version's OpenVINO model run in-process, no TensorFlow imported.

Export writes `openvino/model.xml` inside each SavedModel version (`export.openvino_model`):
the same network and weights, pixels in. Decoding and resizing happen before it, in Python
(`matcher.pixels`, the graph's preprocessing to the pixel), on a thread pool: Pillow releases
the GIL, so the images of a batch decode in parallel.

Precision: float32 unless asked for bfloat16 and the CPU computes it natively (OpenVINO lists
"BF16" in the CPU's OPTIMIZATION_CAPABILITIES on AVX512_BF16 or AMX); elsewhere bf16 is refused
at load rather than emulated slowly. Features are float32 either way. `auto` is float32: on an
AVX512_BF16 CPU (2026-12-02) OpenVINO's bf16 gave a minimum cosine of 0.983 against
`serving_default` on the package photos, below the 0.999 guard (tests/test_engines.py); keeping
early layers in float32 through the nodes' `disable_fp16_compression` runtime info changed
nothing. So bf16 runs only when asked for by name, with a warning.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from matcher.errors import ModelLoadError
from matcher.layout import OPENVINO_MODEL_FILE
from matcher.pixels import network_input

log = logging.getLogger(__name__)

ENGINE = "openvino"
FP32 = "fp32"
BF16 = "bf16"
#: `--precision`: auto is fp32 (bf16 misses the accuracy guard, see above); bf16 by name only.
PRECISIONS = ("auto", FP32, BF16)
_HINT = {FP32: "f32", BF16: "bf16"}
#: Images per inference. OpenVINO keeps the activations of the largest batch it has run:
#: Lite0 at batch 32 held 333 MB more than at batch 1, at batch 4 about 40 MB, and on 2 cores
#: batch 4 ran as fast as any (81, 94, 91, 87 img/s at 1, 4, 8, 32). A server batch of 32
#: views is therefore run as 8 inferences of 4.
INFER_BATCH = 4


def has_model(version_dir: Path) -> bool:
    """Whether export wrote an OpenVINO model into this SavedModel version."""
    return (version_dir / OPENVINO_MODEL_FILE).is_file()


@functools.cache
def _core() -> Any:
    """One OpenVINO runtime per process (it enumerates devices when created)."""
    import openvino as ov

    return ov.Core()


def cpu_has_bf16() -> bool:
    """Whether OpenVINO computes bfloat16 natively on this CPU (AVX512_BF16 or AMX).

    `matcher.backbones.precision.cpu_has_bf16` answers the same from /proc/cpuinfo for
    TensorFlow's bf16 exports, but imports Keras; this asks the runtime that will run it."""
    return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def resolve_precision(requested: str) -> str:
    """The precision to run at: `requested`, with auto decided by this CPU."""
    if requested not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {requested!r}; choose one of {PRECISIONS}")
    if requested == "auto":
        return FP32
    if requested == BF16 and not cpu_has_bf16():
        raise ModelLoadError(
            "precision bf16 needs a CPU with AVX512_BF16 or AMX, and OpenVINO finds neither "
            "here; use --precision fp32 (or auto)"
        )
    if requested == BF16:
        log.warning(
            "precision bf16: OpenVINO's bf16 features differ from fp32's beyond the accuracy "
            "guard (min cosine 0.983 < 0.999 on package photos); answers may change"
        )
    return requested


class OpenVinoRunner:
    """One compiled OpenVINO model and the decoders that feed it."""

    engine = ENGINE

    def __init__(
        self, version_dir: Path, input_size: int, precision: str, threads: int | None = None
    ) -> None:
        path = version_dir / OPENVINO_MODEL_FILE
        if not path.is_file():
            raise ModelLoadError(
                f"{version_dir} has no OpenVINO model ({OPENVINO_MODEL_FILE}): it was exported "
                "before the openvino engine existed, or with --precision bf16 (TensorFlow's "
                "bfloat16); export it again in fp32, or use --engine tensorflow"
            )
        self.precision = resolve_precision(precision)
        self.input_size = input_size
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": _HINT[self.precision],
            # One request at a time, each using every core: a batch is one request.
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads:
            # Fewer than the machine's cores: a Ray actor given some of a node's CPUs.
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self._compiled = _core().compile_model(str(path), "CPU", config)
        except RuntimeError as exc:
            raise ModelLoadError(f"OpenVINO cannot compile {path}: {exc}") from exc
        self._request = self._compiled.create_infer_request()
        # An infer request runs one inference at a time; callers may share the runner.
        self._lock = threading.Lock()

    def pixels(self, images: Sequence[bytes]) -> np.ndarray:
        """float32 [N, S, S, 3]: the batch decoded and resized (InvalidImageError if one
        cannot be decoded)."""
        size = self.input_size
        if len(images) == 1:
            return network_input(images[0], size)[None]
        return np.stack(list(_decoders().map(lambda data: network_input(data, size), images)))

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """The network alone: float32 pixels [N, S, S, 3] to float32 features [N, D], in
        inferences of at most INFER_BATCH images."""
        if not len(pixels):
            raise ValueError("no images to run the network on")
        outputs = []
        with self._lock:
            for start in range(0, len(pixels), INFER_BATCH):
                self._request.infer([pixels[start : start + INFER_BATCH]])
                outputs.append(np.array(self._request.get_output_tensor(0).data, np.float32))
        return np.concatenate(outputs) if len(outputs) > 1 else outputs[0]

    def features(self, images: Sequence[bytes]) -> np.ndarray:
        return self.run(self.pixels(images))


@functools.cache
def _decoders() -> ThreadPoolExecutor:
    """One decoding pool per process, shared by the runners a hot reload swaps."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="decode")
