"""The largest frame of a GIF, read from its block structure without decoding anything.

Pillow's header reports the first frame's size, but TensorFlow's GIF decoder sizes its canvas
from the largest frame, so a tiny file can declare a later frame of 60000 x 60000 pixels. And
it reads every frame (giflib's DGifSlurp, one byte a pixel) even when only the first is kept,
so a small file of many large, flat frames costs gigabytes: the frames' area is counted too.
"""

from __future__ import annotations

import struct

_TRAILER, _EXTENSION, _IMAGE = 0x3B, 0x21, 0x2C


class GifStructureError(ValueError):
    """The bytes stop or go wrong before the GIF's structure is complete."""


def _colour_table_size(flags: int) -> int:
    return 3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    """Position after a chain of data sub-blocks (each length-prefixed, ending with 0)."""
    while True:
        if pos >= len(data):
            raise GifStructureError("GIF data ends inside a block")
        length = data[pos]
        pos += 1 + length
        if length == 0:
            return pos


def largest_frame(data: bytes) -> tuple[int, int, int]:
    """(width, height) covering the logical screen and every frame's extent, and the pixels
    of all frames together (what giflib holds, one byte each, while it decodes)."""
    if len(data) < 13 or data[:3] != b"GIF":
        raise GifStructureError("not a GIF header")
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    pos = 13 + _colour_table_size(flags)
    frames_area = 0
    while pos < len(data) and data[pos] != _TRAILER:
        kind = data[pos]
        if kind == _EXTENSION:
            pos = _skip_sub_blocks(data, pos + 2)
        elif kind == _IMAGE:
            if pos + 10 > len(data):
                raise GifStructureError("GIF data ends inside an image descriptor")
            left, top, w, h, local = struct.unpack_from("<HHHHB", data, pos + 1)
            width, height = max(width, left + w), max(height, top + h)
            frames_area += w * h
            pos = _skip_sub_blocks(data, pos + 10 + _colour_table_size(local) + 1)
        else:
            break  # decoders stop at an unknown block; so do we
    return width, height, frames_area
