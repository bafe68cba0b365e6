"""Hostile and odd inputs for the Match RPC, each with the status the server must answer.

Every case builds its bytes from a real photo (or from nothing), so the corpus needs no files.
The expected status follows the service's documented rules: JPEG, PNG, GIF (first frame) or BMP
whose header passes the size limits and whose data the in-graph decoder accepts is OK; anything
else the caller sent wrongly is INVALID_ARGUMENT; a message above the receive limit is
RESOURCE_EXHAUSTED. Where the decoder's own strictness decides (a JPEG missing only its EOI, a
PNG missing only IEND), the case pins what TensorFlow does and says so in its reason.

`known_bug` names a case where the server does not (yet) answer what it should; the tests mark
those xfail(strict=True), so fixing the bug turns them into failures to update.

The module also holds the seed images and mutation operators the property-based test uses.
"""

from __future__ import annotations

import functools
import io
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from PIL import Image

from tests import samples

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Adam7 passes as (x0, y0, dx, dy).
ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)


@dataclass(frozen=True)
class Limits:
    """The server settings the edge cases are built against."""

    min_side: int
    max_side: int
    max_receive_bytes: int


@dataclass(frozen=True)
class Case:
    """One kind of input and what the server must answer for it."""

    kind: str
    build: Callable[[Limits], bytes]
    expected: grpc.StatusCode
    reason: str
    top_k: int = 0
    #: A decompression bomb: must be refused from the header, fast and without decoding.
    bomb: bool = False
    #: Set when the server answers something else today: what goes wrong, where.
    known_bug: str | None = None


# --- building blocks ------------------------------------------------------------------------


@functools.cache
def _photo_array(width: int, height: int) -> np.ndarray:
    # Cached as an array: building the photo reads scikit-image's data each time.
    return np.asarray(samples.photo((width, height)))


def photo(width: int = 160, height: int = 120) -> Image.Image:
    """A real photo (not flat colour, so features and decoders have work to do)."""
    return Image.fromarray(_photo_array(width, height))


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    """`image` encoded by Pillow."""
    return samples.encode(image, fmt, **options)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png_from_array(
    pixels: np.ndarray, bit_depth: int, color_type: int, interlace: bool = False
) -> bytes:
    """A PNG written by hand: Pillow writes neither 16-bit RGB nor Adam7-interlaced PNG.

    `pixels` is [H, W] or [H, W, C] of unsigned integers of `bit_depth` bits (8 or 16).
    """
    height, width = pixels.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    data = pixels.astype(dtype)
    passes = ADAM7 if interlace else ((0, 0, 1, 1),)
    raw = bytearray()
    for x0, y0, dx, dy in passes:
        sub = data[y0::dy, x0::dx]
        if sub.shape[0] == 0 or sub.shape[1] == 0:
            continue  # an empty Adam7 pass has no rows at all, not even filter bytes
        for row in sub:
            raw += b"\x00" + row.tobytes()  # filter type 0 (None) on every row
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, int(interlace))
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(bytes(raw), 9))
        + png_chunk(b"IEND", b"")
    )


def png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of each chunk of a well-formed PNG; end is past the CRC."""
    chunks = []
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 12 + length
        chunks.append((data[pos + 4 : pos + 8], pos, end))
        pos = end
    return chunks


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment of a well-formed JPEG, SOI excluded.

    The last one is the start of scan together with the entropy-coded data and EOI.
    """
    segments = []
    pos = 2
    while pos + 4 <= len(data):
        marker = data[pos + 1]
        if marker == 0xDA:
            segments.append((marker, pos, len(data)))
            break
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        segments.append((marker, pos, pos + 2 + length))
        pos += 2 + length
    return segments


def jpeg_marker(data: bytes, marker: int) -> tuple[int, int]:
    """(start, end) of the first segment with `marker` (0xC0 for SOF0, 0xDA for SOS...)."""
    for found, start, end in jpeg_segments(data):
        if found == marker:
            return start, end
    raise ValueError(f"no marker 0x{marker:02X}")


def without_jpeg_marker(data: bytes, marker: int) -> bytes:
    """The JPEG with every segment of `marker` removed."""
    kept = [data[s:e] for m, s, e in jpeg_segments(data) if m != marker]
    return data[:2] + b"".join(kept)


