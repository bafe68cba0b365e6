"""Checks on encoded images made from their headers, and the few rewritten before the graph.

Decoding happens in the SavedModel's graph (or, in the openvino engine, in `matcher.pixels`);
here we only read enough of the file to refuse what must not reach it: non-images, unsupported
formats, dimensions that would make decoding expensive (a small PNG can declare 100000 x 100000
pixels), and the damage one decoder refuses and the other would accept (a PNG critical chunk
failing its CRC or a missing IEND, an OS/2 BMP), so both engines answer every file alike.

Two kinds of photo are rewritten first (`for_graph`), in serving and in training alike, so that
both still share the graph's one decoder: HEIC (phone cameras) and WebP, which the graph cannot
decode, and any photo whose EXIF orientation says it is stored turned. Pillow decodes them,
turns them upright and re-encodes them as PNG, losslessly; every other photo reaches the graph
byte for byte.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import struct
import warnings
import zlib
from dataclasses import dataclass

from PIL import Image, ImageOps

from matcher.errors import InvalidImageError
from matcher.gif_frames import GifStructureError, largest_frame
from matcher.pixels import JPEG_FORMATS, JPEG_SCALES, decoding_errors, jpeg_scale

#: Formats the in-graph decoder (tf.io.decode_image) handles, as Pillow names them. Pillow calls
#: a JPEG with extra pictures (phone cameras' MPF) "MPO"; the decoder reads its first picture.
GRAPH_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP")
#: Formats the graph cannot decode, transcoded to PNG first: HEIC/HEIF (pillow-heif) and WebP.
TRANSCODED_FORMATS = ("HEIF", "WEBP")
SUPPORTED_FORMATS = GRAPH_FORMATS + TRANSCODED_FORMATS
#: EXIF's orientation tag; 1 is upright, 2-8 a flip and/or a turn to undo.
_ORIENTATION = 0x0112
_TURNED = range(2, 9)
#: BMP pixel modes the decoder gets wrong: it reads palette indices as grey levels.
_PALETTE_MODES = ("P", "1")
#: The DIB header size of OS/2 1.x BMPs (16-bit sizes), which the graph's decoder refuses.
_OS2_BMP_HEADER = 12
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class ImageLimits:
    """Accepted image dimensions, in pixels per side."""

    min_side: int = 16
    max_side: int = 10_000
    #: Width x height; each side within limits can still mean a 100-megapixel decode.
    max_pixels: int = 50_000_000


@dataclass(frozen=True)
class ImageHeader:
    """What the header says about an image."""

    format: str
    width: int
    height: int
    mode: str = ""
    #: EXIF orientation (1: upright, or no tag).
    orientation: int = 1
    #: GIF: the pixels of all its frames together (the decoder reads every frame).
    frames_area: int = 0
    #: A progressive JPEG: libjpeg holds the whole photo's DCT coefficients while it decodes,
    #: at any reduced scale.
    progressive: bool = False

    @property
    def needs_rewrite(self) -> bool:
        """Whether `for_graph` rewrites this photo (its format, or its orientation)."""
        return self.format in TRANSCODED_FORMATS or self.orientation in _TURNED

    def decode_pixels(self, input_size: int) -> int:
        """The RGB pixels decoding this image for a network of `input_size` holds at once:
        what the decode budget (`matcher.admission`) admits requests by.

        A large JPEG decodes at a reduced DCT scale (`matcher.pixels.jpeg_scale`, as both
        decoders do); a GIF's decoder also holds every frame at one byte a pixel (a third of
        an RGB pixel); every other format decodes whole."""
        if self.format in JPEG_FORMATS:
            return self._scaled(jpeg_scale(self.width, self.height, input_size))
        return self.width * self.height + -(-self.frames_area // 3)

    def upright_pixels(self, longest: int | None = None) -> int:
        """The pixels `decode_upright(data, longest)` holds: a JPEG at the reduced DCT scale
        Pillow's draft picks (`keeping`), anything else whole."""
        if longest is None or self.format not in JPEG_FORMATS:
            return self.width * self.height
        return self._scaled(self.keeping(longest))

    def rewritten_pixels(self, keep: int) -> int:
        """The pixels of the PNG `for_graph(data, header, keep)` gives the graph, which every
        later decode of the request (its views, the graph's, its keypoints') reads whole; 0
        when the photo reaches the graph as it is."""
        return self._reduced(self.keeping(keep)) if self.needs_rewrite else 0

    def keeping(self, side: int) -> int:
        """The largest reduced scale (8, 4, 2 or 1) whose shorter side still keeps `side`
        pixels: Pillow's JPEG draft rule, and the rewrite's for every format."""
        shorter = min(self.width, self.height)
        return next(s for s in JPEG_SCALES if s == 1 or shorter // s >= side)

    def _scaled(self, scale: int) -> int:
        """A JPEG decoded at `scale`, with, for a progressive one, its coefficients: 2 bytes
        each, up to three a pixel (4:4:4 sampling; 50 megapixels held 292 MB, measured),
        counted as two RGB pixels a pixel."""
        coefficients = 2 * self.width * self.height if self.progressive else 0
        return self._reduced(scale) + coefficients

    def _reduced(self, scale: int) -> int:
        """The pixels of this image reduced by `scale` (each side rounded up, as libjpeg's
        scaled IDCT and `Image.reduce` round it)."""
        return -(-self.width // scale) * -(-self.height // scale)


def load_image_readers() -> None:
    """Import every Pillow format plugin now (blocking, ~70 ms), not in the first request
    whose bytes no common format recognises."""
    Image.init()
    _register_heif()


@functools.cache
def _register_heif() -> None:
    """Teach Pillow HEIC/HEIF (once per process, before the first header is read)."""
    import pillow_heif

    pillow_heif.register_heif_opener()


def for_graph(data: bytes, header: ImageHeader, keep: int) -> bytes:
    """The bytes the graph should decode: `data` itself, or, for a HEIC or WebP photo or one
    stored turned (EXIF orientation), its first frame upright as a PNG (blocking: a decode
    and an encode; call it off an event loop).

    The PNG keeps `keep` pixels on its shorter side at the largest scale of 1/2, 1/4, 1/8
    that does (`matcher.views.rewrite_side`: what the finest view needs; an upright JPEG's
    views are cut from such a decode): a turned JPEG decodes at that DCT scale, a HEIC or WebP
    decodes whole and is reduced by the factor (a box filter, as the DCT scale is nearly). A
    turned 48-megapixel phone photo becomes a 3-megapixel PNG, not a 48-megapixel one that
    every later decode of the request would read whole (`ImageHeader.rewritten_pixels`)."""
    if not header.needs_rewrite:
        return data
    pixels = decode_upright(data, keep)  # a JPEG: already at its scale
    if header.format not in JPEG_FORMATS and (scale := header.keeping(keep)) > 1:
        pixels = pixels.reduce(scale)
    buffer = io.BytesIO()
    # Lossless, and the fastest level: the graph decodes it again at once.
    pixels.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_upright(data: bytes, longest: int | None = None) -> Image.Image:
    """The first frame of `data`, turned upright by its EXIF orientation, as RGB, as the graph's
    decoder gives it (channels=3 drops alpha and expands grey). With `longest`, a JPEG decodes
    at the reduced DCT scale that still keeps that many pixels a side; any other format whole
    (a HEIC's embedded thumbnail, which pillow-heif's draft would pick, is never read)
    (blocking).

    InvalidImageError, with Pillow's reason on one line, when the pixels cannot be decoded."""
    with decoding_errors():
        image = Image.open(io.BytesIO(data))
        if longest is not None and image.format in JPEG_FORMATS:
            image.draft("RGB", (longest, longest))
        image.load()
        # In place and only when needed: each copy of a 50-megapixel photo is 200 MB.
        ImageOps.exif_transpose(image, in_place=True)
        return image if image.mode == "RGB" else image.convert("RGB")


def inspect_image(data: bytes, limits: ImageLimits) -> ImageHeader:
    """Read the header of an encoded image and check it against `limits`.

    Raises InvalidImageError with a message naming the problem.
    """
    if not data:
        raise InvalidImageError("image is empty (0 bytes)")
    header = _read_header(data)
    if header.format not in SUPPORTED_FORMATS:
        raise InvalidImageError(
            f"unsupported image format {header.format}; send JPEG, PNG, HEIC, WebP, GIF or BMP"
        )
    if header.format == "BMP" and header.mode in _PALETTE_MODES:
        raise InvalidImageError(
            "palette and 1-bit BMP images are not supported; send a 24-bit BMP, PNG or JPEG"
        )
    if header.format == "PNG":
        exif = _check_png_chunks(data)
        header = dataclasses.replace(header, orientation=_exif_orientation(exif))
    if header.format == "BMP" and _bmp_header_size(data) == _OS2_BMP_HEADER:
        raise InvalidImageError(
            "OS/2 1.x BMP headers are not supported; send a Windows BMP, PNG or JPEG"
        )
    if header.format == "GIF":
        header = _with_largest_frame(header, data)
    _check_size(header, limits)
    return header


def _check_png_chunks(data: bytes) -> bytes | None:
    """Refuse a PNG whose critical chunks fail their CRC or that has no IEND, as libpng (the
    graph's decoder) does; Pillow would decode both, and the two engines must agree.

    Returns the payload of its eXIf chunk, if it has one: read here because Pillow's PNG
    `getexif` decodes the whole image to look for one after the pixels (a 50-megapixel
    decode, on the event loop, for every PNG without EXIF)."""
    exif = None
    position = len(_PNG_SIGNATURE)
    while position + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        end = position + 12 + length
        if end > len(data):
            break
        # A critical chunk's type starts with a capital letter; libpng only warns on others.
        critical = kind[:1].isupper()
        stored = struct.unpack(">I", data[end - 4 : end])[0]
        if critical and zlib.crc32(data[position + 4 : end - 4]) != stored:
            name = kind.decode("latin-1")
            raise InvalidImageError(f"PNG is damaged: its {name} chunk fails its CRC check")
        if kind == b"eXIf" and exif is None:
            exif = data[position + 8 : end - 4]
        if kind == b"IEND":
            return exif
        position = end
    raise InvalidImageError("PNG is incomplete: it ends before its IEND chunk (cut short?)")


def _bmp_header_size(data: bytes) -> int:
    """The DIB header's size, which names the BMP variant (12: OS/2 1.x, 40+: Windows)."""
    return int.from_bytes(data[14:18], "little") if len(data) >= 18 else 0


def _with_largest_frame(header: ImageHeader, data: bytes) -> ImageHeader:
    try:
        width, height, frames_area = largest_frame(data)
    except GifStructureError as exc:
        raise InvalidImageError(f"GIF structure is broken: {exc}") from exc
    return ImageHeader(header.format, width, height, header.mode, frames_area=frames_area)


def _read_header(data: bytes) -> ImageHeader:
    try:
        with warnings.catch_warnings():
            # Pillow warns (and above twice its limit, raises) on huge declared sizes; the
            # limits below are ours and stricter, so only its hard error matters here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            _register_heif()
            with Image.open(io.BytesIO(data)) as image:
                fmt = image.format or "unknown"
                # A PNG's EXIF is read from its chunks (`_check_png_chunks`), not by Pillow.
                orientation = 1 if fmt == "PNG" else _orientation(image)
                progressive = fmt in JPEG_FORMATS and bool(image.info.get("progressive"))
                return ImageHeader(
                    fmt, image.width, image.height, image.mode, orientation, 0, progressive
                )
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(f"image dimensions are far above the size limit: {exc}") from exc
    except Exception as exc:
        # Pillow tries every reader it has on unknown bytes, and some raise whatever they
        # raise (NotImplementedError, AttributeError, OverflowError): all mean "not an image".
        raise InvalidImageError(
            f"bytes are not a recognised image ({len(data)} bytes); send JPEG, PNG, HEIC, WebP, "
            "GIF or BMP"
        ) from exc


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag, or 1 when there is none or the EXIF block cannot be read."""
    try:
        value = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: the pixels are still a photo
        return 1
    return value if isinstance(value, int) else 1


def _exif_orientation(exif: bytes | None) -> int:
    """The orientation tag of a raw EXIF block, or 1 without one (or when it cannot be read)."""
    if not exif:
        return 1
    try:
        parsed = Image.Exif()
        parsed.load(exif)
        value = parsed.get(_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: the pixels are still a photo
        return 1
    return value if isinstance(value, int) else 1


def _check_size(header: ImageHeader, limits: ImageLimits) -> None:
    size = f"{header.width}x{header.height}"
    if max(header.width, header.height) > limits.max_side:
        raise InvalidImageError(
            f"image is {size} pixels; the limit is {limits.max_side} pixels a side"
        )
    if header.width * header.height > limits.max_pixels:
        raise InvalidImageError(
            f"image is {size} pixels ({header.width * header.height / 1e6:.0f} megapixels); "
            f"the limit is {limits.max_pixels / 1e6:.0f} megapixels"
        )
    if header.frames_area > limits.max_pixels:
        raise InvalidImageError(
            f"GIF frames hold {header.frames_area / 1e6:.0f} megapixels together (its decoder "
            f"reads every frame); the limit is {limits.max_pixels / 1e6:.0f} megapixels"
        )
    if min(header.width, header.height) < limits.min_side:
        raise InvalidImageError(
            f"image is {size} pixels; it must be at least {limits.min_side} pixels a side"
        )
