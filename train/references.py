"""Thumbnails of the reference views, written into the run folder for `GetReference`.

A client shows a person the catalogue view a photo matched; the server has the run folder, not
the training images, so a small JPEG of every view travels with the index (and its manifest).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps

from matcher.layout import REFERENCES_DIR, THUMBNAIL_SIDE, thumbnail_path


def thumbnail(data: bytes, side: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG of the image's first frame, at most `side` pixels a side."""
    with Image.open(io.BytesIO(data)) as image:
        # EXIF orientation is not applied: the model sees the pixels as stored, and so should
        # the person comparing a match with its reference.
        small = ImageOps.contain(image.convert("RGB"), (side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def write_thumbnails(out: Path, paths: Sequence[Path], ids: Sequence[str]) -> None:
    """Replace `out/references/` with a thumbnail of each path, named by its reference id.

    Written beside the old folder and swapped in, so a server never reads a half-written one.
    """
    staging = out / f".{REFERENCES_DIR}.new"
    shutil.rmtree(staging, ignore_errors=True)
    for path, reference in zip(paths, ids, strict=True):
        # The served name (layout.thumbnail_path), under the staging folder.
        destination = staging / thumbnail_path(out, reference).relative_to(out / REFERENCES_DIR)
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(thumbnail(path.read_bytes()))
    old = out / REFERENCES_DIR
    if old.exists():
        retired = out / f".{REFERENCES_DIR}.old"
        shutil.rmtree(retired, ignore_errors=True)
        old.rename(retired)
        staging.rename(old)
        shutil.rmtree(retired)
    else:
        staging.rename(old)