def with_sof_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its SOF0 header declaring width x height; the data is unchanged."""
    start, _ = jpeg_marker(data, 0xC0)
    patched = bytearray(data)
    patched[start + 5 : start + 9] = struct.pack(">HH", height, width)
    return bytes(patched)


def gif_parts(data: bytes) -> tuple[bytes, list[bytes], bytes]:
    """(header with screen and global colour table, [blocks of each frame], trailer).

    A frame's block is its extensions followed by its image descriptor and LZW data.
    """
    flags = data[10]
    pos = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    head, frames, current = data[:pos], [], bytearray()
    while data[pos] != 0x3B:
        if data[pos] == 0x21:  # extension: label, then sub-blocks up to a zero length
            end = pos + 2
        elif data[pos] == 0x2C:  # image descriptor, local colour table, LZW code size
            local = data[pos + 9]
            end = pos + 10 + (3 * 2 ** ((local & 7) + 1) if local & 0x80 else 0) + 1
        else:
            raise ValueError(f"unexpected GIF block 0x{data[pos]:02X} at {pos}")
        while data[end]:
            end += 1 + data[end]
        current += data[pos : end + 1]
        if data[pos] == 0x2C:
            frames.append(bytes(current))
            current = bytearray()
        pos = end + 1
    return head, frames, data[pos:]


def _gif_frame(image: Image.Image) -> tuple[bytes, bytes]:
    """(header, the single frame block) of `image` saved as a one-frame GIF."""
    head, frames, _ = gif_parts(encode(image, "GIF", optimize=False))
    return head, frames[0]


def flip_bytes(data: bytes, start: int, count: int, seed: int) -> bytes:
    """`count` bytes at random positions from `start` on, each XORed with 0xFF."""
    rng = np.random.default_rng(seed)
    mutated = bytearray(data)
    for pos in rng.integers(start, len(data) - 2, count):
        mutated[pos] ^= 0xFF
    return bytes(mutated)


def pad_to(data: bytes, size: int) -> bytes:
    """`data` followed by filler up to `size` bytes (decoders stop at the end marker)."""
    return data + b"\x00" * (size - len(data))


def _zip_archive() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("readme.txt", "not an image\n" * 100)
    return buffer.getvalue()


def _red(width: int, height: int, fmt: str = "PNG") -> bytes:
    return encode(Image.new("RGB", (width, height), (200, 30, 30)), fmt)


# --- the builders ---------------------------------------------------------------------------


def jpeg() -> bytes:
    """The reference JPEG most JPEG cases derive from (320x240, 25 KB)."""
    return encode(photo(320, 240), "JPEG", quality=90)


def scan_cut(fraction: float) -> Callable[[Limits], bytes]:
    """A builder of the reference JPEG cut `fraction` of the way through its scan data."""

    def build(_: Limits) -> bytes:
        data = jpeg()
        sos, _end = jpeg_marker(data, 0xDA)
        return data[: sos + int((len(data) - sos) * fraction)]

    return build


def sof_patched(offset: int, value: int) -> Callable[[Limits], bytes]:
    """A builder of the reference JPEG with the SOF0 byte `offset` into the segment replaced."""

    def build(_: Limits) -> bytes:
        data = bytearray(jpeg())
        start, _end = jpeg_marker(bytes(data), 0xC0)
        data[start + offset] = value
        return bytes(data)

    return build


def jpeg_sof_length_3(_: Limits) -> bytes:
    data = bytearray(jpeg())
    start, _end = jpeg_marker(bytes(data), 0xC0)
    data[start + 2 : start + 4] = struct.pack(">H", 3)  # shorter than the fields it holds
    return bytes(data)


def jpeg_claiming_10000_truncated(_: Limits) -> bytes:
    data = with_sof_size(jpeg(), 10_000, 10_000)
    sos, _end = jpeg_marker(data, 0xDA)
    return data[: sos + 200]


def jpeg_entropy_flipped(_: Limits) -> bytes:
    data = jpeg()
    sos, _end = jpeg_marker(data, 0xDA)
    return flip_bytes(data, sos + 20, 10, seed=1)


def cmyk_jpeg(_: Limits) -> bytes:
    return encode(photo().convert("CMYK"), "JPEG")


def exif_rotated_jpeg(_: Limits | None = None) -> bytes:
    """The photo with EXIF orientation 6 (rotate 90° clockwise to display)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo(), "JPEG", quality=90, exif=exif.tobytes())


