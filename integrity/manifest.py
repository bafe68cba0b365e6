"""One `manifest.json` per artefact directory: every other file's sha256 and size, and who wrote it.

Two kinds of directory, told apart by their content:

- a **SavedModel version** (`saved_model.pb` in it): every file is listed, and a file the
  manifest does not list is refused, because TensorFlow may read it (an added variables shard
  or asset changes what loads);
- a **classifier folder** (anything else): every file except the `report/` folder is listed,
  and unlisted files are ignored. `report/` holds pictures drawn from the listed files, which
  `make report` redraws at any time; the service opens only the classifier file and
  `report.json`, and only when the manifest lists them.

A manifest catches corrupted, truncated, swapped and edited files. Whoever can write the folder
can also rewrite its manifest: where the folder itself is not trusted, anchor trust outside it
(`--classifier-sha256`, a read-only volume, a digest kept in your own records).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, Literal

MANIFEST_FILE = "manifest.json"
#: Written beside the manifest and renamed over it, so a reader never sees half a manifest.
_MANIFEST_TMP = f".{MANIFEST_FILE}.tmp"
FORMAT = 1

Kind = Literal["savedmodel", "classifier"]
KINDS: tuple[Kind, ...] = ("savedmodel", "classifier")
#: Top-level folders of a classifier folder that its manifest does not cover: the HTML report,
#: redrawn from the listed files by `make report` whenever someone asks.
CLASSIFIER_EXCLUDED = ("report",)

_SHA256 = re.compile(r"[0-9a-f]{64}")


class IntegrityError(Exception):
    """A directory does not match its manifest; the message names the first problem."""

    def __init__(self, problems: list[str]) -> None:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        super().__init__(problems[0] + more)
        self.problems = problems


class ManifestMissingError(IntegrityError):
    """The directory has no manifest at all."""


@dataclass(frozen=True)
class FileEntry:
    """One listed file."""

    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """What `manifest.json` records about its directory."""

    kind: Kind
    #: The command that wrote it (`export`, `train`, or `integrity` for an operator).
    tool: str
    #: The matcher version that command belonged to.
    tool_version: str
    created: str
    #: Relative POSIX path -> digest and size, for every covered file but the manifest itself.
    files: dict[str, FileEntry]
    #: Top-level folders deliberately not covered.
    excluded: tuple[str, ...] = ()

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "format": FORMAT,
                    "kind": self.kind,
                    "tool": self.tool,
                    "tool_version": self.tool_version,
                    "created": self.created,
                    "excluded": list(self.excluded),
                    "files": {
                        path: {"sha256": e.sha256, "size": e.size}
                        for path, e in sorted(self.files.items())
                    },
                },
                indent=2,
            )
            + "\n"
        )


def how_to_create(directory: Path) -> str:
    """The advice every 'no manifest' message gives."""
    return f"check its files, then run `python -m integrity write {directory}`"


def file_sha256(path: Path) -> str:
    """Lowercase hex sha256 of a file, read in chunks."""
    return _digest(path)[0]


def kind_of(directory: Path) -> Kind:
    """`savedmodel` for a SavedModel version directory, else `classifier`."""
    is_savedmodel = any((directory / n).is_file() for n in ("saved_model.pb", "saved_model.pbtxt"))
    return "savedmodel" if is_savedmodel else "classifier"


def write_manifest(directory: Path, tool: str = "integrity", kind: Kind | None = None) -> Manifest:
    """Digest every covered file under `directory` into its `manifest.json` (replaced whole).

    Call it after every other file is written: a file added later is not covered.
    """
    kind = kind or kind_of(directory)
    excluded = CLASSIFIER_EXCLUDED if kind == "classifier" else ()
    files = {}
    for relative, path in _scan(directory, excluded).items():
        if not path.is_file():
            raise IntegrityError([f"{path} is not a regular file; a manifest lists files only"])
        files[relative] = FileEntry(*_digest(path))
    manifest = Manifest(
        kind=kind,
        tool=tool,
        tool_version=matcher_version(),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        files=files,
        excluded=excluded,
    )
    tmp = directory / _MANIFEST_TMP
    tmp.write_text(manifest.to_json())
    os.replace(tmp, directory / MANIFEST_FILE)
    return manifest


def read_manifest(directory: Path) -> Manifest:
    """The manifest of `directory`, checked for shape (not against the files)."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ManifestMissingError(
            [f"{directory} has no {MANIFEST_FILE}; {how_to_create(directory)}"]
        )
    try:
        return _parse(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise IntegrityError(
            [f"{path} is not a valid manifest ({exc}); {how_to_create(directory)}"]
        ) from exc


def verify(directory: Path, kind: Kind | None = None) -> Manifest:
    """Check every listed file's size and sha256; raise IntegrityError on any difference.

    For a SavedModel version, a file the manifest does not list is an error too. `kind`
    defaults to what the directory looks like; a loader passes the kind it is about to load.
    """
    kind = kind or kind_of(directory)
    manifest = read_manifest(directory)
    problems = []
    for relative, entry in sorted(manifest.files.items()):
        path = directory / relative
        if not path.is_file():
            problems.append(f"{path} is listed in {MANIFEST_FILE} but missing")
            continue
        digest, size = _digest(path)
        if (digest, size) != (entry.sha256, entry.size):
            problems.append(
                f"{path} has sha256 {digest} ({size} bytes) but {MANIFEST_FILE} records "
                f"{entry.sha256} ({entry.size} bytes)"
            )
    if kind == "savedmodel":
        for relative in sorted(set(_scan(directory, ())) - set(manifest.files)):
            problems.append(
                f"{directory / relative} is not listed in {MANIFEST_FILE} "
                "(in a SavedModel an added file can change what loads)"
            )
    if problems:
        raise IntegrityError(problems)
    return manifest


def matcher_version() -> str:
    """The matcher's version, from its installed metadata or the checkout's pyproject.toml."""
    try:
        return metadata.version("matcher")
    except metadata.PackageNotFoundError:
        pass
    try:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"  # an image with the code but without pyproject.toml


def _digest(path: Path) -> tuple[str, int]:
    """sha256 and size from one read, so the two describe the same bytes."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _scan(directory: Path, excluded: tuple[str, ...]) -> dict[str, Path]:
    """Relative POSIX path -> path of everything under `directory` but the manifest.

    Links to folders are not followed but reported as entries, so a strict check refuses them
    (TensorFlow would follow them).
    """
    found = {}
    for root, dirs, files in os.walk(directory):
        here = Path(root)
        if here == directory:
            dirs[:] = [d for d in dirs if d not in excluded]
            files = [f for f in files if f not in (MANIFEST_FILE, _MANIFEST_TMP)]
        links = [d for d in dirs if (here / d).is_symlink()]
        for name in sorted([*files, *links]):
            found[(here / name).relative_to(directory).as_posix()] = here / name
    return found


def _parse(data: Any) -> Manifest:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"expected a JSON object with format {FORMAT}")
    if data["kind"] not in KINDS:
        raise ValueError(f"unknown kind {data['kind']!r}")
    files = {}
    for relative, entry in data["files"].items():
        parts = PurePosixPath(relative).parts
        if not parts or relative.startswith("/") or ".." in parts or relative == MANIFEST_FILE:
            raise ValueError(f"{relative!r} is not a path inside the directory")
        sha256, size = entry["sha256"], entry["size"]
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise ValueError(f"{relative}: {sha256!r} is not a lowercase hex sha256")
        if type(size) is not int or size < 0:
            raise ValueError(f"{relative}: size {size!r} is not a byte count")
        files[relative] = FileEntry(sha256, size)
    return Manifest(
        kind=data["kind"],
        tool=str(data["tool"]),
        tool_version=str(data["tool_version"]),
        created=str(data["created"]),
        files=files,
        excluded=tuple(data.get("excluded", ())),
    )
