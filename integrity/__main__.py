"""`python -m integrity write|verify DIR`: an artefact directory's manifest, for operators.

`write DIR` digests the files of DIR into DIR/manifest.json: run it only on files you have
checked (a model copied from elsewhere, one exported before manifests existed). `verify DIR...`
checks each DIR against its manifest, e.g. every version TF Serving serves, which the matcher's
`tfserving` backend cannot see. Exit status 0 when all is well, 1 when not, with one line each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from integrity.manifest import (
    KINDS,
    MANIFEST_FILE,
    IntegrityError,
    Kind,
    verify,
    write_manifest,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m integrity",
        description="Write or verify the sha256 manifest of a SavedModel version or classifier "
        "folder.",
    )
    parser.add_argument("command", choices=("write", "verify"))
    parser.add_argument("dirs", type=Path, nargs="+", metavar="DIR")
    parser.add_argument(
        "--kind",
        choices=KINDS,
        help="savedmodel: every file listed, unlisted files refused; classifier: all but "
        "report/, unlisted files ignored (default: savedmodel where saved_model.pb is)",
    )
    args = parser.parse_args(argv)
    if args.command == "write" and len(args.dirs) > 1:
        parser.error("write takes one DIR")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    failed = False
    for directory in args.dirs:
        try:
            print(_run(args.command, directory, args.kind))
        except (IntegrityError, OSError) as exc:
            print(f"integrity: error: {exc}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


def _run(command: str, directory: Path, kind: Kind | None) -> str:
    if not directory.is_dir():
        raise IntegrityError([f"{directory} is not a directory"])
    if command == "write":
        manifest = write_manifest(directory, "integrity", kind)
        return f"wrote {directory / MANIFEST_FILE}: {len(manifest.files)} files ({manifest.kind})"
    manifest = verify(directory, kind)
    return (
        f"{directory}: OK, {len(manifest.files)} files match {MANIFEST_FILE} ({manifest.kind}, "
        f"written by {manifest.tool} {manifest.tool_version} at {manifest.created})"
    )


if __name__ == "__main__":
    sys.exit(main())