def heic(image: Image.Image) -> bytes:
    """`image` as HEIC, the format of iPhone cameras (pillow-heif's encoder)."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    return encode(image, "HEIF", quality=90)


def plain_jpeg(_: Limits | None = None) -> bytes:
    """The same pixels and encoder settings as `exif_rotated_jpeg`, without EXIF."""
    return encode(photo(), "JPEG", quality=90)


def mpo(_: Limits) -> bytes:
    """A multi-picture JPEG (MPF APP2 segment), as phones write for depth maps or gain maps."""
    buffer = io.BytesIO()
    photo().save(buffer, "MPO", save_all=True, append_images=[photo().rotate(90)])
    return buffer.getvalue()


def restart_jpeg(_: Limits) -> bytes:
    data = encode(photo(), "JPEG", restart_marker_blocks=4)
    assert b"\xff\xdd" in data, "Pillow wrote no DRI segment"
    return data


def png_bad_crc(chunk_type: bytes) -> Callable[[Limits], bytes]:
    """A builder of the photo's PNG with the CRC of its first `chunk_type` chunk broken."""

    def build(_: Limits) -> bytes:
        data = bytearray(encode(photo(), "PNG"))
        _kind, _start, end = next(c for c in png_chunks(bytes(data)) if c[0] == chunk_type)
        data[end - 1] ^= 0xFF
        return bytes(data)

    return build


