"""Reading TensorFlow's error messages: which ones are the image decoder's, and its words.

Both backends see the decoder's errors inside longer text (graph node names, stack notes), in
process or through TF Serving; the caller should get the decoder's own sentence.
"""

from __future__ import annotations

from matcher.errors import InvalidImageError, ModelLoadError

_NOISE = ("Graph execution error", "Detected at node", "<stack traces", "[[")
#: Words of TF Serving's complaints about a request's structure rather than its images: an input
#: alias missing or unknown, a dtype the signature does not take, a ModelSpec or signature it
#: cannot serve. The SavedModel takes nothing but the encoded images, so every other
#: INVALID_ARGUMENT (the decoders', in their many wordings: "Input size should match ...",
#: "Number of channels inherent in the image ...") is about the image data.
_REQUEST_WORDS = ("alias", "signature", "expects arg", "modelspec", "tensor parsing")


def decoder_reason(message: str) -> str:
    """The first line of a TensorFlow error that is not graph or node noise."""
    lines = (line.strip() for line in message.splitlines())
    useful = [line for line in lines if line and not line.startswith(_NOISE)]
    return useful[0] if useful else "the decoder refused the data"


def is_request_error(message: str) -> bool:
    """Whether an INVALID_ARGUMENT message is about the request's structure, not an image."""
    lowered = decoder_reason(message).lower()
    return any(word in lowered for word in _REQUEST_WORDS)


def invalid_argument_error(message: str, where: str) -> InvalidImageError | ModelLoadError:
    """What the SavedModel's INVALID_ARGUMENT means, in process or through TF Serving alike.

    The decoder refusing an image is the caller's bad image; a request the signature does not
    take (a wrong input key, dtype or signature) means the model does not fit what the matcher
    sends, which no other image would fix.
    """
    if is_request_error(message):
        return ModelLoadError(f"{where}: INVALID_ARGUMENT: {decoder_reason(message)}")
    return InvalidImageError(f"image could not be decoded: {decoder_reason(message)}")
