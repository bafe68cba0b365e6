"""A labelled image folder: `DATA/<label>/<image>`, one sub-folder per catalogue label.

Folders whose name starts with `_` are not labels: `DATA/_outside/` holds photos of things that
are not in the catalogue, which training uses to set the "no match" threshold.

A label is its folder's name in any script ("café", "拉链"), in Unicode's composed form (NFC).
"""

from __future__ import annotations

import unicodedata
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

    def name(self, index: int) -> str:
        """Photo `index` as the user filed it: its path under `root` ("café/x.jpg")."""
        return self.paths[index].relative_to(self.root).as_posix()

    def reference_id(self, index: int) -> str:
        """Photo `index`'s reference id, `<label>/<file name>`: it starts with the label even
        where the folder's name is decomposed (see `label_of`)."""
        return f"{self.labels[index]}/{self.paths[index].name}"


def discover(root: Path) -> Dataset:
    """Find `root/<label>/*.{jpg,jpeg,png,gif,bmp}`; hidden files and folders are skipped, and
    so are folders starting with `_` (`_outside/`, see `outside_images`)."""
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; expected DATA/<label>/<image> files")
    paths: list[Path] = []
    labels: list[str] = []
    empty: list[str] = []
    folders: dict[str, Path] = {}
    for label_dir in sorted(
        (p for p in root.iterdir() if p.is_dir() and not _reserved(p)), key=label_of
    ):
        label = label_of(label_dir)
        if label in folders:
            raise DatasetError(_same_label(label, folders[label], label_dir))
        folders[label] = label_dir
        images = images_in(label_dir)
        if not images:
            empty.append(label_dir.name)
        paths.extend(images)
        labels.extend([label] * len(images))
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


def label_of(folder: Path) -> str:
    """The label a label folder stands for: its name, composed (Unicode NFC).

    macOS, and archives and copies made there, spell "é" as "e" plus a combining accent; a
    client comparing answers with its own (composed) names would never find that label.
    """
    return unicodedata.normalize("NFC", folder.name)


def _same_label(label: str, first: Path, second: Path) -> str:
    # ascii() tells the two spellings apart: printed as they are, they look the same.
    return (
        f"label folders {first.name!a} and {second.name!a} under {first.parent} are one label, "
        f"{label}, spelt in two Unicode forms: merge them into one folder"
    )


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
