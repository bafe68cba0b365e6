"""The numpy classifier path gives scikit-learn's own probabilities, for the models train writes."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.svm import SVC, LinearSVC

from matcher.fast_proba import compile_probabilities


def clustered(n_classes: int, per_class: int = 30, dim: int = 64, seed: int = 0):
    """Overlapping class clusters, so that scores fall on both sides of every boundary."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    x = np.concatenate([c + 1.5 * rng.normal(size=(per_class, dim)) for c in centres])
    y = np.repeat([f"label_{i:02d}" for i in range(n_classes)], per_class)
    return x.astype(np.float32), y


@pytest.mark.parametrize("n_classes", [2, 3, 12])
@pytest.mark.parametrize("make", [lambda: SVC(kernel="linear", C=0.1), lambda: LinearSVC(C=0.1)])
def test_equal_to_predict_proba(n_classes: int, make) -> None:
    x, y = clustered(n_classes)
    model = CalibratedClassifierCV(make(), ensemble=False, cv=3).fit(x, y)
    fast = compile_probabilities(model)
    assert fast is not None
    queries, _ = clustered(n_classes, per_class=5, seed=1)
    expected = model.predict_proba(queries)
    got = fast(queries)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    # Top labels agree exactly, and one row works as well as many.
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
    np.testing.assert_allclose(fast(queries[:1]), expected[:1], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "model",
    [
        CalibratedClassifierCV(SVC(kernel="rbf"), ensemble=False, cv=3),
        CalibratedClassifierCV(SVC(kernel="linear"), ensemble=True, cv=3),
        CalibratedClassifierCV(SVC(kernel="linear"), ensemble=False, cv=3, method="isotonic"),
        SVC(kernel="linear", probability=True),
    ],
    ids=["rbf", "ensemble", "isotonic", "svc-probability"],
)
# SVC(probability=True) is deprecated, but files trained with it are still served.
@pytest.mark.filterwarnings("ignore:The `probability` parameter was deprecated")
def test_other_models_keep_scikit_learn(model) -> None:
    x, y = clustered(3)
    assert compile_probabilities(model.fit(x, y)) is None


def test_the_trained_demo_classifier_takes_the_numpy_path(trained) -> None:
    from matcher.classifier import Classifier

    classifier = Classifier.load(trained.classifier_path)
    features = np.load(trained.classifier_path.parent / "features.npz")["features"][:40]
    assert compile_probabilities(classifier._estimator) is not None
    np.testing.assert_allclose(
        classifier.probabilities(features),
        classifier._estimator.predict_proba(features),
        rtol=0,
        atol=1e-12,
    )
