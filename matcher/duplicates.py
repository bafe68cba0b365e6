"""Copies of one photo in a labelled folder, found by content: the sha256 of the file's bytes,
the digest the feature cache (`matcher.extraction`) keys its entries by.

Under two labels a copy contradicts itself (one photo cannot show two items, and the matcher
would learn both from the same pixels): `train` refuses it. Under one label it does no harm to
training, but a copy on each side of the hold-out split is measured against itself, so the
hold-out accuracy and the no-match threshold come out better than new photos would make them:
`train` warns and records it in report.json (`data.duplicates`).

Only files that share their size with another file are read: distinct photos almost never
have the same number of bytes, so on a catalogue without copies this costs one `stat` per file.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from integrity.manifest import file_sha256
from matcher.dataset import Dataset, DatasetError

#: Threads hashing files of equal size (hashlib and file reads release the GIL).
HASHING_THREADS = 4
#: Groups named in an error message or logged one per line; report.json records them all.
SHOWN = 3


def copies(paths: Sequence[Path]) -> list[list[int]]:
    """Groups of two or more indices of `paths` whose files hold the same bytes, in path order.

    Empty and unreadable files are left out: extraction rejects them, with the reason.
    """
    by_size: dict[int, list[int]] = defaultdict(list)
    for index, path in enumerate(paths):
        if size := _size(path):
            by_size[size].append(index)
    candidates = [index for group in by_size.values() if len(group) > 1 for index in group]
    with ThreadPoolExecutor(HASHING_THREADS, thread_name_prefix="duplicates") as pool:
        digests = pool.map(_sha256, [paths[i] for i in candidates])
        by_digest: dict[str, list[int]] = defaultdict(list)
        for index, digest in zip(candidates, digests, strict=True):
            if digest:
                by_digest[digest].append(index)
    return sorted((group for group in by_digest.values() if len(group) > 1), key=min)


def refuse_mixed_labels(dataset: Dataset, groups: Sequence[Sequence[int]]) -> None:
    """Raise DatasetError naming the copies filed under more than one label."""
    mixed = [group for group in groups if len({dataset.labels[i] for i in group}) > 1]
    if not mixed:
        return
    shown = "; ".join(" = ".join(dataset.name(i) for i in group) for group in mixed[:SHOWN])
    more = f" and {len(mixed) - SHOWN} more" if len(mixed) > SHOWN else ""
    raise DatasetError(
        f"the same photo is filed under two labels in {dataset.root}: {shown}{more}; a photo "
        "shows one item, so delete the copy under the wrong label"
    )


def across_split(
    dataset: Dataset,
    groups: Sequence[Sequence[int]],
    kept: Sequence[int],
    holdout: Collection[int],
) -> list[dict[str, Any]]:
    """The copies (one label each) with a photo on each side of the hold-out split.

    `kept[row]` is the dataset index of the split's `row`; `holdout` holds the held-out rows.
    Each entry names the label and the copies on each side, as filed under `dataset.root`.
    """
    row_of = {index: row for row, index in enumerate(kept)}
    held = set(holdout)
    found = []
    for group in groups:
        rows = [row_of[i] for i in group if i in row_of]
        sides = {
            side: [dataset.name(kept[row]) for row in rows if (row in held) == is_held]
            for side, is_held in (("train", False), ("holdout", True))
        }
        if sides["train"] and sides["holdout"]:
            found.append({"label": dataset.labels[group[0]], **sides})
    return found


def describe(found: Sequence[dict[str, Any]]) -> list[str]:
    """One line for each of the first groups `across_split` found (and one for the rest)."""
    lines = [
        f"the same photo is on both sides of the hold-out split (label {entry['label']}): "
        f"{' = '.join(entry['train'] + entry['holdout'])}; it is measured against itself, so "
        "the hold-out accuracy and no-match threshold flatter: delete the extra copies"
        for entry in found[:SHOWN]
    ]
    if len(found) > SHOWN:
        lines.append(f"... and {len(found) - SHOWN} more such photos (report.json data.duplicates)")
    return lines


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _sha256(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError:
        return ""
