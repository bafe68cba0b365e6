"""A labelled image folder: `DATA/<label>/<image>`, one sub-folder per catalogue label."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: File name endings read as images (case does not matter).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


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
    """Find `root/<label>/*.{jpg,jpeg,png,gif,bmp}`; hidden files and folders are skipped."""
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; expected DATA/<label>/<image> files")
    paths: list[Path] = []
    labels: list[str] = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p)):
        images = sorted(
            p
            for p in label_dir.iterdir()
            if p.is_file() and not _hidden(p) and p.suffix.lower() in IMAGE_SUFFIXES
        )
        paths.extend(images)
        labels.extend([label_dir.name] * len(images))
    dataset = Dataset(root, paths, labels)
    if len(dataset.label_names) < 2:
        raise DatasetError(
            f"{root} has {len(dataset.label_names)} label folder(s) with images; a classifier "
            "needs at least 2 (DATA/<label>/<image>)"
        )
    return dataset


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")
