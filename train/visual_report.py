"""`python -m train.visual_report RUN_DIR`: the training run as one self-contained HTML page.

Reads what `train` wrote (`report.json`, `features.npz`) and, where the run recorded one, the
SavedModel it used, and writes `<RUN_DIR>/report/index.html` with the PNGs beside it: the
confusion matrix, per-class metrics, the grid search, a t-SNE map of every feature vector, one
image's bottleneck vector, the feature maps of four backbone stages and the baselines. The PNGs
are also embedded in the page as data URIs, so the single file can be mailed; the page has no
script and no external reference.
"""

from __future__ import annotations

import argparse
import base64
import functools
import html
import io
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib import font_manager, ft2font

from matcher.layout import REPORT_FILE
from matcher.views import DEFAULT_VIEWS
from train import plots

DEFAULT_OUT = "report"
HTML_FILE = "index.html"
#: Every file this module may write; stale ones from an earlier report are removed.
OUTPUT_FILES = (
    HTML_FILE,
    "confusion.png",
    "grid.png",
    "tsne.png",
    "no_match.png",
    "rescue.png",
    "bottleneck.png",
    "input.png",
    *(f"feature_maps_{k}.png" for k in range(1, 5)),
)
#: Relative tolerance between the model's features for the chosen image and the recorded ones.
FEATURE_TOLERANCE = 1e-3


class ReportError(Exception):
    """The run folder cannot be reported on; the message says why."""


# ---------------------------------------------------------------------------------------------
# Inputs: the run folder, its features, the chosen image and the SavedModel.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFeatures:
    """The contents of `features.npz`: one row per image of the run."""

    vectors: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    holdout: np.ndarray


@dataclass(frozen=True)
class ChosenImage:
    """The image whose bottleneck vector and feature maps are drawn."""

    #: The file, or None when it is gone (then only its recorded features remain).
    path: Path | None
    #: Its row in features.npz, when it is one of the run's images.
    row: int | None
    #: Its label when known (a run image), else "".
    label: str = ""
    described: str = ""


@dataclass
class ModelViews:
    """What the SavedModel says about the chosen image."""

    vector: np.ndarray | None = None
    #: (stage name, maps [H, W, C]) early to late.
    stages: list[tuple[str, np.ndarray]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load_report(run_dir: Path) -> dict[str, Any]:
    """The run's report.json, checked for the sections the page is built from."""
    path = run_dir / REPORT_FILE
    if not path.is_file():
        raise ReportError(f"no {REPORT_FILE} in {run_dir}: not a training run folder")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} is not valid JSON: {exc}") from exc
    missing = [k for k in ("data", "backbone", "search", "holdout") if k not in report]
    if missing:
        raise ReportError(f"{path} lacks {', '.join(missing)}: was it written by `train`?")
    return report


def load_features(run_dir: Path, report: dict[str, Any]) -> RunFeatures | None:
    """The run's features.npz, or None when the run did not write one."""
    name = report["data"].get("features_file")
    if not name or not (run_dir / name).is_file():
        return None
    with np.load(run_dir / name, allow_pickle=False) as data:
        return RunFeatures(
            vectors=data["features"],
            labels=data["labels"].astype(str),
            paths=data["paths"].astype(str),
            holdout=data["holdout"].astype(bool),
        )


def choose_image(
    report: dict[str, Any], features: RunFeatures | None, image: Path | None
) -> ChosenImage | None:
    """The image asked for, else the first held-out image of the run (None if there is none)."""
    root = Path(report["data"].get("root", "."))
    if image is not None:
        if not image.is_file():
            raise ReportError(f"--image {image}: no such file")
        row = _row_of(image, root, features)
        label = str(features.labels[row]) if row is not None and features else ""
        return ChosenImage(image, row, label, str(image))
    if features is None or not features.holdout.any():
        return None
    row = int(np.flatnonzero(features.holdout)[0])
    path = root / features.paths[row]
    described = f"{features.paths[row]}, the first held-out image"
    return ChosenImage(path if path.is_file() else None, row, str(features.labels[row]), described)


def _row_of(image: Path, root: Path, features: RunFeatures | None) -> int | None:
    """The features.npz row of `image` when it is one of the run's files."""
    if features is None:
        return None
    wanted = image.resolve()
    for row, relative in enumerate(features.paths):
        if (root / relative).resolve() == wanted:
            return row
    return None


def model_unavailable(backbone: dict[str, Any]) -> str | None:
    """Why no SavedModel can be asked for pictures, or None when one should be there."""
    if backbone.get("name") == "hog":
        return (
            "This run used HoG descriptors, computed by hand rather than by a network: there is "
            "no SavedModel, hence no feature maps and no bottleneck vector from a model."
        )
    if not backbone.get("model_dir"):
        return (
            "report.json records no SavedModel (backbone.model_dir is null), so the feature "
            "maps cannot be drawn; train with the model's base path recorded to get them."
        )
    version_dir = Path(backbone["model_dir"]) / str(backbone.get("version", ""))
    if not (version_dir / "saved_model.pb").is_file():
        where = "" if version_dir.is_absolute() else f" (relative to {Path.cwd()})"
        return f"The SavedModel {version_dir}{where} recorded in report.json is not there."
    return None


