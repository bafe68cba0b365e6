"""Reading TensorFlow's error messages: which ones are the image decoder's, and its words.

Both backends see the decoder's errors inside longer text (graph node names, stack notes), in
process or through TF Serving; the caller should get the decoder's own sentence.
"""

from __future__ import annotations

_NOISE = ("Graph execution error", "Detected at node", "<stack traces", "[[")
#: Words of TensorFlow's decode errors (DecodeImage, DecodeJpeg, DecodePng, DecodeGif, DecodeBmp).
_DECODER_WORDS = ("decod", "jpeg", "png", "gif", "bmp", "frame")


def decoder_reason(message: str) -> str:
    """The first line of a TensorFlow error that is not graph or node noise."""
    lines = (line.strip() for line in message.splitlines())
    useful = [line for line in lines if line and not line.startswith(_NOISE)]
    return useful[0] if useful else "the decoder refused the data"


def is_decode_error(message: str) -> bool:
    """Whether an INVALID_ARGUMENT message comes from the image decoder."""
    lowered = decoder_reason(message).lower()
    return any(word in lowered for word in _DECODER_WORDS)
