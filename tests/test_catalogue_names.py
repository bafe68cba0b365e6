"""Catalogue names as people write them, and catalogues as people file them.

Label folders named in any script ("café", "拉链", "Ünïcødé zip") come back unchanged through
every file `train` writes and every answer the service gives: the skops classifier, the index,
report.json, the HTML report, gRPC, the HTTP API and the command-line client. And the same photo
filed twice: under two labels `train` refuses it; under one label on both sides of the hold-out
split it is reported, since it flatters the measured accuracy.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import unicodedata
import urllib.parse
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import matplotlib
import numpy as np
import pytest

from integrity.manifest import file_sha256, verify
from matcher import duplicates
from matcher.classifier import Classifier
from matcher.dataset import DatasetError, discover
from matcher.index import CatalogueIndex
from matcher.v1 import matcher_pb2, matcher_pb2_grpc
from service.config import Settings
from service.server import RunningServer
from tests.cli_output import cli_stderr_lines, run_module
from tests.test_security import serving as started
from train import plots
from train.pipeline import TrainConfig, TrainResult, train
from train.visual_report import picture_text, write_visual_report

#: One accented Latin name, one in Chinese (a zip puller: 拉链), one mixed with a space.
NAMES = ("café", "拉链", "Ünïcødé zip")
PHOTOS = 5


def copy_photos(demo, root: Path, names: dict[str, str], photos: int = PHOTOS) -> Path:
    """`root/<name>/` holding the first `photos` training views of demo item `names[name]`."""
    for name, item in names.items():
        (root / name).mkdir(parents=True)
        for path in sorted((demo.out / "train" / item).iterdir())[:photos]:
            shutil.copy(path, root / name / path.name)
    return root


def escaped(text: str) -> str:
    """`text` as a stdout or stderr that only holds ASCII prints it."""
    return text.encode("ascii", "backslashreplace").decode()


@pytest.fixture(scope="module")
def items(demo) -> dict[str, str]:
    """Each name -> the demo item whose photos it gets."""
    return dict(zip(NAMES, demo.labels, strict=False))


@pytest.fixture(scope="module")
def run(demo, items, embedded_backend, feature_cache, tmp_path_factory) -> TrainResult:
    """An SVM run, so that both the skops classifier and the index hold the names."""
    data = copy_photos(demo, tmp_path_factory.mktemp("names") / "data", items)
    config = TrainConfig(
        data=data,
        out=data.parent / "run",
        cache_dir=feature_cache,
        folds=2,
        jobs=1,
        progress=False,
        matcher="svm",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fewer CV folds than asked: expected
        return train(config, embedded_backend)


@pytest.fixture(scope="module")
def queries(demo, items) -> list[tuple[str, Path]]:
    """A held-out demo query view of each name's item, with that name."""
    return [(name, sorted((demo.out / "queries" / items[name]).iterdir())[0]) for name in NAMES]


@pytest.fixture
async def serving(run, exported_model) -> AsyncIterator[RunningServer]:
    settings = Settings(
        port=0,
        http_port=0,
        metrics_port=0,
        model_dir=exported_model.path.parent,
        classifier=run.classifier_path,
        grace_s=0.5,
        views="whole",
    )
    async with started(settings) as running:
        yield running


# ---- the files `train` writes ---------------------------------------------------------------


def test_folder_names_are_the_labels_of_every_file_train_writes(run) -> None:
    folder = run.classifier_path.parent
    expected = sorted(NAMES)
    assert run.classifier_path.name == "classifier.skops"
    verify(folder, "classifier")
    assert Classifier.load(run.classifier_path).labels == expected
    index = CatalogueIndex.from_bytes((folder / "index.npz").read_bytes(), "index.npz")
    assert index.labels == expected
    pairs = zip(index.row_labels, index.ids, strict=True)
    assert all(view.startswith(f"{label}/") for label, view in pairs)
    with np.load(folder / "features.npz", allow_pickle=False) as arrays:
        assert sorted(set(arrays["labels"].tolist())) == expected
    # report.json: read as UTF-8 the names come back whole; and it is ASCII (json's escapes),
    # so a reader decoding it with the locale's encoding reads the same.
    raw = (folder / "report.json").read_bytes()
    assert raw.isascii()
    report = json.loads(raw.decode("utf-8"))
    assert report["holdout"]["labels"] == expected
    assert set(report["data"]["counts"]) == set(report["holdout"]["per_class"]) == set(NAMES)
    assert report["data"]["duplicates"] == {"copies": 0, "across_split": []}


