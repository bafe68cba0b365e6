"""Training runs are published whole (train.runs): a real `python -m train` killed with SIGKILL
at each point of writing, or stopped by a full disk, leaves the served run untouched and
loadable; the next run cleans up after it; add/remove publish new runs the same way."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from matcher.classifier import Classifier
from tests.cli_output import REPO
from tests.conftest import copy_small_catalogue
from train.runs import PARTIAL_PREFIX, complete_runs, runs_dir

#: Where a training process is killed: the function that would have run next.
KILL_POINTS = [
    "matcher.extraction.compute_batch",  # extracting features
    "train.pipeline.save_features",  # the first file of the run
    "train.pipeline.write_thumbnails",
    "train.pipeline.write_report",
    "train.pipeline.write_manifest",  # every file but the manifest written
    "train.runs.publish",  # the run complete, renamed, not yet named by OUT
]


@pytest.fixture(scope="module")
def catalogue(demo, tmp_path_factory) -> Path:
    """Three items of four photos each: quick to train again and again."""
    return copy_small_catalogue(demo, tmp_path_factory.mktemp("atomic") / "data")


def _train_args(data: Path, out: Path, model_dir: Path, cache: Path) -> list[str]:
    return [
        str(data),
        "--out", str(out),
        "--model-dir", str(model_dir),
        "--cache-dir", str(cache),
        "--matcher", "knn",
        "--no-progress",
        "--no-report",
        "--no-turned-views",
    ]  # fmt: skip


def _run(args: list[str], **popen: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        **popen,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def served(catalogue, exported_model, tmp_path_factory) -> tuple[Path, list[str], str]:
    """A first, published run; returns OUT, the train arguments and the run's sha256."""
    work = tmp_path_factory.mktemp("served")
    out = work / "classifier"
    args = _train_args(catalogue, out, exported_model.path.parent, work / "cache")
    result = _run(["-m", "train", *args])
    assert result.returncode == 0, result.stderr
    return out, args, Classifier.load(out).info.sha256


def _assert_serves(out: Path, sha256: str) -> None:
    assert out.is_symlink() and (out / "manifest.json").is_file()
    assert Classifier.load(out).info.sha256 == sha256


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_training_killed_at_any_point_leaves_the_served_run_untouched(served, point) -> None:
    out, args, sha256 = served
    before = out.resolve()
    result = _run(["-m", "tests.kill_at", point, "1", "--", "train", *args])
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert f"SIGKILL at call 1 of {point.rpartition('.')[2]}" in result.stderr
    assert out.resolve() == before
    _assert_serves(out, sha256)
    # What the killed run left is a partial folder only, which nothing names.
    leftovers = [p.name for p in runs_dir(out).iterdir() if p.name.startswith(PARTIAL_PREFIX)]
    assert len(leftovers) <= 1


def test_the_next_run_removes_what_a_killed_one_left_and_publishes(served) -> None:
    out, args, sha256 = served
    killed = _run(
        ["-m", "tests.kill_at", "train.pipeline.write_manifest", "1", "--", "train", *args]
    )
    assert killed.returncode == -signal.SIGKILL
    assert any(p.name.startswith(PARTIAL_PREFIX) for p in runs_dir(out).iterdir())
    previous = out.resolve()
    result = _run(["-m", "train", *args])
    assert result.returncode == 0, result.stderr
    assert "did not finish" in result.stderr
    assert not any(p.name.startswith(PARTIAL_PREFIX) for p in runs_dir(out).iterdir())
    assert out.resolve() != previous
    # The same photos and matcher: the same index; the previous run is kept beside it.
    _assert_serves(out, sha256)
    assert previous in [p.resolve() for p in complete_runs(out)]


def _file_size_limit(limit: int):
    def apply() -> None:
        # Writes beyond `limit` bytes fail with EFBIG, as a full disk fails them with ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_fails_the_run_in_one_line_and_leaves_nothing(served) -> None:
    out, args, sha256 = served
    before = out.resolve()
    result = _run(["-m", "train", *args], preexec_fn=_file_size_limit(20_000))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("train: error:")]
    assert len(errors) == 1 and "File too large" in errors[0], result.stderr
    assert out.resolve() == before
    _assert_serves(out, sha256)
    assert not any(p.name.startswith(PARTIAL_PREFIX) for p in runs_dir(out).iterdir())


def test_add_and_remove_publish_new_runs_and_keep_the_one_before(served, demo, exported_model):
    out, args, sha256 = served
    model_dir = exported_model.path.parent
    before = out.resolve()
    new_item = sorted(p for p in (demo.out / "train").iterdir() if p.is_dir())[4]
    cache = args[args.index("--cache-dir") + 1]
    add = ["train", "add", str(new_item), "--run", str(out), "--model-dir", str(model_dir),
           "--cache-dir", cache]  # fmt: skip
    added = _run(["-m", *add])
    assert added.returncode == 0, added.stderr
    after_add = out.resolve()
    assert after_add != before and before.is_dir()  # the previous run kept, as it was
    assert Classifier.load(before).info.sha256 == sha256
    assert new_item.name in Classifier.load(out).labels
    removed = _run(["-m", "train", "remove", new_item.name, "--run", str(out)])
    assert removed.returncode == 0, removed.stderr
    assert out.resolve() not in (before, after_add)
    assert new_item.name not in Classifier.load(out).labels
    assert new_item.name in Classifier.load(after_add).labels  # never edited in place
    killed = _run(["-m", "tests.kill_at", "train.edit.write_manifest", "1", "--", *add])
    assert killed.returncode == -signal.SIGKILL
    assert new_item.name not in Classifier.load(out).labels
