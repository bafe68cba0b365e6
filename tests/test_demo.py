"""Tests for the demo catalogue generator (train/demo.py)."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from matcher.dataset import discover
from train import demo
from train.demo import ITEMS, DemoSummary, build_demo_catalogue

# A small subset keeps the suite fast while covering a colour photo from each package, the
# RGBA logo and a grayscale photo.
LABELS = ["china", "chelsea", "logo", "camera"]
TRAIN, QUERIES = 4, 2


def _build(out: Path, seed: int = 0, **kwargs) -> DemoSummary:
    # No outside photos unless a test asks: they have a test of their own.
    options = {"train_views": TRAIN, "query_views": QUERIES, "items": LABELS}
    options |= {"outside_views": 0} | kwargs
    return build_demo_catalogue(out, seed=seed, progress=False, **options)


def _contents(out: Path) -> dict[str, bytes]:
    """Every image under ``out``, keyed by its path relative to ``out``."""
    return {
        path.relative_to(out).as_posix(): path.read_bytes()
        for path in sorted(out.glob("*/*/*"))
        if path.is_file()
    }


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoSummary, Path]:
    out = tmp_path_factory.mktemp("demo")
    return _build(out), out


def test_items_are_snake_case_and_about_a_dozen() -> None:
    assert 10 <= len(ITEMS) <= 14
    assert len(set(ITEMS)) == len(ITEMS)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", label) for label in ITEMS)
    assert {"china", "flower", "chelsea"} <= set(ITEMS)


def test_layout_and_counts(catalogue: tuple[DemoSummary, Path]) -> None:
    summary, out = catalogue
    assert summary == DemoSummary(out, LABELS, TRAIN, QUERIES)
    assert (out / "demo.json").is_file()
    for split, count in (("train", TRAIN), ("queries", QUERIES)):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(LABELS)
        for label in LABELS:
            names = sorted(p.name for p in (out / split / label).iterdir())
            assert len(names) == count
            assert [name.rsplit(".", 1)[0] for name in names] == [
                f"{label}_{index:04d}" for index in range(count)
            ]
            assert {name.rsplit(".", 1)[1] for name in names} <= {"jpg", "png"}


def test_every_file_decodes_to_three_channels(catalogue: tuple[DemoSummary, Path]) -> None:
    _, out = catalogue
    files = sorted(out.glob("*/*/*.*"))
    assert len(files) == len(LABELS) * (TRAIN + QUERIES)
    for path in files:
        with Image.open(path) as image:
            assert image.format == {".jpg": "JPEG", ".png": "PNG"}[path.suffix]
            assert 200 <= image.width <= 480 and 200 <= image.height <= 480
            assert image.convert("RGB").getbands() == ("R", "G", "B")
            assert len(np.asarray(image.convert("RGB")).shape) == 3


def test_views_come_in_both_formats_and_varied_sizes() -> None:
    views = [demo._render_view("flower", "train", index, 0) for index in range(40)]
    assert {extension for _, extension in views} == {"jpg", "png"}
    sizes = {Image.open(io.BytesIO(payload)).size for payload, _ in views}
    assert len(sizes) > 30
    assert any(width != height for width, height in sizes)


def test_same_seed_gives_identical_bytes(
    catalogue: tuple[DemoSummary, Path], tmp_path: Path
) -> None:
    _, out = catalogue
    _build(tmp_path)
    assert _contents(tmp_path) == _contents(out)
    assert (tmp_path / "demo.json").read_bytes() == (out / "demo.json").read_bytes()


def test_different_seed_gives_different_views(
    catalogue: tuple[DemoSummary, Path], tmp_path: Path
) -> None:
    _, out = catalogue
    _build(tmp_path, seed=1)
    first, second = _contents(out), _contents(tmp_path)
    assert not {_digest(b) for b in first.values()} & {_digest(b) for b in second.values()}


def test_queries_never_equal_a_training_view(catalogue: tuple[DemoSummary, Path]) -> None:
    _, out = catalogue
    contents = _contents(out)
    train = {_digest(b) for name, b in contents.items() if name.startswith("train/")}
    queries = {_digest(b) for name, b in contents.items() if name.startswith("queries/")}
    assert len(queries) == len(LABELS) * QUERIES
    assert not train & queries


def test_views_of_one_item_differ(catalogue: tuple[DemoSummary, Path]) -> None:
    _, out = catalogue
    for label in LABELS:
        paths = sorted((out / "train" / label).iterdir()) + sorted(
            (out / "queries" / label).iterdir()
        )
        assert len({_digest(p.read_bytes()) for p in paths}) == len(paths)
        images = [np.asarray(Image.open(p).convert("RGB").resize((64, 64))) for p in paths]
        for i, first in enumerate(images):
            for second in images[i + 1 :]:
                # Not merely re-encoded: the pixels themselves differ substantially.
                assert np.abs(first.astype(int) - second.astype(int)).mean() > 10


def test_second_call_is_a_no_op(tmp_path: Path) -> None:
    _build(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    summary = _build(tmp_path)
    assert summary == DemoSummary(tmp_path, LABELS, TRAIN, QUERIES)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_changed_parameters_rebuild_and_drop_stale_files(tmp_path: Path) -> None:
    _build(tmp_path)
    _build(tmp_path, train_views=2, query_views=0, items=["flower", "china"])
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["china", "flower"]
    assert len(list((tmp_path / "train").glob("*/*"))) == 4
    assert not list((tmp_path / "queries").glob("*"))
    manifest = json.loads((tmp_path / "demo.json").read_text())
    assert manifest["parameters"]["items"] == ["flower", "china"]


def test_damaged_catalogue_is_rebuilt(tmp_path: Path) -> None:
    _build(tmp_path)
    expected = _contents(tmp_path)
    victim = next((tmp_path / "train" / "china").iterdir())
    victim.unlink()
    _build(tmp_path)
    assert _contents(tmp_path) == expected


@pytest.mark.parametrize(
    "foreign", ["train/notes/readme.txt", "train/__init__.py", "queries/x.jpg"]
)
def test_refuses_to_build_over_foreign_files(tmp_path: Path, foreign: str) -> None:
    # E.g. `--out .` in the repository, whose train/ is a Python package.
    path = tmp_path / foreign
    path.parent.mkdir(parents=True)
    path.write_text("keep me")
    with pytest.raises(ValueError, match="refusing to build"):
        _build(tmp_path)
    assert path.read_text() == "keep me"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [path]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_views": 0}, "train_views"),
        ({"query_views": -1}, "query_views"),
        ({"seed": -3}, "seed"),
        ({"items": ["china", "nope"]}, "unknown demo items"),
        ({"items": []}, "at least one"),
        ({"items": ["china", "china"]}, "repeat"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _build(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_cli_prints_one_summary_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--out", str(tmp_path), "--train-views", "1", "--query-views", "1"]
    demo.main([*argv, "--items", "china,flower", "--outside-views", "0", "--quiet"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert "2 labels" in lines[0] and str(tmp_path) in lines[0]
    assert len(list(tmp_path.glob("*/*/*"))) == 4


@pytest.mark.parametrize(
    "argv",
    [
        ["--train-views", "-1"],
        ["--query-views", "-2"],
        ["--seed", "abc"],
        ["--items", "china,unicorn"],
        ["--bogus"],
    ],
)
def test_cli_bad_arguments_exit_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--out", str(tmp_path / "out"), "--quiet", *argv])
    assert exit_info.value.code != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert "error" in captured.err and "Traceback" not in captured.err


def test_outside_photos_are_other_objects_in_each_split(tmp_path: Path) -> None:
    summary = _build(tmp_path, outside_views=2)
    assert summary.outside_views == 2
    calibration = sorted((tmp_path / "train" / "_outside").iterdir())
    held_back = sorted((tmp_path / "queries" / "_outside").iterdir())
    assert len(calibration) == 2 * len(demo.OUTSIDE_TRAIN) == len(held_back)
    assert not set(demo.OUTSIDE_TRAIN) & set(demo.OUTSIDE_QUERIES) & set(demo.ITEMS)
    assert {_digest(p.read_bytes()) for p in calibration}.isdisjoint(
        _digest(p.read_bytes()) for p in held_back
    )
    # Training does not take the folder for a label.
    assert sorted(discover(tmp_path / "train").label_names) == sorted(LABELS)