def model_views(backbone: dict[str, Any], image: Path) -> ModelViews:
    """The chosen image's features and stage maps, from the run's SavedModel."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # imported here: a HoG run or a bad folder never pays for it

    from matcher.layout import (
        FEATURE_MAPS_SIGNATURE,
        INPUT_KEY,
        OUTPUT_KEY,
        SIGNATURE,
        read_model_info,
    )

    version_dir = Path(backbone["model_dir"]) / str(backbone["version"])
    views = ModelViews()
    try:
        info = read_model_info(version_dir)
        signatures = tf.saved_model.load(str(version_dir)).signatures
    except (OSError, ValueError, KeyError, TypeError, tf.errors.OpError) as exc:
        # A damaged model costs the pictures drawn from it, not the rest of the report.
        reason = " ".join(str(exc).split())[:300]
        views.notes.append(f"The SavedModel at {version_dir} cannot be loaded: {reason}")
        return views
    if info.backbone != backbone["name"] or info.feature_dim != backbone["feature_dim"]:
        views.notes.append(
            f"The SavedModel at {version_dir} is {info.backbone} ({info.feature_dim} features), "
            f"not the run's {backbone['name']} ({backbone['feature_dim']}): no pictures from it."
        )
        return views
    images = tf.constant([image.read_bytes()], dtype=tf.string)
    try:
        views.vector = signatures[SIGNATURE](**{INPUT_KEY: images})[OUTPUT_KEY].numpy()[0]
        if FEATURE_MAPS_SIGNATURE not in signatures:
            views.notes.append(
                f"The SavedModel at {version_dir} has no `{FEATURE_MAPS_SIGNATURE}` signature "
                "(exported before it existed): re-export it to get the feature maps."
            )
            return views
        outputs = signatures[FEATURE_MAPS_SIGNATURE](**{INPUT_KEY: images})
    except tf.errors.InvalidArgumentError as exc:
        reason = exc.message.splitlines()[0]
        raise ReportError(f"the model cannot decode {image}: {reason}") from exc
    keys = sorted(outputs, key=lambda k: int(k.removeprefix("stage")))
    names = list(info.stages) if len(info.stages) == len(keys) else keys
    views.stages = [(name, outputs[key].numpy()[0]) for name, key in zip(names, keys, strict=True)]
    return views


def _compare_vectors(computed: np.ndarray, recorded: np.ndarray) -> str | None:
    """A note when the model's features differ from those training recorded for the image."""
    if computed.shape != recorded.shape:
        return f"features differ in length: model {computed.size}, features.npz {recorded.size}"
    scale = float(np.abs(recorded).max()) or 1.0
    difference = float(np.abs(computed - recorded).max())
    if difference > FEATURE_TOLERANCE * scale:
        return (
            f"The SavedModel's features for this image differ from those recorded in "
            f"features.npz (largest difference {difference:.3g}): the model at model_dir may "
            "not be the one the classifier was trained on."
        )
    return None


# ---------------------------------------------------------------------------------------------
# Figures: drawn, written beside the page and embedded in it.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Picture:
    """One PNG of the report."""

    file: str
    png: bytes
    alt: str

    def img(self, css_class: str = "") -> str:
        """An <img> with the PNG embedded as a data URI."""
        data = base64.b64encode(self.png).decode("ascii")
        klass = f' class="{css_class}"' if css_class else ""
        return f'<img{klass} src="data:image/png;base64,{data}" alt="{_e(self.alt)}">'


def _picture(file: str, figure: Any, alt: str) -> Picture:
    return Picture(file, plots.png_bytes(figure), alt)


