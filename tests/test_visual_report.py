"""The training run's HTML report: real run folder, real SavedModel, every picture checked."""

from __future__ import annotations

import base64
import json
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.cli_output import run_module
from train import plots
from train.visual_report import main, write_visual_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: EfficientNet-Lite0's four stages at 224 px: strides 2, 4, 8 and 16.
LITE0_STAGES = ["32 maps of 112x112", "24 maps of 56x56", "40 maps of 28x28", "112 maps of 14x14"]
FIGURES = [
    "confusion.png",
    "grid.png",
    "tsne.png",
    "no_match.png",
    "rescue.png",
    "bottleneck.png",
    "input.png",
    *(f"feature_maps_{k}.png" for k in range(1, 5)),
]


class Page(HTMLParser):
    """What the tests look at in the report: images, tables by id, stage titles, text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tables: dict[str, dict[str, list]] = {}
        self.stage_titles: list[str] = []
        self.text: list[str] = []
        self._table: str | None = None
        self._section = ""
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._in_stage_title = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src") or "")
        elif tag == "table":
            self._table = values.get("id") or ""
            self.tables[self._table] = {"head": [], "body": [], "classes": []}
        elif tag in ("thead", "tbody"):
            self._section = "head" if tag == "thead" else "body"
        elif tag == "tr" and self._table is not None:
            self._row = []
            if self._section == "body":
                self.tables[self._table]["classes"].append(values.get("class") or "")
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "span" and values.get("class") == "stage-title":
            self._in_stage_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.tables[self._table][self._section].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "span":
            self._in_stage_title = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._in_stage_title:
            self.stage_titles.append(data)

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def copy_run(trained, dest: Path, **backbone: object) -> Path:
    """A copy of the trained run folder with some backbone fields of report.json replaced."""
    source = trained.report_path.parent
    dest.mkdir(parents=True)
    report = json.loads(trained.report_path.read_text())
    report["backbone"].update(backbone)
    (dest / "report.json").write_text(json.dumps(report, indent=2))
    features = report["data"]["features_file"]
    shutil.copy(source / features, dest / features)
    return dest


def check_png(path: Path) -> tuple[int, int]:
    """The file is a PNG Pillow can decode, of a size a page can show; returns (w, h)."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 2_000, f"{path} is suspiciously small"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        image.load()
        width, height = image.size
    assert 100 <= width <= 3000 and 100 <= height <= 3000, (path, width, height)
    return width, height


def check_self_contained(html_path: Path, page: Page) -> None:
    text = html_path.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    embedded = {base64.b64decode(src.split(",", 1)[1]) for src in page.images}
    for png in html_path.parent.glob("*.png"):
        assert png.read_bytes() in embedded, f"{png.name} is not embedded in the page"


@pytest.fixture(scope="module")
def full_report(trained, exported_model, tmp_path_factory) -> tuple[Path, Path, Page]:
    """The report of the demo run, with the SavedModel it was trained on recorded."""
    root = tmp_path_factory.mktemp("visual")
    run = copy_run(
        trained,
        root / "run",
        model_dir=str(exported_model.path.parent),
        version=exported_model.version,
    )
    started = time.perf_counter()
    html_path = write_visual_report(run)
    print(f"report with feature maps: {time.perf_counter() - started:.1f} s")
    return run, html_path, Page(html_path.read_text(encoding="utf-8"))


def test_every_figure_is_written_and_a_valid_png(full_report) -> None:
    run, html_path, _ = full_report
    assert html_path == run / "report" / "index.html"
    for name in FIGURES:
        check_png(run / "report" / name)
    assert sorted(p.name for p in (run / "report").glob("feature_maps_*.png")) == [
        f"feature_maps_{k}.png" for k in range(1, 5)
    ]


def test_page_is_self_contained_and_embeds_every_png(full_report) -> None:
    _, html_path, page = full_report
    check_self_contained(html_path, page)
    assert len(page.images) == len(FIGURES)


def test_tables_have_one_row_per_label(full_report, trained) -> None:
    _, _, page = full_report
    labels = trained.report["holdout"]["labels"]
    assert len(labels) == 12
    confusion = page.tables["confusion-table"]
    assert confusion["head"][0][1:] == labels
    assert [row[0] for row in confusion["body"]] == labels
    counts = [[int(c) for c in row[1:]] for row in confusion["body"]]
    assert counts == trained.report["holdout"]["confusion_matrix"]
    per_class = page.tables["per-class-table"]
    assert [row[0] for row in per_class["body"]] == labels
    supports = [int(row[-1]) for row in per_class["body"]]
    assert sum(supports) == trained.report["data"]["holdout"]


