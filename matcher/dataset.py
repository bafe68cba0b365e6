"""A labelled image folder: `DATA/<label>/<image>`, one sub-folder per catalogue label.

Folders whose name starts with `_` are not labels: `DATA/_outside/` holds photos of things that
are not in the catalogue, which training uses to set the "no match" threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from matcher.layout import OUTSIDE_DIR, RESERVED_PREFIX

#: File name endings read as images (case does not matter).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".heic", ".heif")


class DatasetError(ValueError):
    """The folder does not hold a usable labelled dataset; the message says why."""


@dataclass(frozen=True)
class Dataset:
    """Image paths with their labels, sorted by label then file name."""

    root: Path
    paths: list[Path]
    labels: list[str]

    @property
    def label_names(self) -> list[str]:
        return sorted(set(self.labels))

    def counts(self) -> dict[str, int]:
        return {name: self.labels.count(name) for name in self.label_names}


def discover(root: Path) -> Dataset:
    """Find `root/<label>/*.{jpg,jpeg,png,gif,bmp}`; hidden files and folders are skipped, and
    so are folders starting with `_` (`_outside/`, see `outside_images`)."""
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; expected DATA/<label>/<image> files")
    paths: list[Path] = []
    labels: list[str] = []
    empty: list[str] = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not _reserved(p)):
        images = images_in(label_dir)
        if not images:
            empty.append(label_dir.name)
        paths.extend(images)
        labels.extend([label_dir.name] * len(images))
    if empty:
        # An item whose photos are missing would otherwise vanish from the catalogue unnoticed.
        shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise DatasetError(
            f"label folder(s) {shown} under {root} hold no images ({', '.join(IMAGE_SUFFIXES)}): "
            "add photos, or move the folder out (or name it _<name> to keep it aside)"
        )
    dataset = Dataset(root, paths, labels)
    if len(dataset.label_names) < 2:
        raise DatasetError(
            f"{root} has {len(dataset.label_names)} label folder(s) with images; a classifier "
            "needs at least 2 (DATA/<label>/<image>)"
        )
    return dataset


def outside_images(folder: Path) -> list[Path]:
    """The images of an out-of-catalogue folder (any depth: sort them as you like), sorted."""
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder of out-of-catalogue photos")
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(_hidden(part) for part in p.relative_to(folder).parts)
    )


def default_outside(root: Path) -> Path | None:
    """`root/_outside/` when the training folder has one."""
    folder = root / OUTSIDE_DIR
    return folder if folder.is_dir() else None


def images_in(folder: Path) -> list[Path]:
    """The images directly in one label folder, sorted (hidden files skipped)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not _hidden(p.name) and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _reserved(path: Path) -> bool:
    return _hidden(path.name) or path.name.startswith(RESERVED_PREFIX)
