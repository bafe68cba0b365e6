"""The `openvino` engine: the version's OpenVINO model run in-process, no TensorFlow imported.

Export writes `openvino/model.xml` inside each SavedModel version (`export.openvino_model`):
the same network and weights, pixels in. Decoding and resizing happen before it, in Python
(`matcher.pixels`, the graph's preprocessing to the pixel), on a thread pool: Pillow releases
the GIL, so the images of a batch decode in parallel.

Precision: float32 unless asked for bfloat16 and the CPU computes it natively (OpenVINO lists
"BF16" in the CPU's OPTIMIZATION_CAPABILITIES on AVX512_BF16 or AMX); elsewhere bf16 is refused
at load rather than emulated slowly. Features are float32 either way. OpenVINO's bf16 of the
whole network misses the accuracy guard (min cosine 0.983 against `serving_default` on the
package photos, tests/test_engines.py), and marking nodes with `disable_fp16_compression`
runtime info changed nothing for convolutions, so bf16 here is *mixed*: the network is cut
before its `FP32_CONVOLUTIONS`-th convolution, the head compiled in f32 and the tail in bf16,
each image run through both (`bench.openvino_bf16` measures every cut: the error is spread over
the network, worst on low-contrast photos such as microaneurysms.png, and 16 float32
convolutions are the fewest that keep the guard there). `auto` is float32: the mixed network
gains 1.19x (all-bf16: 1.77x) on a 2-core AVX512_BF16 EPYC, with a margin over the guard too
thin to make it the default.
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
#: `--precision`: auto is fp32 (mixed bf16 keeps the guard by a thin margin, see above); bf16
#: by name only.
PRECISIONS = ("auto", FP32, BF16)
_HINT = {FP32: "f32", BF16: "bf16"}
#: Convolutions (in graph order) that stay float32 in a bf16 network (`split_network`): the
#: fewest that keep Lite0's features within the accuracy guard (`bench.openvino_bf16`).
FP32_CONVOLUTIONS = 16
_CONVOLUTIONS = ("Convolution", "GroupConvolution")
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
            if self.precision == BF16:  # a float32 head, then the rest in bfloat16
                head, tail, cut = split_network(path, FP32_CONVOLUTIONS)
                log.info("bf16: the first %d convolutions of %s run in float32", cut, path)
                stages = [(head, {**config, "INFERENCE_PRECISION_HINT": "f32"}), (tail, config)]
            else:
                stages = [(str(path), config)]
            compiled = [_core().compile_model(model, "CPU", cfg) for model, cfg in stages]
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"OpenVINO cannot compile {path}: {exc}") from exc
        self._requests = [model.create_infer_request() for model in compiled]
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
                data: Any = pixels[start : start + INFER_BATCH]
                for request in self._requests:  # one, or a float32 head and a bf16 tail
                    request.infer([data])
                    data = request.get_output_tensor(0).data
                outputs.append(np.array(data, np.float32))
        return np.concatenate(outputs) if len(outputs) > 1 else outputs[0]

    def features(self, images: Sequence[bytes]) -> np.ndarray:
        return self.run(self.pixels(images))


def split_network(path: Path, convolutions: int) -> tuple[Any, Any, int]:
    """The OpenVINO model at `path` cut before its `convolutions`-th convolution, or the first
    after it where the cut is clean (no tensor from before it used after it, as a residual
    connection would be): the head (pixels in, that convolution's input out), the tail (that
    in, the features out) and the convolutions the head holds. ValueError when no cut is."""
    import openvino as ov

    cut = max(1, convolutions)
    while True:
        model = _core().read_model(str(path))  # afresh each try: a failed cut rewires it
        found = [op for op in model.get_ordered_ops() if op.get_type_name() in _CONVOLUTIONS]
        if cut >= len(found):
            break
        tensor = found[cut].input_value(0)
        head = ov.Model([tensor], model.get_parameters(), "float32 head")
        middle = ov.opset13.parameter(tensor.get_partial_shape(), tensor.get_element_type())
        for consumer in list(tensor.get_target_inputs()):
            if consumer.get_node().get_type_name() != "Result":  # the head's output stays
                consumer.replace_source_output(middle.output(0))
        try:
            return head, ov.Model(model.get_results(), [middle], "bfloat16 tail"), cut
        except RuntimeError:  # an earlier tensor is needed after the cut: try the next one
            cut += 1
    raise ValueError(f"no clean cut from convolution {convolutions} of {len(found)}")


@functools.cache
def _decoders() -> ThreadPoolExecutor:
    """One decoding pool per process, shared by the runners a hot reload swaps."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="decode")