def test_grid_table_marks_the_chosen_parameters(full_report, trained) -> None:
    _, _, page = full_report
    search = trained.report["search"]
    grid = page.tables["grid-table"]
    assert len(grid["body"]) == len(search["candidates"]) == 20
    assert grid["classes"].count("best") == 1
    best = grid["body"][grid["classes"].index("best")]
    kernel, c_value, gamma = best[:3]
    chosen = search["best_params"]
    assert (kernel, float(c_value)) == (chosen["kernel"], float(chosen["C"]))
    assert gamma == ("–" if kernel == "linear" else str(chosen["gamma"]))
    assert float(best[3]) == pytest.approx(search["best_cv_accuracy"], abs=1e-4)
    assert "★ best" in best


def test_feature_maps_name_the_four_stages(full_report, exported_model) -> None:
    _, _, page = full_report
    stages = exported_model.info.stages
    assert len(stages) == 4 and len(page.stage_titles) == 4
    for k, (title, name, shape) in enumerate(
        zip(page.stage_titles, stages, LITE0_STAGES, strict=True), start=1
    ):
        assert title.startswith(f"stage {k}: {name}, {shape}")
    assert page.stage_titles[3].endswith("(first 64 shown)")
    # Users asked how the maps are drawn and which layer to use: the page says so.
    assert "How these are drawn" in page.all_text
    assert "Which layer represents an image best?" in page.all_text


def test_bottleneck_comes_from_the_model_and_matches_the_recorded_features(full_report) -> None:
    _, _, page = full_report
    text = page.all_text
    assert "computed now by the SavedModel" in text
    assert "differ from those recorded" not in text
    assert "1280 numbers" in text


def test_the_no_match_section_states_the_threshold_and_its_rates(full_report, trained) -> None:
    _, _, page = full_report
    no_match = trained.report["no_match"]
    assert f"Threshold {no_match['threshold']:.4f}" in page.all_text
    assert f"{no_match['matched_holdout']} correct held-out matches" in page.all_text
    assert f"{no_match['outside_photos']} photos of things outside the catalogue" in page.all_text


def test_each_views_mode_and_the_confusable_items_are_tabulated(full_report, trained) -> None:
    _, _, page = full_report
    by_views = trained.report["no_match_views"]
    rows = page.tables["no-match-views"]["body"]
    assert [row[0] for row in rows] == list(by_views)
    assert [row[2] for row in rows] == [f"{found['threshold']:.4f}" for found in by_views.values()]
    confusable = trained.report["confusable"]
    pairs = page.tables["confusable-pairs"]["body"]
    assert [row[0] for row in pairs] == [" / ".join(p["items"]) for p in confusable["pairs"]]
    assert [int(row[1]) for row in pairs] == [p["mixed"] for p in confusable["pairs"]]
    # Most mixed first; all pairs are distinct items of the catalogue.
    mixed = [p["mixed"] for p in confusable["pairs"]]
    assert mixed == sorted(mixed, reverse=True)
    labels = set(trained.report["holdout"]["labels"])
    assert all(len(set(p["items"]) & labels) == 2 for p in confusable["pairs"])
    for row in confusable["needs_views"]:
        assert row["item"] in labels and row["closest_item"] in labels - {row["item"]}
        assert 0 <= row["field_accuracy"] < 1


def test_geometric_verification_is_tabulated_per_views_mode(full_report, trained) -> None:
    _, _, page = full_report
    rule = trained.report["verification"]
    rows = page.tables["verification"]["body"]
    assert [row[0] for row in rows] == list(rule["views"])
    assert [row[1] for row in rows] == [
        f"{100 * found['verified_share']:.1f} %" for found in rule["views"].values()
    ]
    assert [row[2] for row in rows] == [
        f"{f['threshold']:.4f}"
        + (
            " (set by the outside photos)"
            if f["set_by_outside"]
            else " (set by the catalogue's own photos, as outside ones)"
            if f["set_by_impostors"]
            else ""
        )
        for f in rule["views"].values()
    ]
    assert [row[4] for row in rows] == [
        f"{100 * f['false_accept_rate']:.1f} %" for f in rule["views"].values()
    ]
    assert f"a label with {rule['min_inliers']} inliers is verified" in page.all_text


def test_no_baselines_table_without_baselines(full_report, trained) -> None:
    _, _, page = full_report
    assert "baselines" not in trained.report
    assert "baselines-table" not in page.tables
    assert "This run has no baselines" in page.all_text