def _input_picture(image: Path, size: int) -> Picture | None:
    """The image as the network sees it: the whole frame resized to the input size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as opened:
            frame = opened.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    except (OSError, UnidentifiedImageError):
        return None
    buffer = io.BytesIO()
    frame.save(buffer, format="PNG")
    return Picture("input.png", buffer.getvalue(), f"the input image at {size}x{size}")


# ---------------------------------------------------------------------------------------------
# Names in the pictures.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PictureText:
    """How the pictures write the run's label names and file paths, in any script.

    matplotlib's own font (DejaVu Sans) has Latin, Greek and Cyrillic but no Chinese or
    Japanese; other installed fonts are added for the characters it lacks. A label no installed
    font draws is called by its place in the label order ("#2") rather than drawn as empty
    boxes, which would look the same for every such label; the page's tables, drawn by the
    browser, name it in full.
    """

    #: matplotlib's `font.family` while drawing: DejaVu Sans, then the fonts added.
    families: list[str]
    #: Characters no installed font has.
    missing: frozenset[str]
    #: Label -> the stand-in the pictures call it by (only labels with missing characters).
    stand_ins: dict[str, str]

    def label(self, name: str) -> str:
        return self.stand_ins.get(name, name)

    def text(self, value: str) -> str:
        """`value` (a file path, a title) with each character no font has as "?"."""
        return "".join("?" if c in self.missing else c for c in value)

    def note(self) -> str:
        """The page's note on the labels the pictures call by number ("" when none)."""
        if not self.stand_ins:
            return ""
        named = ", ".join(f"{short} = {name}" for name, short in self.stand_ins.items())
        return _note(
            f"The pictures number some labels ({named}): no installed font draws their "
            "characters. Install one that does (on Debian, fonts-noto-cjk for Chinese, "
            "Japanese and Korean) and run python -m train.visual_report again."
        )


def picture_text(
    labels: Sequence[str], texts: Iterable[str] = (), fonts: Sequence[str] | None = None
) -> PictureText:
    """The fonts and stand-ins for drawing `labels` (in label order) and `texts`.

    `fonts`: font files to take missing characters from (default: every installed font
    matplotlib knows, regular faces first).
    """
    default = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"))
    families = ["DejaVu Sans"]
    needed = {c for value in (*labels, *texts) for c in value if not c.isspace()}
    left = needed - _characters(default)
    for path in _installed_fonts() if fonts is None else fonts:
        if not left:
            break
        if found := left & _characters(path):
            if path not in {f.fname for f in font_manager.fontManager.ttflist}:
                font_manager.fontManager.addfont(path)  # a file passed in: make it known
            family = font_manager.FontProperties(fname=path).get_name()
            if family not in families:
                families.append(family)
            left -= found
    stand_ins = {
        name: f"#{place}"
        for place, name in enumerate(labels, start=1)
        if any(c in left for c in name)
    }
    return PictureText(families, frozenset(left), stand_ins)


@functools.cache
def _characters(font_file: str) -> frozenset[str]:
    try:
        return frozenset(chr(code) for code in ft2font.FT2Font(font_file).get_charmap())
    except (OSError, RuntimeError):  # not a font FreeType reads
        return frozenset()


def _installed_fonts() -> list[str]:
    # Not matplotlib's "Last Resort" font: it maps every character to a box with its number.
    faces = [f for f in font_manager.fontManager.ttflist if not f.name.startswith("Last Resort")]
    regular = sorted({f.fname for f in faces if f.style == "normal" and f.weight == 400})
    return regular + sorted({f.fname for f in faces} - set(regular))


# ---------------------------------------------------------------------------------------------
# HTML.
# ---------------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222;
       padding: 0 1em; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em;
       margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; }
