"""Training runs written aside and published in one step: a served folder is never half-new.

`train --out OUT` (and `add`/`remove`) never write into the folder a server loads. Each run is
written into a new folder beside it, `OUT.runs/.partial-<id>/`; once complete (manifest last)
it is renamed to `OUT.runs/<id>/`, and `OUT` itself, a symbolic link, is switched to it with
one `rename` of a new link over the old one, which POSIX makes atomic. A server watching `OUT`
sees the old run or the new one, whole, never a mixture; `Classifier.load` resolves the link
once, so every file it reads comes from the same run.

A run killed at any point (kill -9, a full disk, an exception) leaves `OUT` and the run it
names untouched; its partial folder is removed by the next run (a failed run removes its own).
The run it replaced is kept (every other run is removed), so going back is one `ln -sfn`.
One run at a time per OUT: a lock file in `OUT.runs/` serialises concurrent trainings.

An `OUT` that is a plain folder (written before runs were published this way) is moved into
`OUT.runs/` as the first, previous run when the first new run is published.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from integrity.manifest import MANIFEST_FILE

log = logging.getLogger(__name__)

RUNS_SUFFIX = ".runs"
PARTIAL_PREFIX = ".partial-"
LOCK_FILE = ".lock"


def runs_dir(out: Path) -> Path:
    """Where the runs of `out` live: `OUT.runs/` beside it."""
    return out.parent / f"{out.name}{RUNS_SUFFIX}"


def complete_runs(out: Path) -> list[Path]:
    """The published-or-publishable runs of `out`, oldest first (ids sort by time)."""
    runs = runs_dir(out)
    if not runs.is_dir():
        return []
    return sorted(
        path
        for path in runs.iterdir()
        if path.is_dir() and not path.is_symlink() and not path.name.startswith(".")
    )


@contextlib.contextmanager
def new_run(out: Path) -> Iterator[Path]:
    """A new, empty run folder to write into; published as `out` when the block ends well.

    On an exception the folder is removed and `out` is left as it was."""
    runs = runs_dir(out)
    runs.mkdir(parents=True, exist_ok=True)
    with _locked(runs / LOCK_FILE):
        _remove_partials(runs)
        run_id = _new_id(runs)
        partial = runs / f"{PARTIAL_PREFIX}{run_id}"
        partial.mkdir()
        try:
            yield partial
            if not (partial / MANIFEST_FILE).is_file():
                raise RuntimeError(f"{partial} has no {MANIFEST_FILE}: the run is incomplete")
            final = runs / run_id
            partial.rename(final)
            _sync(runs)
            previous = publish(out, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        _prune(out, keep={final, previous})


@contextlib.contextmanager
def edited_run(out: Path) -> Iterator[Path]:
    """A copy of the run `out` serves, to change and publish as a new run (`add`/`remove`).

    Files are copied; thumbnails are hard links (they are only ever added or removed whole,
    never rewritten in place), so an edit of a large catalogue costs its index, not its
    images."""
    current = out.resolve()
    with new_run(out) as run:
        for item in current.iterdir():
            target = run / item.name
            if item.is_dir():
                shutil.copytree(item, target, copy_function=_link_or_copy)
            else:
                shutil.copy2(item, target)
        yield run


def publish(out: Path, run: Path) -> Path | None:
    """Point `out` at `run` in one atomic rename (moving a plain-folder `out` aside first);
    returns the run `out` named before, if any."""
    previous = out.resolve() if out.is_symlink() else None
    if out.exists() and not out.is_symlink():
        if not out.is_dir():
            raise FileExistsError(f"{out} is a file, not a run folder; move it away")
        legacy = runs_dir(out) / f"{_new_id(runs_dir(out))}-moved"
        log.warning("moving the run folder %s to %s, to publish runs atomically", out, legacy)
        out.rename(legacy)
        previous = legacy
    link = out.parent / f".{out.name}.next"
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.relpath(run, out.parent), target_is_directory=True)
    link.replace(out)
    _sync(out.parent)
    log.info("%s now names %s", out, run)
    return previous


def _prune(out: Path, keep: set[Path | None]) -> None:
    """Delete every run but those in `keep` (the new one, and the one it replaced): runs
    renamed but never published (killed in between) go too."""
    for run in complete_runs(out):
        if run not in keep:
            shutil.rmtree(run, ignore_errors=True)


def _remove_partials(runs: Path) -> None:
    """Folders of runs that never finished (killed, disk full): nothing names them."""
    for partial in runs.glob(f"{PARTIAL_PREFIX}*"):
        log.warning("removing %s, left by a training that did not finish", partial)
        shutil.rmtree(partial, ignore_errors=True)


def _new_id(runs: Path) -> str:
    """A run id that sorts by time and is new in `runs`."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    run_id, n = stamp, 1
    while (runs / run_id).exists() or (runs / f"{PARTIAL_PREFIX}{run_id}").exists():
        n += 1
        run_id = f"{stamp}-{n}"
    return run_id


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (blocking), released when the process dies."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sync(folder: Path) -> None:
    """Make a rename in `folder` durable (its directory entry), as a crash could undo it."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: copy
        shutil.copy2(source, target)
