"""The catalogue index: exact search per label, prototypes, its file, and the faiss path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from matcher import index as index_module
from matcher.errors import ModelLoadError
from matcher.index import CatalogueIndex, normalise


def catalogue(views: int = 60, labels: int = 5, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.gamma(1.0, 1.0, (labels, dim))
    y = rng.integers(0, labels, views)
    x = (centres[y] + 0.3 * rng.gamma(1.0, 1.0, (views, dim))).astype(np.float32)
    names = [f"item{i}" for i in y]
    ids = [f"item{i}/view_{n:03d}.jpg" for n, i in enumerate(y)]
    return x, names, ids


def brute_force(x: np.ndarray, names: list[str], queries: np.ndarray):
    """Each label's best cosine, on features centred on the views' mean, the slow way."""
    centre = x.mean(axis=0)
    views, asked = normalise(x - centre), normalise(queries - centre)
    best = {}
    for label in sorted(set(names)):
        rows = [i for i, name in enumerate(names) if name == label]
        similarity = asked @ views[rows].T
        best[label] = (similarity.max(axis=1), [rows[j] for j in similarity.argmax(axis=1)])
    return best


def test_search_finds_each_labels_most_similar_view() -> None:
    x, names, ids = catalogue()
    index = CatalogueIndex.build(x, names, ids)
    queries = catalogue(views=7, seed=1)[0]
    found = index.search(queries)
    expected = brute_force(x, names, queries)
    assert index.labels == sorted(expected)
    for column, label in enumerate(index.labels):
        np.testing.assert_allclose(found.similarity[:, column], expected[label][0], atol=1e-5)
        # The row found is that view, named by its id.
        assert [index.ids[r] for r in found.row[:, column]] == [ids[r] for r in expected[label][1]]
        assert all(index.label_of(index.ids[r]) == label for r in found.row[:, column])


def test_a_view_is_its_own_nearest_reference() -> None:
    x, names, ids = catalogue()
    index = CatalogueIndex.build(x, names, ids)
    found = index.search(x[:10])
    assert np.allclose(found.similarity.max(axis=1), 1.0, atol=1e-5)
    best = found.row[np.arange(10), found.similarity.argmax(axis=1)]
    assert [index.ids[r] for r in best] == ids[:10]


def test_prototypes_are_each_labels_normalised_mean() -> None:
    x, names, ids = catalogue()
    index = CatalogueIndex.build(x, names, ids)
    centred = normalise(x - x.mean(axis=0))
    for row, label in enumerate(index.labels):
        mine = centred[[i for i, name in enumerate(names) if name == label]]
        np.testing.assert_allclose(index.prototypes()[row], normalise(mine.sum(0)[None])[0], 1e-5)


def test_the_file_round_trips_without_pickle(tmp_path: Path) -> None:
    x, names, ids = catalogue()
    index = CatalogueIndex.build(x, names, ids)
    index.save(tmp_path / "index.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["index.npz"]  # no temporary left behind
    again = CatalogueIndex.from_bytes((tmp_path / "index.npz").read_bytes(), "test")
    assert again.ids == index.ids and again.row_labels == index.row_labels
    queries = catalogue(views=5, seed=2)[0]
    np.testing.assert_array_equal(
        again.search(queries).similarity, index.search(queries).similarity
    )


def test_an_unreadable_or_pickled_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="index broken is not readable"):
        CatalogueIndex.from_bytes(b"not a zip", "broken")
    path = tmp_path / "pickled.npz"
    np.savez(path, vectors=np.zeros((1, 2)), labels=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ModelLoadError, match="not readable"):
        CatalogueIndex.from_bytes(path.read_bytes(), "pickled")


def test_mismatched_lengths_are_refused() -> None:
    x, names, ids = catalogue()
    with pytest.raises(ValueError, match="one label and one id per vector"):
        CatalogueIndex.build(x, names[:-1], ids)
    with pytest.raises(ValueError, match="at least one vector"):
        CatalogueIndex.build(x[:0], [], [])


def test_faiss_answers_as_the_exact_search_does(monkeypatch: pytest.MonkeyPatch) -> None:
    x, names, ids = catalogue(views=400, labels=6, dim=32)
    index = CatalogueIndex.build(x, names, ids)
    queries = catalogue(views=9, labels=6, dim=32, seed=3)[0]
    exact = index.search(queries)
    monkeypatch.setattr(index_module, "FAISS_MIN_VIEWS", 1)
    monkeypatch.setattr(index_module, "FAISS_NEIGHBOURS", 400)  # every view: the same answer
    through_faiss = index.search(queries)
    np.testing.assert_allclose(through_faiss.similarity, exact.similarity, atol=1e-5)
    np.testing.assert_array_equal(through_faiss.row, exact.row)


def test_faiss_leaves_labels_outside_the_neighbours_without_a_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, names, ids = catalogue(views=300, labels=6, dim=32)
    index = CatalogueIndex.build(x, names, ids)
    monkeypatch.setattr(index_module, "FAISS_MIN_VIEWS", 1)
    monkeypatch.setattr(index_module, "FAISS_NEIGHBOURS", 3)
    found = index.search(x[:4])
    assert ((found.row >= 0).sum(axis=1) <= 3).all()
    assert (found.similarity[found.row < 0] == index_module.UNSEEN).all()
    np.testing.assert_allclose(found.similarity.max(axis=1), 1.0, atol=1e-5)


def test_the_inverted_file_is_saved_with_the_index_and_keeps_its_answers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    x, names, ids = catalogue(views=2000, labels=8, dim=32)
    monkeypatch.setattr(index_module, "FAISS_MIN_VIEWS", 1000)
    index = CatalogueIndex.build(x, names, ids)
    queries = x[:50] + 0.01
    exact = index.search(queries)  # through faiss: the index holds 2,000 views
    index.save(tmp_path / "index.npz")
    with np.load(tmp_path / "index.npz") as arrays:
        centroids, assigned = arrays["ivf_centroids"], arrays["ivf_assigned"]
    assert centroids.shape == (index_module.ivf_lists(2000), 32) and assigned.shape == (2000,)
    loaded = CatalogueIndex.from_bytes((tmp_path / "index.npz").read_bytes(), "test")
    again = loaded.search(queries)
    np.testing.assert_array_equal(again.row, exact.row)
    # Each query's own view is its nearest: the inverted file finds it.
    nearest = again.similarity.max(axis=1)
    np.testing.assert_allclose(nearest, 1.0, atol=1e-3)


def test_added_views_join_the_stored_clusters_and_are_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, names, ids = catalogue(views=1500, labels=6, dim=32)
    monkeypatch.setattr(index_module, "FAISS_MIN_VIEWS", 1000)
    index = CatalogueIndex.build(x, names, ids)
    centroids, _ = index.clusters()
    extra, extra_names, _ = catalogue(views=12, labels=6, dim=32, seed=7)
    grown = index.with_views(extra, extra_names, [f"new/{i}" for i in range(12)])
    grown_centroids, grown_assigned = grown.clusters()
    assert grown_centroids is centroids and grown_assigned.shape == (grown.size,)
    found = grown.search(extra)
    rows = found.row[np.arange(12), [grown.labels.index(n) for n in extra_names]]
    assert [grown.ids[r] for r in rows] == [f"new/{i}" for i in range(12)]
    smaller = grown.without_label(grown.labels[0])
    assert smaller.clusters()[1].shape == (smaller.size,)


def test_clusters_that_do_not_fit_the_views_are_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    x, names, ids = catalogue(views=1200, labels=4, dim=16)
    monkeypatch.setattr(index_module, "FAISS_MIN_VIEWS", 1000)
    index = CatalogueIndex.build(x, names, ids)
    centroids, assigned = index.clusters()
    np.savez(
        tmp_path / "bad.npz",
        vectors=index.vectors,
        centre=index.centre,
        labels=np.asarray(index.row_labels),
        ids=np.asarray(index.ids),
        ivf_centroids=centroids,
        ivf_assigned=assigned + len(centroids),  # points past the last cluster
    )
    with pytest.raises(ModelLoadError, match="inverted-file clusters do not fit"):
        CatalogueIndex.from_bytes((tmp_path / "bad.npz").read_bytes(), "bad.npz")