def test_the_html_report_names_the_labels_and_draws_no_empty_boxes(run) -> None:
    with warnings.catch_warnings():
        # matplotlib's "Glyph ... missing from font(s)": a name drawn as empty boxes.
        warnings.filterwarnings("error", message="Glyph", category=UserWarning)
        page = write_visual_report(run.classifier_path.parent)
    text = page.read_bytes().decode("utf-8")
    assert '<meta charset="utf-8">' in text
    for name in NAMES:
        assert text.count(f">{name}<") >= 3  # the confusion (row, column) and per-class tables


def test_names_no_installed_font_draws_are_numbered_in_the_pictures() -> None:
    labels = sorted(NAMES)  # café, Ünïcødé zip, 拉链
    # DejaVu Sans alone: the accented Latin names are drawn, the Chinese one is numbered.
    text = picture_text(labels, ["拉链/x.jpg"], fonts=[])
    assert [text.label(name) for name in labels] == ["café", "Ünïcødé zip", "#3"]
    assert text.text("拉链/x.jpg, the first held-out image") == "??/x.jpg, the first held-out image"
    assert "#3 = 拉链" in text.note()
    with warnings.catch_warnings(), matplotlib.rc_context({"font.family": text.families}):
        warnings.filterwarnings("error", message="Glyph", category=UserWarning)
        plots.png_bytes(plots.confusion_figure([text.label(n) for n in labels], np.eye(3)))
    plain = picture_text(["a b", "c"])
    assert plain.families == ["DejaVu Sans"] and not plain.stand_ins and not plain.note()


# ---- the answers the service gives ----------------------------------------------------------


async def test_grpc_http_and_the_client_answer_with_the_names(serving, queries) -> None:
    target = f"localhost:{serving.port}"
    base = f"http://localhost:{serving.http_port}"
    async with (
        grpc.aio.insecure_channel(target) as channel,
        aiohttp.ClientSession() as http,
    ):
        stub = matcher_pb2_grpc.MatcherStub(channel)
        info = await stub.GetModelInfo(matcher_pb2.GetModelInfoRequest())
        assert list(info.labels) == sorted(NAMES)
        for name, path in queries:
            answer = await stub.Match(matcher_pb2.ImageRequest(image=path.read_bytes(), top_k=3))
            assert answer.matches[0].label == name
            assert sorted(m.label for m in answer.matches) == sorted(NAMES)
            view = answer.matches[0].reference_id
            reference = await stub.GetReference(matcher_pb2.GetReferenceRequest(reference_id=view))
            assert reference.label == name and view.startswith(f"{name}/")

            form = aiohttp.FormData()
            form.add_field("image", path.read_bytes(), filename="q.jpg", content_type="image/jpeg")
            async with http.post(f"{base}/v1/match", data=form) as response:
                assert response.status == 200
                body = json.loads((await response.read()).decode("utf-8"))
            assert body["matches"][0]["label"] == name
            assert body["matches"][0]["referenceId"] == view
            # The view by its id, percent-encoded as the web page sends it.
            quoted = "/".join(urllib.parse.quote(part) for part in view.split("/"))
            headers = {"Accept": "application/json"}
            async with http.get(f"{base}/v1/references/{quoted}", headers=headers) as response:
                assert response.status == 200
                assert (await response.json())["label"] == name
            async with http.get(f"{base}/v1/references/{quoted}") as response:
                assert response.status == 200 and response.content_type == "image/jpeg"

    client = ("service.client", *(str(path) for _, path in queries), "--target", target)
    done = await asyncio.to_thread(run_module, *client, "--top-k", "1")
    assert done.returncode == 0, done.stderr
    for name in NAMES:
        assert f"  {name}  ~ {name}/" in done.stdout
    # A terminal that cannot show a name (a Windows code page, PYTHONIOENCODING=ascii) gets
    # escapes rather than a traceback at the first one.
    narrow = os.environ | {"PYTHONIOENCODING": "ascii"}
    done = await asyncio.to_thread(run_module, *client, "--top-k", "1", env=narrow)
    assert done.returncode == 0, done.stderr
    for name in NAMES:
        assert f"  {escaped(name)}  ~ {escaped(name)}/" in done.stdout


# ---- how label folders are read ---------------------------------------------------------------


