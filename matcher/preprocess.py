"""In-graph image preprocessing shared by training and serving.

The exported SavedModel takes encoded image bytes, so every client (the embedded backend,
TensorFlow Serving, training) goes through exactly these ops: no train/serve skew.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from matcher.pixels import JPEG_MARGIN, JPEG_SCALES

Normalizer = Callable[[tf.Tensor], tf.Tensor]

#: Images of one batch decoded at once in the graph (TF Serving's batching.config counts on
#: it: its decode memory is num_batch_threads x this x the largest image's pixels).
DECODE_PARALLEL = 4


def decode_rgb(encoded: tf.Tensor, size: int) -> tf.Tensor:
    """Decode one JPEG, PNG, GIF (first frame) or BMP into uint8 RGB [H, W, 3].

    `channels=3` turns grayscale into RGB and drops an alpha channel. JPEG uses libjpeg's
    accurate integer DCT (`INTEGER_ACCURATE`, JDCT_ISLOW), not TensorFlow's default fast one:
    it is what Pillow decodes with, so `matcher.pixels` (the fast engine's preprocessing, in
    Python) gives these pixels exactly, and it is the more accurate of the two.

    A JPEG much larger than size x size decodes at the largest reduced DCT scale (1/2, 1/4,
    1/8) that still leaves both sides at least twice `size` (`matcher.pixels.jpeg_scale`, whose
    constants this uses): the IDCT itself shrinks the image, so a 12-megapixel phone photo costs
    a 0.8-megapixel decode, and the antialiased resize after it still shrinks at least 2x.
    """

    def jpeg() -> tf.Tensor:
        header = tf.io.extract_jpeg_shape(encoded)
        shorter = tf.minimum(header[0], header[1])
        # Index of the largest scale that keeps the shorter side at or above 2 x `size`.
        fits = tf.stack(
            [shorter // scale >= JPEG_MARGIN * size for scale in JPEG_SCALES[:-1]] + [True]
        )
        index = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
        branches = [
            lambda scale=scale: tf.io.decode_jpeg(
                encoded, channels=3, ratio=scale, dct_method="INTEGER_ACCURATE"
            )
            for scale in JPEG_SCALES
        ]
        return tf.switch_case(index, branches)

    def other() -> tf.Tensor:
        return tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resize the whole image (no crop) to float32 [size, size, 3] in 0..255.

    The whole frame is kept because a catalogue item may sit anywhere in a field photo; the
    aspect ratio is not preserved, as in the original Inception graph. Antialiasing keeps
    large photos from aliasing when they shrink to the backbone's input. The kernel is a
    triangle (bilinear) stretched by the scale factor when shrinking, computed in float32:
    Pillow's `Image.resize(BILINEAR)` on float ("F") images is the same filter
    (`matcher.pixels`).

    The uint8 pixels go to the resize as they are: its kernel (ScaleAndTranslate) reads them
    as floats while it filters, so there is no float32 copy of the whole photo (4 bytes a
    pixel a channel: 600 MB for a 50-megapixel PNG) and the result is the same.
    """
    image = tf.image.resize(image, [size, size], antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)


def decode_batch(encoded: tf.Tensor, size: int) -> tf.Tensor:
    """Decode and resize a 1-D batch of encoded images into float32 [N, size, size, 3]."""
    return tf.map_fn(
        lambda one: resize(decode_rgb(one, size), size),
        encoded,
        fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
        # Images decode independently; the runtime overlaps this many. Each may hold a
        # whole decoded photo (3.5 bytes a pixel: 175 MB at 50 megapixels), so this bounds a
        # model call's decode memory; TF Serving's batching file counts on it.
        parallel_iterations=DECODE_PARALLEL,
    )
