"""The SavedModel's in-graph preprocessing, in Python: encoded bytes to the network's pixels.

The fast engine (`matcher.backends.openvino_engine`) runs only the network, so decoding and
resizing happen here, and must give what `matcher.preprocess` gives in the graph, or a
classifier trained with one engine would not serve with the other (or with TF Serving):

- decoder: Pillow, whose JPEG decoder is libjpeg-turbo with the accurate integer DCT (ISLOW)
  and fancy upsampling, as the graph's `decode_jpeg(dct_method="INTEGER_ACCURATE")`; PNG, GIF
  (first frame) and BMP decode losslessly either way. Grey and alpha become RGB as with
  `channels=3`; 16-bit samples keep their high byte, as `decode_image(dtype=uint8)` does.
  No EXIF turn here: `matcher.images.for_graph` has made the bytes upright before either
  engine sees them. A JPEG whose shorter side is at least four times the input decodes at
  the same reduced DCT scale in both (libjpeg's scaled IDCT: identical pixels, `jpeg_scale`).
- resize: the whole frame (no crop, aspect ratio not kept) to size x size with a triangle
  (bilinear) kernel stretched by the scale factor when shrinking (antialiasing), computed in
  float32, as `tf.image.resize(antialias=True)`. Pillow resizes an 8-bit image with 8-bit
  intermediates, so each channel is resized as a float ("F") image instead: 8-bit rounding
  alone cost up to 0.03 of cosine similarity on small images.

The accuracy guard (`tests/test_engines.py`) holds both engines to cosine >= 0.999 per image.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import numpy as np
from PIL import Image

from matcher.errors import InvalidImageError

#: Pillow's names for JPEG files: a phone camera's JPEG with extra pictures (MPF) is "MPO".
JPEG_FORMATS = ("JPEG", "MPO")
#: libjpeg's reduced DCT scales, largest first; the graph's decoder uses these too
#: (`matcher.preprocess`).
JPEG_SCALES = (8, 4, 2, 1)
#: A scaled JPEG keeps at least this many times the input size a side, so the resize after it
#: still antialiases (features within a cosine of 0.999 of a full decode's on real photos).
JPEG_MARGIN = 2
#: Rows resized across at once (`resize`): 256 rows of a 10,000-pixel-wide photo are 10 MB as
#: float.
_STRIP_ROWS = 256
#: Pillow's modes for 16-bit grey images (PNG); "I" holds them widened to 32 bits.
_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I")


@contextlib.contextmanager
def decoding_errors() -> Iterator[None]:
    """Pillow's (and libheif's) many kinds of error on damaged pixel data, as InvalidImageError
    with the reason on one line: one wording for every decode before the model."""
    try:
        yield
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise InvalidImageError(f"image could not be decoded: {reason}") from exc


def jpeg_scale(width: int, height: int, size: int) -> int:
    """The reduced DCT scale a JPEG decodes at: the largest of 8, 4, 2 whose shorter side
    stays at least twice `size` (floor division, as the graph computes it), else 1."""
    shorter = min(width, height)
    return next((s for s in JPEG_SCALES if s == 1 or shorter // s >= JPEG_MARGIN * size), 1)


def decode(data: bytes, size: int | None = None) -> Image.Image:
    """The first frame of `data` as RGB, as the graph's decoder gives it (blocking); with
    `size`, a large JPEG at the graph's reduced DCT scale (`jpeg_scale`).

    InvalidImageError, with Pillow's reason on one line, when the pixels cannot be decoded."""
    with decoding_errors():
        image = Image.open(io.BytesIO(data))
        if size is not None and image.format in JPEG_FORMATS:
            scale = jpeg_scale(image.width, image.height, size)
            if scale > 1:
                # Pillow picks the largest scale whose result is at least the size asked
                # for: asking for width // scale x height // scale gives exactly `scale`.
                image.draft(None, (image.width // scale, image.height // scale))
        image.load()
        if image.mode == "RGB":
            # Already what the network reads: convert would copy it (4 bytes a pixel).
            return image
        with image:
            if image.mode in _WIDE_GREY:
                # A 16-bit grey PNG: Pillow's convert would clip its values at 255; the graph
                # keeps the high byte, as Pillow itself does for 16-bit colour.
                high = (np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8)
                return Image.fromarray(high).convert("RGB")
            return image.convert("RGB")


def resize(image: Image.Image, size: int) -> np.ndarray:
    """float32 [size, size, 3] in 0..255: the whole image, antialiased bilinear, in float.

    Pillow's resize is two passes, across then down. Across runs here on strips of rows, so
    no float copy of the whole photo exists (4 bytes a pixel a channel: 200 MB a channel for
    a 50-megapixel PNG), only its rows at the output's width; down then runs on those.
    Rows are independent in the first pass, so the pixels are Pillow's own one-call resize's
    (to float rounding: 2e-5 of 255 at most, measured)."""
    width, height = image.size
    across = np.empty((height, size, 3), np.float32)
    for top in range(0, height, _STRIP_ROWS):
        bottom = min(top + _STRIP_ROWS, height)
        strip = image.crop((0, top, width, bottom))
        for channel, plane in enumerate(strip.split()):
            across[top:bottom, :, channel] = np.asarray(
                plane.convert("F").resize((size, bottom - top), Image.Resampling.BILINEAR)
            )
    channels = [
        np.asarray(
            Image.fromarray(across[:, :, channel], "F").resize(
                (size, size), Image.Resampling.BILINEAR
            )
        )
        for channel in range(3)
    ]
    pixels: np.ndarray = np.clip(np.stack(channels, axis=-1), 0.0, 255.0)
    return pixels.astype(np.float32, copy=False)


def network_input(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes to the network's float32 [size, size, 3] pixels (blocking; Pillow
    releases the GIL while it decodes and resizes, so threads run this in parallel)."""
    return resize(decode(data, size), size)
