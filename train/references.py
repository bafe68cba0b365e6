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

from matcher.images import load_image_readers
from matcher.layout import REFERENCES_DIR, THUMBNAIL_SIDE, thumbnail_path


def thumbnail(data: bytes, side: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG of the image's first frame, at most `side` pixels a side."""
    with Image.open(io.BytesIO(data)) as image:
        # Upright, as the model sees it (matcher.images.for_graph applies EXIF orientation).
        upright = ImageOps.exif_transpose(image).convert("RGB")
    small = ImageOps.contain(upright, (side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def write_thumbnail(out: Path, path: Path, reference_id: str) -> None:
    """Add one view's thumbnail to `out/references/` (for an item added without retraining)."""
    load_image_readers()
    destination = thumbnail_path(out, reference_id)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(f".{destination.name}.tmp")
    tmp.write_bytes(thumbnail(path.read_bytes()))
    tmp.replace(destination)


def write_thumbnails(out: Path, paths: Sequence[Path], ids: Sequence[str]) -> None:
    """Replace `out/references/` with a thumbnail of each path, named by its reference id.

    Written beside the old folder and swapped in, so a server never reads a half-written one.
    """
    load_image_readers()  # HEIC views too
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