tr.best td { background: #fff3c4; font-weight: bold; }
th.vertical { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left;
       white-space: nowrap; padding: 0.5em 0.2em; }
td.diag { background: #e3efff; } td.off { background: #ffe3e3; } td.zero { color: #bbb; }
figure { margin: 1em 0; } figcaption { font-size: 0.92em; color: #444; max-width: 70em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
img.input { width: 224px; image-rendering: auto; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 1em; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1.5em; }
dl.summary dt { font-weight: bold; } dl.summary dd { margin: 0; }
code { background: #f5f5f5; padding: 0 0.2em; }
"""


def _e(value: object) -> str:
    """HTML-escape anything (label names and paths come from the user's folders)."""
    return html.escape(str(value), quote=True)


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _table(
    table_id: str,
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    row_classes: Sequence[str] | None = None,
) -> str:
    """A table whose first column names the row; every cell escaped."""
    head = "".join(
        f'<th class="name">{_e(h)}</th>' if i == 0 else f"<th>{_e(h)}</th>"
        for i, h in enumerate(headers)
    )
    body = []
    for r, row in enumerate(rows):
        klass = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        cells = "".join(
            f'<td class="name">{_e(c)}</td>' if i == 0 else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr{klass}>{cells}</tr>")
    return (
        f'<table id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _figure(picture: Picture, caption: str) -> str:
    return f"<figure>{picture.img()}<figcaption>{caption}</figcaption></figure>"


def _backbone_text(backbone: dict[str, Any]) -> str:
    if backbone.get("name") == "hog":
        return (
            f"HoG descriptors of {backbone.get('feature_dim')} values on a "
            f"{backbone.get('input_size')} px grayscale frame"
        )
    return (
        f"{backbone.get('name')} version {backbone.get('version')}, "
        f"{backbone.get('feature_dim')} features pooled from "
        f"{backbone.get('layer') or 'its last layer'}, input {backbone.get('input_size')} px "
        f"({backbone.get('backend')} backend)"
    )


def _summary_html(report: dict[str, Any], features: RunFeatures | None) -> str:
    data, backbone, search = report["data"], report["backbone"], report["search"]
    holdout = report["holdout"]
    counts = data.get("counts", {})
    items = [
        ("Features", _backbone_text(backbone)),
        (
            "Data",
            f"{data.get('root')}: {sum(counts.values())} images in {len(counts)} labels; "
            f"{data.get('train')} for training, {data.get('holdout')} held out, "
            f"{len(data.get('rejected', {}))} rejected",
        ),
        (
            "Grid search",
            f"{len(search.get('candidates', []))} parameter sets, "
            f"{search.get('folds')}-fold CV, {search.get('seconds')} s; best "
            f"{_params_text(search.get('best_params', {}))} "
            f"(CV accuracy {search.get('best_cv_accuracy', 0):.3f})",
        ),
        ("Hold-out accuracy", f"{holdout.get('accuracy', 0):.3f}"),
        (
            "Classifier",
            f"{report.get('classifier', {}).get('file')} "
            f"(sha256 {report.get('classifier', {}).get('sha256')})",
        ),
        ("Trained", report.get("created", "?")),
    ]
    if features is None:
        items.append(("Feature file", "no features.npz in the run folder"))
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items)
    rejected = data.get("rejected") or {}
    extra = ""
    if rejected:
        extra = (
            "<p>Rejected files:</p><ul>"
            + "".join(f"<li>{_e(p)}: {_e(why)}</li>" for p, why in rejected.items())
            + "</ul>"
        )
    return f'<dl class="summary">{rows}</dl>{extra}{_split_copies_html(data)}'


def _split_copies_html(data: dict[str, Any]) -> str:
    """The photos with a copy on each side of the split (`matcher.duplicates`), if any."""
    found = (data.get("duplicates") or {}).get("across_split") or []
    if not found:
        return ""
    items = "".join(
        f"<li>{_e(entry['label'])}: {_e(' = '.join(entry['train'] + entry['holdout']))}</li>"
        for entry in found
    )
    return (
        '<p class="note">The same photo is on both sides of the hold-out split, so it was '
        "measured against itself and the hold-out numbers flatter: delete the extra copies "
        f"and train again.</p><ul>{items}</ul>"
    )


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items()))


def _confusion_table(labels: Sequence[str], matrix: Sequence[Sequence[int]]) -> str:
    head = '<th class="name">true \\ predicted</th>' + "".join(
        f'<th class="vertical">{_e(name)}</th>' for name in labels
    )
    rows = []
    for i, (name, row) in enumerate(zip(labels, matrix, strict=True)):
        cells = []
        for j, count in enumerate(row):
            klass = "zero" if not count else ("diag" if i == j else "off")
            cells.append(f'<td class="{klass}">{int(count)}</td>')
        rows.append(f'<tr><th class="name">{_e(name)}</th>{"".join(cells)}</tr>')
    return (
        f'<table id="confusion-table"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _confusion_html(holdout: dict[str, Any], pictures: list[Picture], text: PictureText) -> str:
    labels, matrix = holdout["labels"], holdout["confusion_matrix"]
    shown = [text.label(name) for name in labels]
    picture = _picture(
        "confusion.png", plots.confusion_figure(shown, matrix), "confusion matrix heatmap"
    )
    pictures.append(picture)
    caption = (
        "Each held-out image counted once: rows are the true label, columns the predicted "
        "one, so the diagonal holds the correct answers and every off-diagonal number is a "
        "mistake (which label was taken for which). Colour is the share of the true class's "
        "held-out images, so rows with different numbers of images read alike."
    )
    return text.note() + _figure(picture, caption) + _confusion_table(labels, matrix)


def _per_class_html(holdout: dict[str, Any]) -> str:
    per_class = holdout.get("per_class", {})
    rows = [
        (
            label,
            f"{m['precision']:.3f}",
            f"{m['recall']:.3f}",
            f"{m['f1-score']:.3f}",
            int(m["support"]),
        )
        for label, m in (
            (label, per_class[label]) for label in holdout["labels"] if label in per_class
        )
    ]
    text = (
        "<p>Precision: of the images predicted as the label, the share that really are. "
        "Recall: of the label's held-out images, the share found. F1: their harmonic mean. "
        "Support: the label's held-out images (few per label, so one mistake moves a score "
        "a lot).</p>"
    )
    table = _table("per-class-table", ["label", "precision", "recall", "F1", "support"], rows)
    return text + table


def _is_best(candidate: dict[str, Any], best: dict[str, Any]) -> bool:
    return candidate["params"] == best or (not best and candidate.get("rank") == 1)


def _grid_html(search: dict[str, Any], pictures: list[Picture]) -> str:
    candidates = sorted(search.get("candidates", []), key=lambda c: (c["rank"], str(c["params"])))
    best = search.get("best_params", {})
    rows, classes = [], []
    for c in candidates:
        params = c["params"]
        chosen = _is_best(c, best)
        rows.append(
            (
                params.get("kernel", ""),
                params.get("C", ""),
                params.get("gamma", "–"),
                f"{c['mean_accuracy']:.4f}",
                f"{c['std_accuracy']:.4f}",
                c["rank"],
                "★ best" if chosen else "",
            )
        )
        classes.append("best" if chosen else "")
    text = (
        f"<p>Every SVM parameter set was scored by {_e(search.get('folds'))}-fold stratified "
        "cross-validation on the training split only: the mean is the accuracy averaged over "
        "the folds, the spread its standard deviation. The best set (highlighted) was refit on "
        "the whole training split; the hold-out numbers above come from images it never saw. "
        "Sets whose means differ by less than their spread are as good as each other.</p>"
    )
    figure = plots.grid_figure(candidates, best)
    html_parts = [text]
    if figure is not None:
        picture = _picture("grid.png", figure, "grid search heatmap")
        pictures.append(picture)
        html_parts.append(
            _figure(
                picture,
                "Mean CV accuracy per parameter set: rows C, columns the RBF kernel's gamma and "
                "the linear kernel (which has no gamma). The chosen set is boxed in red.",
            )
        )
    headers = ["kernel", "C", "gamma", "mean CV accuracy", "spread (std)", "rank", "chosen"]
    html_parts.append(_table("grid-table", headers, rows, classes))
    return "".join(html_parts)


def _tsne_html(features: RunFeatures | None, pictures: list[Picture], text: PictureText) -> str:
    if features is None or len(features.vectors) < 4:
        return _note("No features.npz with enough images in the run folder: no t-SNE map.")
    started = time.perf_counter()
    embedding = plots.tsne_embedding(features.vectors)
    seconds = time.perf_counter() - started
    n, dim = features.vectors.shape
    title = f"t-SNE of all {n} feature vectors ({dim}-d), coloured by label"
    picture = _picture(
        "tsne.png",
        plots.tsne_figure(
            embedding, [text.label(str(name)) for name in features.labels], features.holdout, title
        ),
        "t-SNE scatter of the features",
    )
    pictures.append(picture)
    caption = (
        f"t-SNE places the {n} images on a plane so that images with similar feature vectors "
        "land near each other (perplexity "
        f"{min(30, (n - 1) / 3):.3g}, PCA start, seed 0; {seconds:.1f} s). Only neighbourhoods "
        "mean something: the axes have no units and distances between clusters are not to "
        "scale. Filled markers are training images, hollow ones held-out images: a hollow "
        "marker inside the cluster of its own colour is an image the features place with its "
        "label although the classifier never saw it; one in another cluster is a likely "
        "mistake."
    )
    return _figure(picture, caption)


def _input_html(report: dict[str, Any], chosen: ChosenImage, picture: Picture) -> str:
    label = f" (label {chosen.label})" if chosen.label else ""
    how = (
        "the whole frame resized to the model's input size without cropping, as its graph does"
        if report["backbone"].get("name") != "hog"
        else "resized for display"
    )
    caption = f"The chosen image, {_e(chosen.described)}{_e(label)}: {how}."
    return f"<figure>{picture.img('input')}<figcaption>{caption}</figcaption></figure>"


def _bottleneck_html(
    report: dict[str, Any],
    chosen: ChosenImage | None,
    vector: np.ndarray | None,
    source: str,
    pictures: list[Picture],
    text: PictureText,
) -> str:
    if chosen is None or vector is None:
        return _note("No image with a feature vector to draw.")
    backbone = report["backbone"]
    what = "HoG descriptor" if backbone.get("name") == "hog" else "bottleneck vector"
    label = f" [{text.label(chosen.label)}]" if chosen.label else ""
    title = f"{what} of {text.text(chosen.described)}{label}: {vector.size} values"
    picture = _picture(
        "bottleneck.png", plots.bottleneck_figure(vector, title), f"{what} bar chart"
    )
    pictures.append(picture)
    top = ", ".join(f"#{i} ({vector[i]:.2f})" for i in plots.top_indices(vector))
    layer = backbone.get("layer") or "the last layer"
    caption = (
        f"The {vector.size} numbers the SVM receives for this image ({_e(source)}). "
        + (
            f"Each is one channel of <code>{_e(layer)}</code> averaged over the whole image: "
            "how strongly that learnt pattern occurs anywhere in it. Typically most channels "
            "are small and a few are large; the largest ten (red, by index) are the patterns "
            "that dominate this image. "
            if what == "bottleneck vector"
            else "Each is one bin of a histogram of gradient orientations, over one cell of "
            "the image and normalised within its block of cells. "
        )
        + f"Largest: {_e(top)}."
    )
    return _figure(picture, caption)


FEATURE_MAP_TEXT = (
    "<p><b>How these are drawn.</b> The image shown above goes through the SavedModel's "
    "<code>feature_maps</code> signature, which decodes and resizes it in the graph exactly as "
    "for serving and returns the outputs of four layers, early to late (each title names the "
    "layer and the size of its maps). Each small square is one channel (one learnt filter's "
    "response at every position), the first 64 channels in channel order. Each square is "
    "scaled to its own minimum and maximum (viridis: dark purple low, yellow high), so a weak "
    "channel and a strong one both use the whole colour range: compare where a channel "
    "responds, not how bright it is next to another. A uniform dark square marked "
    "&ldquo;flat&rdquo; is a channel with the same value everywhere (usually zero: that filter "
    "found nothing in this image).</p>"
    "<p><b>Which layer represents an image best?</b> The early stages have a high resolution "
    "and respond to edges, colours and textures: generic, but tied to exact positions and "
    "lighting. The late stages are coarse and respond to parts and whole objects, which is "
    "what survives a change of viewpoint. The classifier uses the last layer, averaged over "
    "positions (the bottleneck vector above), because it is compact and insensitive to where "
    "the item sits in the frame. For items told apart by texture or print rather than shape, "
    "a middle layer can do better (export with <code>--layer</code>, e.g. Inception's "
    "<code>mixed7</code>, 768 features); train on each and compare the hold-out accuracy and "
    "t-SNE map of this report to decide.</p>"
)


def _feature_maps_html(views: ModelViews, pictures: list[Picture]) -> str:
    parts = [FEATURE_MAP_TEXT]
    for k, (name, maps) in enumerate(views.stages, start=1):
        title = plots.feature_map_title(k, name, maps)
        picture = _picture(
            f"feature_maps_{k}.png",
            plots.feature_map_figure(maps, title),
            f"feature maps of stage {k}",
        )
        pictures.append(picture)
        parts.append(_figure(picture, f'<span class="stage-title">{_e(title)}</span>'))
    return "".join(parts)


def _no_match_html(report: dict[str, Any], pictures: list[Picture]) -> str:
    no_match = report.get("no_match")
    if not no_match:
        return _note("This run has no catalogue index, so no no-match threshold (train again).")
    accepts = no_match["false_accept_rate"]
    measured = (
        f"lets through {100 * accepts:.1f} % of {no_match['outside_photos']} photos of things "
        "outside the catalogue"
        if accepts is not None
        else "was not measured against photos of things outside the catalogue (put some in "
        "DATA/_outside/ or pass --outside)"
    )
    text = (
        f"<p>Threshold {no_match['threshold']:.4f} on the similarity to the nearest catalogue "
        f"view: it turns {100 * no_match['false_reject_rate']:.1f} % of the "
        f"{no_match['matched_holdout']} correct held-out matches (the photos as taken and as "
        f'field photos) into "no match" and {_e(measured)}.</p>'
    )
    picture = _picture(
        "no_match.png",
        plots.no_match_figure(no_match["curve"], no_match["threshold"]),
        "no-match curve",
    )
    pictures.append(picture)
    by_views = report.get("no_match_views") or {}
    views = report.get("views") or {}
    table = _table(
        "no-match-views",
        ["Views", "Per photo", "Threshold", "False rejects", "Outside let through", "Field top-1"],
        [
            (
                mode,
                views.get(mode, {}).get("views_per_photo", ""),
                f"{found['threshold']:.4f}",
                f"{100 * found['false_reject_rate']:.1f} %",
                "-"
                if found["false_accept_rate"] is None
                else f"{100 * found['false_accept_rate']:.1f} %",
                f"{100 * views.get(mode, {}).get('field_accuracy', float('nan')):.1f} %",
            )
            for mode, found in by_views.items()
        ],
    )
    return (
        text
        + _figure(picture, "False rejects and false accepts against the threshold")
        + ("<p>Each views mode of a request has its own threshold:</p>" + table if by_views else "")
        + _verification_html(report, pictures)
    )


def _set_by(found: dict[str, Any]) -> str:
    """What lowered a rescue threshold below the false-reject target's, in words."""
    if found.get("set_by_outside"):
        return " (set by the outside photos)"
    if found.get("set_by_impostors"):
        return " (set by the catalogue's own photos, as outside ones)"
    return ""


def _let_through(found: dict[str, Any]) -> str:
    """The outside photos a rescue threshold lets through, or, without any, the catalogue
    photos that stood in for them."""
    if found["false_accept_rate"] is not None:
        return f"{100 * found['false_accept_rate']:.1f} %"
    if found.get("impostor_accept_rate") is not None:
        return f"{100 * found['impostor_accept_rate']:.1f} % of stand-ins"
    return "-"


def _verification_html(report: dict[str, Any], pictures: list[Picture]) -> str:
    """What geometric verification (`matcher.geometry`) measured, per views mode."""
    rule = report.get("verification")
    if not rule:
        return _note("No keypoints in this run: answers are judged on similarity alone.")
    table = _table(
        "verification",
        [
            "Views",
            "Verified by geometry",
            "Rescue threshold",
            "False rejects",
            "Outside let through",
        ],
        [
            (
                mode,
                f"{100 * found['verified_share']:.1f} %",
                f"{found['threshold']:.4f}" + _set_by(found),
                f"{100 * found['false_reject_rate']:.1f} %",
                _let_through(found),
            )
            for mode, found in (rule.get("views") or {}).items()
        ],
    )
    return (
        f"<p>Geometric verification: {rule['keypoints']} keypoints of {rule['photos']} photos; "
        f"a label with {rule['min_inliers']} inliers is verified and ranks first. Correct "
        "held-out and field matches verified by geometry alone, and the similarity that "
        "matches the others (the rescue threshold):</p>" + table + _rescue_figure(rule, pictures)
    )


def _rescue_figure(rule: dict[str, Any], pictures: list[Picture]) -> str:
    """The served rule's no-match curve: the server's default views mode, at other rescue
    thresholds (runs trained before the curve was recorded have none)."""
    found = (rule.get("views") or {}).get(DEFAULT_VIEWS) or {}
    if not found.get("curve"):
        return ""
    picture = _picture(
        "rescue.png",
        plots.no_match_figure(
            found["curve"],
            found["threshold"],
            f"As served ({DEFAULT_VIEWS}): a verified label matches, others need the threshold",
        ),
        "rescue curve",
    )
    pictures.append(picture)
    return _figure(
        picture,
        f"The {DEFAULT_VIEWS} mode's verdict at other rescue thresholds: correct matches "
        "refused and outside photos (or, without any, the catalogue's stand-ins) let through",
    )


def _confusable_html(report: dict[str, Any]) -> str:
    confusable = report.get("confusable")
    if not confusable:
        return _note("This run predates the confusable-items table; train again to see it.")
    pairs = _table(
        "confusable-pairs",
        ["Items", "Mixed up (held-out photos and field versions)", "Mean views' similarity"],
        [
            (" / ".join(pair["items"]), pair["mixed"], f"{pair['prototype_similarity']:.3f}")
            for pair in confusable["pairs"]
        ],
    )
    weak = confusable["needs_views"]
    needs = (
        _table(
            "needs-views",
            ["Item", "Right on field versions", "Views", "Closest item"],
            [
                (
                    row["item"],
                    f"{100 * row['field_accuracy']:.0f} %",
                    row["views"],
                    row["closest_item"],
                )
                for row in weak
            ],
        )
        if weak
        else _note("Every item's field versions were ranked right.")
    )
    return (
        "<p>Pairs of items the matcher mixed up, then the pairs whose mean views are most "
        "alike (the next to be mixed up). Below, the items ranked worst on field versions of "
        "their held-out photos (turned, cropped, small on clutter, blurred): photograph more "
        "views of these, in the conditions they fail in.</p>" + pairs + needs
    )


def _baselines_html(report: dict[str, Any]) -> str:
    baselines = report.get("baselines")
    if not baselines:
        return _note(
            "This run has no baselines (train with the baselines enabled to compare "
            "the CNN features with HoG on the same split)."
        )
    rows = [
        (b.get("method", key), f"{b['accuracy']:.3f}", f"{1000 * b['seconds_per_image']:.2f}")
        for key, b in baselines.items()
    ]
    best = max(b["accuracy"] for b in baselines.values())
    classes = ["best" if b["accuracy"] == best else "" for b in baselines.values()]
    text = (
        "<p>The same held-out images answered by each method, after training on the same "
        "split; the most accurate is highlighted. Time per image covers computing the "
        "features and classifying, on a fresh pass without cache.</p>"
    )
    headers = ["method", "hold-out accuracy", "time per image (ms)"]
    return text + _table("baselines-table", headers, rows, classes)


def _page(title: str, sections: Sequence[tuple[str, str, str]]) -> str:
    body = "".join(
        f'<section id="{sid}"><h2>{_e(heading)}</h2>{content}</section>'
        for sid, heading, content in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>"
        f"<body><h1>{_e(title)}</h1>{body}</body></html>\n"
    )


# ---------------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------------


def _image_views(
    report: dict[str, Any], features: RunFeatures | None, chosen: ChosenImage | None
) -> tuple[np.ndarray | None, str, ModelViews]:
    """The chosen image's vector (and where it came from) and the model's stage maps."""
    recorded = (
        features.vectors[chosen.row] if chosen and features and chosen.row is not None else None
    )
    views = ModelViews()
    if chosen is None:
        views.notes.append("The run has no held-out image to draw (and no --image was given).")
        return None, "", views
    unavailable = model_unavailable(report["backbone"])
    if chosen.path is None:
        views.notes.append(
            f"The image {chosen.described} is no longer at its recorded place: the bar chart "
            "uses its features from features.npz, and no feature maps are drawn."
        )
        return recorded, "recorded in features.npz", views
    if unavailable:
        views.notes.append(unavailable)
        return recorded, "recorded in features.npz", views
    views = model_views(report["backbone"], chosen.path)
    if views.vector is None:
        return recorded, "recorded in features.npz", views
    if recorded is not None and (mismatch := _compare_vectors(views.vector, recorded)):
        views.notes.append(mismatch)
    return views.vector, "computed now by the SavedModel", views


def write_visual_report(
    run_dir: Path, image: Path | None = None, out_dir: Path | None = None
) -> Path:
    """Write the run's HTML report with its PNGs and return the HTML file's path.

    `run_dir`: a folder written by `train` (report.json, features.npz). `image`: the image
    whose bottleneck vector and feature maps are drawn; by default the run's first held-out
    image (when its file is gone, its recorded features are drawn and the maps skipped).
    `out_dir`: defaults to `run_dir / "report"`. Raises ReportError when the folder cannot be
    reported on.
    """
    report = load_report(run_dir)
    features = load_features(run_dir, report)
    chosen = choose_image(report, features, image)
    vector, source, views = _image_views(report, features, chosen)
    pictures: list[Picture] = []
    shown = ""
    if chosen and chosen.path:
        size = int(report["backbone"]["input_size"])
        if input_picture := _input_picture(chosen.path, size):
            pictures.append(input_picture)
            shown = _input_html(report, chosen, input_picture)
    notes = "".join(_note(n) for n in views.notes)
    text = _run_text(report, features, chosen)
    with matplotlib.rc_context({"font.family": text.families}):
        maps = _feature_maps_html(views, pictures) if views.stages else ""
        sections = [
            ("summary", "Run", _summary_html(report, features)),
            (
                "confusion",
                "Confusion matrix (held-out images)",
                _confusion_html(report["holdout"], pictures, text),
            ),
            ("per-class", "Per-class precision, recall and F1", _per_class_html(report["holdout"])),
            ("grid", "Grid search", _grid_html(report["search"], pictures)),
            ("tsne", "Feature space (t-SNE)", _tsne_html(features, pictures, text)),
            ("no-match", "No match", _no_match_html(report, pictures)),
            ("confusable", "Confusable items", _confusable_html(report)),
            (
                "bottleneck",
                "One image's feature vector",
                shown + _bottleneck_html(report, chosen, vector, source, pictures, text),
            ),
            (
                "feature-maps",
                "Feature maps at four stages",
                notes + (maps or ("" if notes else _note("No feature maps for this run."))),
            ),
            ("baselines", "Baselines", _baselines_html(report)),
        ]
    title = f"Training report: {report['backbone'].get('name')} on {report['data'].get('root')}"
    return _write_files(out_dir or run_dir / DEFAULT_OUT, _page(title, sections), pictures)


def _run_text(
    report: dict[str, Any], features: RunFeatures | None, chosen: ChosenImage | None
) -> PictureText:
    """How the pictures write this run's labels (in the report's order) and chosen image."""
    labels = list(report["holdout"]["labels"])
    if features is not None:
        labels += sorted(set(features.labels.tolist()) - set(labels))
    return picture_text(labels, [chosen.described] if chosen else [])


def _write_files(out_dir: Path, page: str, pictures: Sequence[Picture]) -> Path:
    """Write the PNGs and the page, and remove our files an earlier report left behind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {HTML_FILE}
    for picture in pictures:
        (out_dir / picture.file).write_bytes(picture.png)
        written.add(picture.file)
    for stale in set(OUTPUT_FILES) - written:
        (out_dir / stale).unlink(missing_ok=True)
    path = out_dir / HTML_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)  # a browser reloading the page never reads half of it
    return path


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    parser = argparse.ArgumentParser(
        prog="python -m train.visual_report",
        description="Write a training run's report as one HTML page with its PNGs beside it.",
    )
    parser.add_argument(
        "run_dir",
        type=Path,
        metavar="RUN_DIR",
        help="folder written by `train` (report.json, features.npz)",
    )
    parser.add_argument(
        "--image",
        type=Path,
        help="image for the bottleneck and feature-map figures (default: the first held-out image)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        path = write_visual_report(args.run_dir, args.image, args.out)
    except (ReportError, OSError, KeyError, ValueError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"visual_report: error: {message}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