def png_truncated_idat(_: Limits) -> bytes:
    data = encode(photo(), "PNG")
    _kind, start, end = next(c for c in png_chunks(data) if c[0] == b"IDAT")
    return data[: (start + end) // 2]


def png_16bit_gray(_: Limits) -> bytes:
    gray = np.asarray(photo().convert("L")).astype(np.uint16) * 257
    return png_from_array(gray, 16, 0)


def png_16bit_rgb(_: Limits) -> bytes:
    return png_from_array(np.asarray(photo()).astype(np.uint16) * 257, 16, 2)


def png_interlaced(_: Limits) -> bytes:
    return png_from_array(np.asarray(photo()), 8, 2, interlace=True)


def png_palette_trns(_: Limits) -> bytes:
    data = encode(photo().convert("P"), "PNG", transparency=0)
    assert b"tRNS" in data
    return data


def png_with_text(body: bytes) -> bytes:
    """The photo's PNG with an iTXt chunk of `body` (after the keyword) before IDAT."""
    data = encode(photo(), "PNG")
    ihdr_end = png_chunks(data)[0][2]
    return data[:ihdr_end] + png_chunk(b"iTXt", b"comment\x00" + body) + data[ihdr_end:]


def png_huge_itxt(_: Limits) -> bytes:
    # Uncompressed: flag 0, method 0, empty language and translated keyword.
    return png_with_text(b"\x00\x00\x00\x00" + b"A" * 8_000_000)


def png_itxt_zip_bomb(_: Limits) -> bytes:
    # Compressed text that inflates to 200 MB from 200 KB.
    return png_with_text(b"\x01\x00\x00\x00" + zlib.compress(b"A" * 200_000_000, 9))


def gif() -> bytes:
    """The photo as a one-frame GIF (10 KB)."""
    return encode(photo().convert("P"), "GIF")


def animated_gif(_: Limits) -> bytes:
    frames = [photo().rotate(angle).convert("P") for angle in (0, 90, 180)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def gif_screen_claiming(_: Limits) -> bytes:
    """A 20x20 GIF whose logical screen declares 60000x60000 pixels."""
    data = bytearray(encode(photo(20, 20).convert("P"), "GIF"))
    data[6:10] = struct.pack("<HH", 60_000, 60_000)
    return bytes(data)


def gif_later_frame_too_wide(limits: Limits) -> bytes:
    """A 20x20 first frame, then a frame (max_side + 2000) x 20 pixels."""
    first = photo(20, 20).convert("P")
    head, frame0 = _gif_frame(first)
    wide = Image.new("P", (limits.max_side + 2000, 20), 0)
    wide.putpalette(first.getpalette() or [])
    _, frame1 = _gif_frame(wide)
    return head + frame0 + frame1 + b";"


def gif_lzw_flipped(_: Limits) -> bytes:
    data = gif()
    head, _frames, _trailer = gif_parts(data)
    return flip_bytes(data, len(head) + 20, 10, seed=2)


def bmp() -> bytes:
    """The photo as a 24-bit BMP."""
    return encode(photo(), "BMP")


def bmp_top_down(_: Limits) -> bytes:
    data = bytearray(bmp())
    (height,) = struct.unpack("<i", data[22:26])
    data[22:26] = struct.pack("<i", -height)  # rows stored top first; the rows stay as they are
    return bytes(data)


def bmp_os2(_: Limits) -> bytes:
    """A 24-bit BMP with the 12-byte OS/2 1.x BITMAPCOREHEADER (16-bit width and height)."""
    pixels = np.asarray(photo())[::-1, :, ::-1]  # bottom-up rows, BGR
    width, height = pixels.shape[1], pixels.shape[0]
    stride = (width * 3 + 3) // 4 * 4
    body = b"".join(row.tobytes().ljust(stride, b"\x00") for row in pixels)
    offset = 14 + 12
    return (
        b"BM"
        + struct.pack("<IHHI", offset + len(body), 0, 0, offset)
        + struct.pack("<IHHHH", 12, width, height, 1, 24)
        + body
    )


def dds_unknown_pixel_format(_: Limits) -> bytes:
    """A DirectDraw Surface whose pixel format flags are 0 (Pillow: NotImplementedError)."""
    data = bytearray(encode(photo(64, 64), "DDS"))
    data[80:84] = struct.pack("<I", 0)
    return bytes(data)


def spider_stack_member(_: Limits) -> bytes:
    """A SPIDER header naming image 1 of a stack without a stack (Pillow: AttributeError).

    SPIDER has no magic number: Pillow tries its reader on any bytes no other format claims.
    """
    side, lenbyt = 64, 64 * 4
    labrec = 1024 // lenbyt
    header = [0.0] * (labrec * lenbyt // 4 + 1)  # index 0 unused: SPIDER counts from 1
    header[1], header[2], header[5], header[12] = 1.0, side, 1.0, side
    header[13], header[22], header[23] = labrec, labrec * lenbyt, lenbyt
    header[27] = 1.0  # imgnumber > 0 while istack (24) is 0: "a member of a stack"
    return struct.pack(f"<{len(header) - 1}f", *header[1:]) + b"\x00" * (side * side * 4)


def random_bytes(size: int, prefix: bytes = b"", seed: int = 0) -> Callable[[Limits], bytes]:
    """A builder of `prefix` followed by random bytes, `size` bytes in all."""

    def build(_: Limits) -> bytes:
        noise = np.random.default_rng(seed).integers(0, 256, size - len(prefix), dtype=np.uint8)
        return prefix + noise.tobytes()

    return build


def constant(data: bytes) -> Callable[[Limits], bytes]:
    """A builder of fixed bytes."""
    return lambda _: data


SVG = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<svg xmlns="http://www.w3.org/2000/svg" width="640" height="480">'
    b'<rect width="640" height="480" fill="red"/></svg>\n'
)


# --- the corpus -----------------------------------------------------------------------------

CASES: tuple[Case, ...] = (
    # Not images at all.
    Case("empty", constant(b""), INVALID, "nothing to decode"),
    Case("random_bytes_4k", random_bytes(4096), INVALID, "no image signature"),
    Case(
        "random_bytes_after_jpeg_magic",
        random_bytes(4096, b"\xff\xd8\xff", seed=1),
        INVALID,
        "JPEG signature, then noise: no valid marker",
    ),
    Case(
        "random_bytes_after_png_signature",
        random_bytes(4096, PNG_SIGNATURE, seed=2),
        INVALID,
        "PNG signature, then no IHDR",
    ),
    Case("svg_text", constant(SVG), INVALID, "vector text, not a supported raster format"),
    Case(
        "jpeg_behind_html_prefix",
        lambda _: b"<html><body><img src='data:image/jpeg;base64,'>" + jpeg(),
        INVALID,
        "a valid JPEG not at offset 0 is not a JPEG file",
    ),
    Case("tiff_unsupported", lambda _: encode(photo(), "TIFF"), INVALID, "format not served"),
    Case("webp_lossy", lambda _: encode(photo(), "WEBP", quality=80), OK, "transcoded to PNG"),
    Case("webp_lossless", lambda _: encode(photo(), "WEBP", lossless=True), OK, "as above"),
    Case(
        "webp_truncated",
        lambda _: encode(photo(), "WEBP", quality=80)[:200],
        INVALID,
        "header readable, data cut: Pillow's decode fails in the rewrite",
    ),
    Case("heic_photo", lambda _: heic(photo()), OK, "a phone camera's format: transcoded"),
    Case(
        "heic_truncated",
        lambda _: heic(photo())[: len(heic(photo())) // 2],
        INVALID,
        "cut in its image data",
    ),
    Case(
        "heic_below_min_side",
        lambda limits: heic(Image.new("RGB", (limits.min_side - 1, 40), "grey")),
        INVALID,
        "sizes are checked from the HEIF header, before the rewrite decodes anything (x265 "
        "cannot encode one above the largest side, so the small side stands in)",
    ),
    Case(
        "dds_unknown_pixel_format",
        dds_unknown_pixel_format,
        INVALID,
        "an unsupported format whose Pillow reader fails while reading the header",
    ),
    Case(
        "spider_header_without_stack",
        spider_stack_member,
        INVALID,
        "headerless format tried on any bytes; its reader fails on an inconsistent header",
    ),
    # JPEG: truncated, corrupt, odd headers.
    Case("jpeg_soi_only", constant(b"\xff\xd8\xff"), INVALID, "signature only"),
    Case(
        "jpeg_cut_in_headers",
        lambda _: jpeg()[:200],
        INVALID,
        "cut before SOF: the header check cannot find the size",
    ),
    Case(
        "jpeg_cut_before_scan",
        lambda _: jpeg()[: jpeg_marker(jpeg(), 0xDA)[0]],
        INVALID,
        "headers complete, no scan: the decoder refuses",
    ),
    Case("jpeg_cut_at_25pct_of_scan", scan_cut(0.25), INVALID, "truncated scan data"),
    Case("jpeg_cut_at_50pct_of_scan", scan_cut(0.50), INVALID, "truncated scan data"),
    Case("jpeg_cut_at_90pct_of_scan", scan_cut(0.90), INVALID, "truncated scan data"),
    Case(
        "jpeg_missing_eoi",
        lambda _: jpeg()[:-2],
        INVALID,
        "only the EOI marker missing: TensorFlow's decoder (no try_recover_truncated) refuses",
    ),
    Case(
        "jpeg_flipped_bytes_in_entropy_data",
        jpeg_entropy_flipped,
        OK,
        "libjpeg resynchronises on corrupt entropy data (a warning, not an error): garbage "
        "pixels, answered",
    ),
    Case(
        "jpeg_without_dqt",
        lambda _: without_jpeg_marker(jpeg(), 0xDB),
        INVALID,
        "quantization table missing: the decoder refuses",
    ),
    Case(
        "jpeg_without_dht",
        lambda _: without_jpeg_marker(jpeg(), 0xC4),
        OK,
        "Huffman tables missing: libjpeg falls back to the standard tables (as for Motion JPEG)",
    ),
    Case("jpeg_sof_length_3", jpeg_sof_length_3, INVALID, "bogus SOF marker length"),
    Case("jpeg_12bit_precision", sof_patched(4, 12), INVALID, "12-bit samples are not decodable"),
    Case("jpeg_lossless_sof3", sof_patched(1, 0xC3), INVALID, "lossless process not supported"),
    Case(
        "jpeg_sof_claims_zero_size",
        lambda _: with_sof_size(jpeg(), 0, 0),
        INVALID,
        "0x0 (DNL height) is refused by the header check",
    ),
    Case(
        "jpeg_sof_claims_60000x60000",
        lambda _: with_sof_size(jpeg(), 60_000, 60_000),
        INVALID,
        "decompression bomb: 25 KB declaring 3.6 Gpx, refused from the header",
        bomb=True,
    ),
    Case(
        "jpeg_sof_claims_10000x10000_truncated",
        jpeg_claiming_10000_truncated,
        INVALID,
        "within the side limits, data cut after 200 bytes: the decoder refuses at once",
    ),
    Case(
        "jpeg_sof_claims_10000x10000_complete",
        lambda _: with_sof_size(jpeg(), 10_000, 10_000),
        INVALID,
        "within the side limits, but 100 megapixels: refused from the header by the area "
        "limit (max_image_pixels), sparing a +1.5 GB decode of 25 KB",
    ),
    Case("jpeg_cmyk", cmyk_jpeg, OK, "CMYK (Adobe) JPEG: converted to RGB by the decoder"),
    Case(
        "jpeg_grayscale",
        lambda _: encode(photo().convert("L"), "JPEG"),
        OK,
        "grey JPEG: channels=3 expands it",
    ),
    Case(
        "jpeg_progressive",
        lambda _: encode(photo(), "JPEG", progressive=True),
        OK,
        "progressive JPEG",
    ),
    Case("jpeg_restart_markers", restart_jpeg, OK, "DRI + RSTn markers every 4 MCUs"),
    Case(
        "jpeg_exif_orientation_6",
        exif_rotated_jpeg,
        OK,
        "EXIF orientation is ignored (README); see the features test",
    ),
    Case(
        "jpeg_trailing_garbage",
        lambda _: jpeg() + random_bytes(1000, seed=3)(_),
        OK,
        "decoders stop at EOI",
    ),
    Case(
        "jpeg_zip_polyglot",
        lambda _: jpeg() + _zip_archive(),
        OK,
        "a JPEG that is also a ZIP (archive appended): the image is what is decoded",
    ),
    Case(
        "jpeg_mpo_multi_picture",
        mpo,
        OK,
        "a baseline JPEG with an MPF segment and a second picture after EOI, as phones write",
    ),
    Case(
        "jpeg_16x16_exactly",
        lambda _: encode(photo(16, 16), "JPEG"),
        OK,
        "exactly the minimum side",
    ),
    Case(
        "jpeg_padded_just_under_receive_limit",
        lambda limits: pad_to(jpeg(), limits.max_receive_bytes - 64),
        OK,
        "a message just under the receive limit (64 bytes left for the protobuf framing)",
    ),
    Case(
        "message_above_receive_limit",
        lambda limits: pad_to(jpeg(), limits.max_receive_bytes + 1),
        TOO_BIG,
        "gRPC refuses the message before the servicer sees it",
    ),
    # PNG.
    Case("png_bad_ihdr_crc", png_bad_crc(b"IHDR"), INVALID, "Pillow checks the header's CRC"),
    Case("png_bad_idat_crc", png_bad_crc(b"IDAT"), INVALID, "libpng checks data CRCs"),
    Case("png_truncated_idat", png_truncated_idat, INVALID, "image data cut in half"),
    Case(
        "png_missing_iend",
        lambda _: encode(photo(), "PNG")[:-12],
        INVALID,
        "all pixels present, IEND missing: TensorFlow's PNG decoder refuses",
    ),
    Case(
        "png_signature_and_ihdr_only",
        lambda _: encode(photo(), "PNG")[:33],
        INVALID,
        "header, no data",
    ),
    Case(
        "png_claims_50000x50000",
        lambda _: samples.png_claiming(50_000, 50_000),
        INVALID,
        "decompression bomb: 69 bytes declaring 2.5 Gpx, refused from the header",
        bomb=True,
    ),
    Case("png_16bit_gray", png_16bit_gray, OK, "16-bit grey: scaled to 8 bits"),
    Case("png_16bit_rgb", png_16bit_rgb, OK, "48-bit RGB: scaled to 8 bits"),
    Case("png_palette_trns", png_palette_trns, OK, "palette with tRNS: alpha dropped"),
    Case("png_grayscale", lambda _: encode(photo().convert("L"), "PNG"), OK, "8-bit grey"),
    Case("png_gray_alpha", lambda _: encode(photo().convert("LA"), "PNG"), OK, "LA: alpha dropped"),
    Case("png_rgba", lambda _: encode(photo().convert("RGBA"), "PNG"), OK, "RGBA: alpha dropped"),
    Case("png_interlaced_adam7", png_interlaced, OK, "Adam7 interlacing"),
    Case(
        "png_8mb_itxt_small_image",
        png_huge_itxt,
        OK,
        "8 MB of uncompressed text metadata before a 160x120 image: skipped by both readers",
    ),
    Case(
        "png_itxt_zip_bomb",
        png_itxt_zip_bomb,
        INVALID,
        "compressed text inflating to 200 MB: Pillow stops at 1 MB and refuses (message says "
        "'not a recognised image'), before any pixel is decoded",
    ),
    Case(
        "png_1x1",
        lambda _: _red(1, 1),
        INVALID,
        "below the minimum side (16)",
    ),
    Case("png_15x16", lambda _: _red(15, 16), INVALID, "one pixel below the minimum side"),
    Case("png_16x16_exactly", lambda _: _red(16, 16), OK, "exactly the minimum side"),
    Case(
        "png_max_side_x16",
        lambda limits: _red(limits.max_side, 16),
        OK,
        "extreme aspect ratio at both edges (10000x16): within the rules",
    ),
    Case(
        "png_16_x_max_side",
        lambda limits: _red(16, limits.max_side),
        OK,
        "the same, portrait (16x10000)",
    ),
    Case(
        "png_max_side_plus_1_x16",
        lambda limits: _red(limits.max_side + 1, 16),
        INVALID,
        "one pixel above the maximum side",
    ),
    Case(
        "png_max_side_x15",
        lambda limits: _red(limits.max_side, 15),
        INVALID,
        "long side at the limit, short side one below the minimum",
    ),
    # GIF.
    Case("gif_cut_in_colour_table", lambda _: gif()[:30], INVALID, "cut in the colour table"),
    Case(
        "gif_cut_in_image_data",
        lambda _: gif()[: len(gif()) // 2],
        INVALID,
        "LZW data cut in half: giflib refuses",
    ),
    Case(
        "gif_missing_trailer",
        lambda _: gif()[:-1],
        OK,
        "the whole frame present, only the ';' trailer missing: giflib accepts",
    ),
    Case(
        "gif_flipped_bytes_in_lzw_data",
        gif_lzw_flipped,
        INVALID,
        "corrupt LZW codes: giflib refuses the frame",
    ),
    Case(
        "gif_screen_claims_60000x60000",
        gif_screen_claiming,
        INVALID,
        "decompression bomb: a 20x20 frame on a declared 60000x60000 screen, refused from the "
        "header",
        bomb=True,
    ),
    Case("gif_animated_3_frames", animated_gif, OK, "first frame used"),
    Case(
        "gif_later_frame_above_max_side",
        gif_later_frame_too_wide,
        INVALID,
        "the second frame is 2000 pixels wider than the maximum side",
    ),
    # BMP.
    Case("bmp_cut_in_header", lambda _: bmp()[:30], INVALID, "header incomplete"),
    Case(
        "bmp_truncated_pixels",
        lambda _: bmp()[: len(bmp()) // 2],
        INVALID,
        "half the rows: TensorFlow checks the size",
    ),
    Case(
        "bmp_1bit",
        lambda _: encode(photo().convert("1"), "BMP"),
        INVALID,
        "1-bit: refused from the header (TensorFlow decodes 8, 24 and 32 bits per pixel only)",
    ),
    Case(
        "bmp_8bit_palette",
        lambda _: encode(photo().convert("P"), "BMP"),
        INVALID,
        "refused from the header: TensorFlow would read the palette indices as grey levels",
    ),
    Case("bmp_32bit", lambda _: encode(photo().convert("RGBA"), "BMP"), OK, "BGRA: alpha dropped"),
    Case("bmp_top_down", bmp_top_down, OK, "negative height: rows stored top first"),
    Case(
        "bmp_os2_core_header",
        bmp_os2,
        INVALID,
        "OS/2 1.x header (16-bit sizes): TensorFlow reads only BITMAPINFOHEADER and refuses",
    ),
    # Requests that are odd in top_k rather than in the image.
    Case("top_k_zero_means_all", plain_jpeg, OK, "0 means every label", top_k=0),
    Case("top_k_above_label_count", plain_jpeg, OK, "every label, no error", top_k=500),
    Case("top_k_max_uint32", plain_jpeg, OK, "every label, no overflow", top_k=2**32 - 1),
)

BY_KIND: dict[str, Case] = {case.kind: case for case in CASES}
assert len(BY_KIND) == len(CASES), "kinds must be unique"


# --- seeds and mutations for the property-based test ----------------------------------------

#: Signatures that get random bytes past each reader's first check.
MAGICS: tuple[bytes, ...] = (
    b"\xff\xd8\xff",
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    PNG_SIGNATURE,
    PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR",
    b"GIF87a",
    b"GIF89a",
    b"BM",
)


@functools.cache
def seeds() -> dict[str, bytes]:
    """Small real images to mutate: small so that mutated headers stay cheap to decode."""
    image = photo(64, 48)
    return {
        "jpeg": encode(image, "JPEG", quality=85),
        "jpeg_progressive": encode(image, "JPEG", progressive=True),
        "png": encode(image, "PNG"),
        "png_palette": encode(image.convert("P"), "PNG", transparency=0),
        "gif": encode(image.convert("P"), "GIF"),
        "gif_animated": _two_frame_gif(image),
        "bmp": encode(image, "BMP"),
    }


def _two_frame_gif(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    frames = [image.convert("P"), image.rotate(180).convert("P")]
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of the structural pieces of a well-formed seed: JPEG marker segments, PNG
    chunks, GIF blocks, BMP headers and pixels. Mutations duplicate or drop whole pieces.

    An earlier mutation may have broken the structure: then the whole input is one piece.
    """
    try:
        return _segments(data) or [(0, len(data))]
    except (ValueError, IndexError, struct.error):
        return [(0, len(data))]


def _segments(data: bytes) -> list[tuple[int, int]]:
    if data.startswith(b"\xff\xd8"):
        return [(start, end) for _m, start, end in jpeg_segments(data)]
    if data.startswith(PNG_SIGNATURE):
        return [(start, end) for _k, start, end in png_chunks(data)]
    if data.startswith(b"GIF"):
        head, frames, _ = gif_parts(data)
        pieces, pos = [(0, len(head))], len(head)
        for frame in frames:
            pieces.append((pos, pos + len(frame)))
            pos += len(frame)
        return pieces
    if data.startswith(b"BM"):
        return [(0, 14), (14, 54), (54, len(data))]
    return [(0, len(data))]


@dataclass(frozen=True)
class Mutation:
    """One edit. Positions are taken modulo the length, so any value fits any input."""

    op: str  # flip | truncate | insert | overwrite | copy_range | dup_segment | drop_segment
    pos: int
    arg: int = 0
    payload: bytes = b""


def mutate(data: bytes, edits: Sequence[Mutation]) -> bytes:
    """`data` with `edits` applied in order."""
    out = bytearray(data)
    for edit in edits:
        size = len(out)
        if edit.op in ("dup_segment", "drop_segment"):
            pieces = segments(bytes(out))
            start, end = pieces[edit.pos % len(pieces)]
            piece = bytes(out[start:end])
            out[start:end] = piece * 2 if edit.op == "dup_segment" else b""
        elif size == 0:
            out += edit.payload
        elif edit.op == "flip":
            out[edit.pos % size] ^= 1 << (edit.arg % 8)
        elif edit.op == "truncate":
            del out[edit.pos % size :]
        elif edit.op == "insert":
            pos = edit.pos % (size + 1)
            out[pos:pos] = edit.payload
        elif edit.op == "overwrite":
            pos = edit.pos % size
            out[pos : pos + len(edit.payload)] = edit.payload
        elif edit.op == "copy_range":
            start = edit.pos % size
            piece = bytes(out[start : start + 1 + edit.arg % 256])
            dest = (edit.pos * 7919 + edit.arg) % (size + 1)
            out[dest:dest] = piece
        else:
            raise ValueError(f"unknown mutation {edit.op}")
    return bytes(out)