def test_fake_baselines_are_tabulated_and_labels_escaped(trained, tmp_path) -> None:
    """Also: a recorded SavedModel that is gone gives a note, not an error."""
    run = copy_run(trained, tmp_path / "run", model_dir=str(tmp_path / "no-such-model"))
    report = json.loads((run / "report.json").read_text())
    # Fakes: only the table's layout is under test here, not the numbers.
    report["baselines"] = {
        "fake_cnn": {"method": "fake CNN + SVM", "accuracy": 0.97, "seconds_per_image": 0.012},
        "fake_hog": {"method": "fake HoG <SAD>", "accuracy": 0.41, "seconds_per_image": 0.003},
    }
    # A label that must be escaped, renamed everywhere the report and the features name it.
    old, new = "rocket", 'rocket <b>&"x"'
    holdout = report["holdout"]
    holdout["labels"] = [new if x == old else x for x in holdout["labels"]]
    holdout["per_class"] = {new if k == old else k: v for k, v in holdout["per_class"].items()}
    (run / "report.json").write_text(json.dumps(report))
    with np.load(run / "features.npz") as data:
        arrays = dict(data)
    arrays["labels"] = np.where(arrays["labels"] == old, new, arrays["labels"])
    np.savez_compressed(run / "features.npz", **arrays)

    html_path = write_visual_report(run, out_dir=tmp_path / "out")
    text = html_path.read_text(encoding="utf-8")
    page = Page(text)
    table = page.tables["baselines-table"]
    assert [row[0] for row in table["body"]] == ["fake CNN + SVM", "fake HoG <SAD>"]
    assert table["body"][0][1:] == ["0.970", "12.00"]
    assert table["classes"] == ["best", ""]
    assert "rocket &lt;b&gt;&amp;&quot;x&quot;" in text and "<b>&" not in text
    assert new in [row[0] for row in page.tables["per-class-table"]["body"]]
    assert "no-such-model/1 recorded in report.json is not there" in page.all_text
    assert not list((tmp_path / "out").glob("feature_maps_*.png"))
    check_self_contained(html_path, page)


def test_hog_run_gets_a_note_instead_of_feature_maps(trained, tmp_path, capsys) -> None:
    run = copy_run(trained, tmp_path / "run", name="hog", model_dir=None)
    out = tmp_path / "out"
    # Stale maps from an earlier report in the same folder must not survive.
    out.mkdir()
    (out / "feature_maps_1.png").write_bytes(PNG_MAGIC)

    assert main([str(run), "--out", str(out)]) == 0
    html_path = Path(capsys.readouterr().out.strip())
    assert html_path == out / "index.html"
    page = Page(html_path.read_text(encoding="utf-8"))
    assert not list(out.glob("feature_maps_*.png"))
    assert page.stage_titles == []
    assert "HoG descriptors" in page.all_text and "no feature maps" in page.all_text
    # The recorded features still give the t-SNE map and the bar chart.
    for name in ("confusion.png", "grid.png", "tsne.png", "bottleneck.png", "input.png"):
        check_png(out / name)
    assert "recorded in features.npz" in page.all_text
    check_self_contained(html_path, page)


def test_gone_image_falls_back_to_the_recorded_features(trained, exported_model, tmp_path):
    run = copy_run(trained, tmp_path / "run", model_dir=str(exported_model.path.parent))
    report = json.loads((run / "report.json").read_text())
    report["data"]["root"] = str(tmp_path / "moved-away")
    (run / "report.json").write_text(json.dumps(report))

    html_path = write_visual_report(run)
    page = Page(html_path.read_text(encoding="utf-8"))
    assert "is no longer at its recorded place" in page.all_text
    check_png(run / "report" / "bottleneck.png")
    assert not list((run / "report").glob("feature_maps_*.png"))
    assert not (run / "report" / "input.png").exists()


def test_cli_exits_2_with_one_line_without_report_json(tmp_path) -> None:
    result = run_module("train.visual_report", str(tmp_path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "report.json" in lines[0], result.stderr


def test_cli_exits_2_for_a_missing_image(trained, tmp_path, capsys) -> None:
    run = trained.report_path.parent
    assert main([str(run), "--image", str(tmp_path / "none.jpg"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0]


def test_tsne_of_300_points_of_1280_dims_finishes() -> None:
    rng = np.random.default_rng(0)
    centres = rng.gamma(1.0, 1.0, (12, 1280))
    features = np.concatenate([c + rng.normal(0, 0.3, (25, 1280)) for c in centres])
    labels = np.repeat(np.arange(12), 25)
    started = time.perf_counter()
    features = np.maximum(features, 0).astype(np.float32)  # pooled ReLU features are >= 0
    embedding = plots.tsne_embedding(features)
    print(f"t-SNE of {features.shape}: {time.perf_counter() - started:.2f} s")
    assert embedding.shape == (300, 2) and np.isfinite(embedding).all()
    # Well-separated clusters stay together: each point's nearest neighbour shares its label.
    distances = np.linalg.norm(embedding[:, None] - embedding[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    assert (labels[distances.argmin(axis=1)] == labels).mean() > 0.95


def test_label_styles_tell_twelve_labels_apart() -> None:
    styles = plots.label_styles([f"label {i}" for i in range(12)])
    colours = [colour for colour, _ in styles.values()]
    assert len(set(colours)) == 12
    assert len(set(styles.values())) == 12