def test_a_decomposed_folder_name_is_the_composed_label(tmp_path: Path) -> None:
    # "café" as macOS (and archives made there) may spell it: "e" + a combining acute accent.
    decomposed = unicodedata.normalize("NFD", "café")
    for folder in (decomposed, "拉链"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.jpg").write_bytes(b"")
    dataset = discover(tmp_path)
    assert dataset.label_names == ["café", "拉链"]
    assert dataset.reference_id(0) == "café/x.jpg"
    assert dataset.name(0) == f"{decomposed}/x.jpg"  # where the file really is


def test_two_spellings_of_one_name_are_refused(tmp_path: Path) -> None:
    for folder in ("café", unicodedata.normalize("NFD", "café"), "zip"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="are one label, café, spelt in two") as raised:
        discover(tmp_path)
    # Printed as they are the two names look alike; the message spells them out.
    assert r"'caf\xe9'" in str(raised.value) and r"'cafe\u0301'" in str(raised.value)


# ---- the same photo filed twice ---------------------------------------------------------------


def test_copies_are_found_by_content(tmp_path: Path) -> None:
    files = {
        "a.jpg": b"photo one",
        "b.jpg": b"photo two",  # the same size as a.jpg, other bytes
        "c.jpg": b"photo one",
        "d.jpg": b"",
        "e.jpg": b"",  # empty files are rejected by extraction, not called copies
        "f.jpg": b"photo one, longer",
    }
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    assert duplicates.copies([*paths, tmp_path / "missing.jpg"]) == [[0, 2]]


def test_a_photo_under_two_labels_is_refused_in_one_line(demo, items, tmp_path: Path) -> None:
    data = copy_photos(demo, tmp_path / "data", items, photos=3)
    first = sorted((data / "café").iterdir())[0]
    shutil.copy(first, data / "拉链" / "same.jpg")
    done = run_module("train", str(data), "--out", str(tmp_path / "run"), "--no-progress")
    assert done.returncode == 2
    lines = cli_stderr_lines(done)
    assert len(lines) == 1 and lines[0].startswith("train: error: the same photo is filed under")
    assert f"café/{first.name} = 拉链/same.jpg" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_copy_on_both_sides_of_the_split_is_warned_and_recorded(
    demo, items, exported_model, feature_cache, tmp_path: Path
) -> None:
    data = copy_photos(demo, tmp_path / "data", items, photos=4)
    # Every photo of café is one photo: a copy is held out, the others train.
    photo = sorted((data / "café").iterdir())[0]
    for other in sorted((data / "café").iterdir())[1:]:
        shutil.copy(photo, other)
    out = tmp_path / "run"
    done = run_module(
        "train",
        str(data),
        *("--out", str(out), "--model-dir", str(exported_model.path.parent)),
        *("--cache-dir", str(feature_cache), "--matcher", "knn", "--no-turned-views"),
        *("--no-baselines", "--no-report", "--no-progress"),
        # The summary names every label; a terminal without them must not stop the run.
        env=os.environ | {"PYTHONIOENCODING": "ascii"},
        timeout_s=300,
    )
    assert done.returncode == 0, done.stderr
    assert escaped("label order: 0=café, 1=Ünïcødé zip, 2=拉链") in done.stdout
    warned = [line for line in cli_stderr_lines(done) if "both sides of the hold-out" in line]
    assert len(warned) == 1 and warned[0].startswith("WARNING ")
    assert escaped("(label café)") in warned[0]
    assert all(escaped(f"café/{p.name}") in warned[0] for p in (data / "café").iterdir())
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    recorded = report["data"]["duplicates"]
    assert recorded["copies"] == 1 and len(recorded["across_split"]) == 1
    found = recorded["across_split"][0]
    assert found["label"] == "café" and found["train"] and found["holdout"]
    assert sorted(found["train"] + found["holdout"]) == [
        f"café/{p.name}" for p in sorted((data / "café").iterdir())
    ]
    with np.load(out / "features.npz", allow_pickle=False) as arrays:
        held = set(arrays["paths"][arrays["holdout"]].tolist())
    assert set(found["holdout"]) == held & set(found["holdout"] + found["train"])
    page = write_visual_report(out).read_text(encoding="utf-8")
    assert "The same photo is on both sides of the hold-out split" in page
    assert f"café/{photo.name}" in page
    # The digest that found the copies is the one the feature cache keys the photo by.
    digest = file_sha256(photo)
    assert list(feature_cache.glob(f"*/{digest[:2]}/{digest}.npy"))
