"""The catalogue index: every reference view's feature vector, its label and where it came from.

Vectors are centred on the catalogue's mean view and L2-normalised, so a dot product is a
cosine similarity of what sets a view apart from the catalogue at large. The backbone's pooled
features are all positive and share a large common part, so raw cosines crowd together: on the
demo catalogue, centring cut the out-of-catalogue photos accepted at a 2 % false-reject
threshold from 21 % to 15 % (from 10 % to 2 % without the hardest, another cat;
docs/benchmarks.md, "No match"). For each query and each label the index answers the label's
most similar reference view: the evidence a person can look at (`GetReference`), the score the
"no match" verdict is judged on, and, for the `knn` and `prototype` matchers, the ranking.

Search is exact up to `FAISS_MIN_VIEWS` views: one matrix product against every view, then the
best view of each label (an argmax over each label's rows, which are kept together). Exact
search costs a pass over every view per query (at 1280 floats a view, 1 GB and about 40 ms a
query on 2 cores at 200,000 views; docs/benchmarks.md, "Large catalogues"). Above it, the
nearest `FAISS_NEIGHBOURS` views come from a faiss inverted-file index (`IndexIVFFlat`, inner
product): the views are partitioned into `ivf_lists(n)` clusters by k-means, and a query scans
only the `IVF_PROBES` clusters nearest to it; a label with no view among the neighbours gets no
reference. The clusters (centroids, and each view's cluster) are computed once, when the index
is saved, and stored in the file, so loading only fills faiss's lists (no k-means at start);
views added later (`with_views`) join their nearest existing cluster.

The file is a plain `.npz` of arrays (no pickle: `allow_pickle=False`), listed in the run
folder's manifest like every other artefact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from matcher.errors import ModelLoadError

#: From this many views, neighbours come from faiss's inverted file instead of exact search.
FAISS_MIN_VIEWS = 200_000
#: How many nearest views faiss returns per query, merged into labels.
FAISS_NEIGHBOURS = 256
#: Clusters a query scans. With `ivf_lists` clusters that is about 1 % of the views at
#: 200,000 and 0.6 % at 1,000,000; recall of the nearest view is in docs/benchmarks.md.
IVF_PROBES = 24
#: Views k-means learns the clusters from (a sample above that: the centroids settle long
#: before every view is seen, and k-means costs views x clusters x dimensions per pass).
IVF_TRAINING_VIEWS = 100_000


def ivf_lists(views: int) -> int:
    """Clusters of an inverted file over `views` views: about 4 sqrt(N), faiss's usual rule."""
    # faiss wants at least 39 training views per cluster.
    return max(1, min(min(views, IVF_TRAINING_VIEWS) // 39, int(4 * np.sqrt(views))))


#: Similarity given to a label none of whose views was searched (faiss path only).
UNSEEN = -1.0


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    result: np.ndarray = vectors / np.maximum(norms, np.float32(1e-12))
    return result


def _check_lengths(vectors: np.ndarray, labels: Sequence[str], ids: Sequence[str]) -> None:
    if not len(vectors) == len(labels) == len(ids) or len(vectors) == 0:
        raise ValueError(
            f"an index needs one label and one id per vector, and at least one vector; got "
            f"{len(vectors)} vectors, {len(labels)} labels, {len(ids)} ids"
        )


@dataclass(frozen=True)
class Neighbours:
    """For each query and label: the best similarity and the row of that view."""

    #: float32 [Q, L] cosine similarity of each label's most similar view (UNSEEN if none).
    similarity: np.ndarray
    #: int64 [Q, L] the row of that view in the index (-1 if none).
    row: np.ndarray


class CatalogueIndex:
    """Reference views grouped by label, searchable by cosine similarity.

    Made by `build` from the backbone's features, or read back with `from_bytes`.
    """

    def __init__(
        self, vectors: np.ndarray, row_labels: Sequence[str], ids: Sequence[str], centre: np.ndarray
    ) -> None:
        """Rows already centred, normalised and grouped by label, as `build` leaves them."""
        _check_lengths(vectors, row_labels, ids)
        self.vectors = np.asarray(vectors, np.float32)
        self.centre = np.asarray(centre, np.float32)
        self.row_labels = [str(label) for label in row_labels]
        self.ids = [str(reference) for reference in ids]
        if self.row_labels != sorted(self.row_labels):
            raise ValueError("index rows are not grouped by label")
        self.labels = sorted(set(self.row_labels))
        self._label_of_row = np.searchsorted(self.labels, self.row_labels)
        starts = np.flatnonzero(np.r_[True, self._label_of_row[1:] != self._label_of_row[:-1]])
        #: (first row, end row) of each label, in label order.
        self._groups = list(zip(starts.tolist(), [*starts[1:].tolist(), self.size], strict=True))
        self._row_of_id = {reference: row for row, reference in enumerate(self.ids)}
        self._faiss: Any = None
        self._prototypes: np.ndarray | None = None
        #: The inverted file's clusters: centroids [C, D] and each row's cluster [N] (None
        #: until `clusters()` computes them or `from_bytes` reads them).
        self._ivf: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def build(
        cls,
        features: np.ndarray,
        labels: Sequence[str],
        ids: Sequence[str],
        centre: np.ndarray | None = None,
    ) -> CatalogueIndex:
        """An index of views with these backbone features, labels and ids (any order),
        centred on `centre` (the views' mean when None; zeros for plain cosines)."""
        _check_lengths(features, labels, ids)
        order = np.argsort(np.asarray(labels), kind="stable")
        raw = np.asarray(features, dtype=np.float32)
        centre = raw.mean(axis=0) if centre is None else np.asarray(centre, np.float32)
        vectors = normalise(raw[order] - centre)
        return cls(vectors, [labels[i] for i in order], [ids[i] for i in order], centre)

    def with_views(
        self, features: np.ndarray, labels: Sequence[str], ids: Sequence[str]
    ) -> CatalogueIndex:
        """This index and more views (the backbone's features), centred on the same centre.

        The centre stays the one of the original training, so that similarities of the views
        already there do not move; an id that is already taken is refused."""
        taken = sorted(set(ids) & set(self._row_of_id))
        if taken:
            raise ValueError(f"the index already holds views {taken[:3]}")
        added = normalise(np.asarray(features, np.float32) - self.centre)
        vectors = np.concatenate([self.vectors, added])
        row_labels, all_ids = [*self.row_labels, *labels], [*self.ids, *ids]
        order = np.argsort(np.asarray(row_labels), kind="stable")
        grown = CatalogueIndex(
            vectors[order], [row_labels[i] for i in order], [all_ids[i] for i in order], self.centre
        )
        if self._ivf is not None:  # the new views join their nearest existing cluster
            centroids, assigned = self._ivf
            joined = np.concatenate([assigned, _nearest_centroid(centroids, added)])
            grown._ivf = (centroids, joined[order])
        return grown

    def without_label(self, label: str) -> CatalogueIndex:
        """This index with every view of `label` gone."""
        keep = [row for row, name in enumerate(self.row_labels) if name != label]
        if len(keep) == self.size:
            raise ValueError(f"the index holds no label {label!r}")
        smaller = CatalogueIndex(
            self.vectors[keep],
            [self.row_labels[i] for i in keep],
            [self.ids[i] for i in keep],
            self.centre,
        )
        if self._ivf is not None:
            smaller._ivf = (self._ivf[0], self._ivf[1][keep])
        return smaller

    @property
    def size(self) -> int:
        return len(self.row_labels)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def label_of(self, reference_id: str) -> str | None:
        """The label of a reference view, or None when the index holds no such id."""
        row = self._row_of_id.get(reference_id)
        return None if row is None else self.row_labels[row]

    def search(self, queries: np.ndarray) -> Neighbours:
        """Each label's most similar view for every query row (the backbone's features)."""
        queries = normalise(np.asarray(queries, np.float32) - self.centre)
        if self.size >= FAISS_MIN_VIEWS:
            return self._search_faiss(queries)
        similarity = queries @ self.vectors.T  # [Q, N]
        rows = np.empty((len(queries), len(self.labels)), dtype=np.int64)
        for column, (start, end) in enumerate(self._groups):
            rows[:, column] = start + similarity[:, start:end].argmax(axis=1)
        best = np.take_along_axis(similarity, rows, axis=1)
        return Neighbours(best.astype(np.float32), rows)

    def views_by_similarity(self, queries: np.ndarray, column: int) -> list[int]:
        """The rows of label `column` (in `labels` order), most similar to any of `queries`
        (backbone features) first: the views geometric verification checks."""
        start, end = self._groups[column]
        centred = normalise(np.asarray(queries, np.float32) - self.centre)
        similarity = (centred @ self.vectors[start:end].T).max(axis=0)
        rows: list[int] = (start + np.argsort(-similarity, kind="stable")).tolist()
        return rows

    def prototypes(self) -> np.ndarray:
        """float32 [L, D]: each label's mean view, normalised (the `prototype` matcher).

        Computed once: the index never changes (`with_views` makes a new one)."""
        if self._prototypes is None:
            starts = [start for start, _ in self._groups]
            self._prototypes = normalise(np.add.reduceat(self.vectors, starts, axis=0))
        return self._prototypes

    def prototype_similarity(self, queries: np.ndarray) -> np.ndarray:
        """float32 [Q, L]: each query's cosine similarity to each label's prototype."""
        centred = normalise(np.asarray(queries, np.float32) - self.centre)
        similarity: np.ndarray = centred @ self.prototypes().T
        return similarity

    def clusters(self) -> tuple[np.ndarray, np.ndarray]:
        """The inverted file's clusters: centroids [C, D] and each view's cluster [N].

        k-means (faiss, seeded) on at most `IVF_TRAINING_VIEWS` views, computed once."""
        if self._ivf is None:
            import faiss

            count = ivf_lists(self.size)
            sample = self.vectors
            if self.size > IVF_TRAINING_VIEWS:
                rng = np.random.default_rng(0)
                sample = self.vectors[np.sort(rng.choice(self.size, IVF_TRAINING_VIEWS, False))]
            kmeans = faiss.Kmeans(self.dim, count, niter=10, seed=0, spherical=True)
            kmeans.train(np.ascontiguousarray(sample))
            centroids = np.asarray(kmeans.centroids, np.float32)
            self._ivf = (centroids, _nearest_centroid(centroids, self.vectors))
        return self._ivf

    def _search_faiss(self, queries: np.ndarray) -> Neighbours:
        if self._faiss is None:
            self._faiss = self._inverted_file()
        k = min(FAISS_NEIGHBOURS, self.size)
        scores, found = self._faiss.search(np.ascontiguousarray(queries), k)
        best = np.full((len(queries), len(self.labels)), UNSEEN, dtype=np.float32)
        rows = np.full(best.shape, -1, dtype=np.int64)
        # Neighbours come most similar first, so the first one seen of a label is its best.
        for q in range(len(queries)):
            for score, row in zip(scores[q][::-1], found[q][::-1], strict=True):
                if row >= 0:
                    column = self._label_of_row[row]
                    best[q, column], rows[q, column] = score, row
        return Neighbours(best, rows)

    def _inverted_file(self) -> Any:
        """faiss's IndexIVFFlat over the views, filled from the stored clusters."""
        import faiss
        from faiss.contrib.ivf_tools import add_preassigned

        centroids, assigned = self.clusters()
        quantizer = faiss.IndexFlatIP(self.dim)
        quantizer.add(centroids)
        index = faiss.IndexIVFFlat(quantizer, self.dim, len(centroids), faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True  # the quantizer holds the centroids: nothing left to learn
        add_preassigned(index, self.vectors, assigned)  # type: ignore[no-untyped-call]
        index.nprobe = min(IVF_PROBES, len(centroids))
        # faiss's Python constructor keeps a reference to the quantizer inside the index.
        return index

    # --- the file ---

    def save(self, path: Path) -> None:
        """Write the index as a plain `.npz` (written under another name, then renamed)."""
        tmp = path.with_name(f".{path.name}.tmp.npz")
        arrays: dict[str, np.ndarray] = {
            "vectors": self.vectors,
            "centre": self.centre,
            "labels": np.asarray(self.row_labels, dtype=str),
            "ids": np.asarray(self.ids, dtype=str),
        }
        if self.size >= FAISS_MIN_VIEWS:  # searched through faiss: its clusters go with it
            arrays["ivf_centroids"], arrays["ivf_assigned"] = self.clusters()
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(path)

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> CatalogueIndex:
        """Read an index file's bytes (already verified by the caller); never unpickles."""
        import io
        import zipfile

        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                index = cls(
                    arrays["vectors"], list(arrays["labels"]), list(arrays["ids"]), arrays["centre"]
                )
                if "ivf_centroids" in arrays:
                    index._ivf = _read_clusters(
                        arrays["ivf_centroids"], arrays["ivf_assigned"], index, where
                    )
                return index
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise ModelLoadError(f"index {where} is not readable: {exc}") from exc


def _nearest_centroid(centroids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """int64 [N]: the centroid with the largest inner product with each vector."""
    import faiss

    flat = faiss.IndexFlatIP(centroids.shape[1])
    flat.add(np.ascontiguousarray(centroids, np.float32))
    _, found = flat.search(np.ascontiguousarray(vectors, np.float32), 1)
    return np.asarray(found[:, 0], np.int64)


def _read_clusters(
    centroids: np.ndarray, assigned: np.ndarray, index: CatalogueIndex, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Stored clusters, checked against the index they belong to."""
    centroids = np.asarray(centroids, np.float32)
    assigned = np.asarray(assigned, np.int64)
    if (
        centroids.ndim != 2
        or centroids.shape[1] != index.dim
        or assigned.shape != (index.size,)
        or (len(assigned) and (assigned.min() < 0 or assigned.max() >= len(centroids)))
    ):
        raise ValueError(f"index {where}: its inverted-file clusters do not fit its views")
    return centroids, assigned
