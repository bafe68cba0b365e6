"""Which score tells catalogue photos from photos of other things: the no-match verdict's choice.

Builds the demo catalogue (`python -m train.demo`, with photos of objects outside it), extracts
every photo's features through the embedded backend, indexes the training views and scores the
held-out catalogue queries (positives) and the outside photos (negatives, both `_outside/`
folders: 8 objects the catalogue does not hold) with each candidate score:

* `nearest`: cosine similarity to the nearest view, on raw features;
* `nearest_centred`: the same on features centred on the catalogue's mean view (what the
  service uses, `matcher.index`);
* `margin`: the best label's nearest similarity minus the second label's (centred);
* `prototype`: cosine similarity to the nearest label mean (centred).

For each it prints the separation (AUC: the chance that a catalogue photo scores above an
outside one) and the share of outside photos accepted at the threshold that rejects at most 2 %
of the correctly ranked catalogue photos (`matcher.calibration.calibrate`, the rule `train`
uses), with and without the outside cat (another cat than the catalogue's `chelsea`, the
hardest negative).

    .venv/bin/python -m bench.no_match --model-dir models/backbones/efficientnet_lite0 \\
        [--train-views 40] [--json build/bench-no-match.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from matcher.backends.base import FeatureExtractor
from matcher.calibration import TARGET_FALSE_REJECT, calibrate
from matcher.settings import CoreSettings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.no_match", description=__doc__)
    default = CoreSettings.model_fields["model_dir"].default
    parser.add_argument("--model-dir", type=Path, default=default, help=f"({default})")
    parser.add_argument("--train-views", type=int, default=40, help="views per item (40)")
    parser.add_argument("--query-views", type=int, default=8, help="queries per item (8)")
    parser.add_argument("--outside-views", type=int, default=6, help="per outside object (6)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def build_demo(out: Path, args: argparse.Namespace) -> None:
    command = [sys.executable, "-m", "train.demo", "--out", str(out), "--quiet"]
    command += ["--train-views", str(args.train_views), "--query-views", str(args.query_views)]
    command += ["--outside-views", str(args.outside_views)]
    subprocess.run(command, check=True, capture_output=True)


def features(backend: FeatureExtractor, paths: list[Path]) -> np.ndarray:
    from matcher.extraction import extract_features

    found = extract_features(paths, backend, None, progress=False)
    if found.rejected:
        raise RuntimeError(f"unreadable demo photos: {list(found.rejected)}")
    return np.asarray(found.features)


def candidate_scores(
    train: np.ndarray, labels: list[str], queries: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Score name -> (score, top label index) per query."""
    from matcher.index import CatalogueIndex

    ids = [str(i) for i in range(len(labels))]
    centred = CatalogueIndex.build(train, labels, ids)
    raw = CatalogueIndex.build(train, labels, ids, centre=np.zeros(train.shape[1], np.float32))
    best = centred.search(queries).similarity
    ordered = np.sort(best, axis=1)
    prototypes = centred.prototype_similarity(queries)
    raw_best = raw.search(queries).similarity
    return {
        "nearest": (raw_best.max(axis=1), raw_best.argmax(axis=1)),
        "nearest_centred": (best.max(axis=1), best.argmax(axis=1)),
        "margin": (ordered[:, -1] - ordered[:, -2], best.argmax(axis=1)),
        "prototype": (prototypes.max(axis=1), prototypes.argmax(axis=1)),
    }


def separation(positives: np.ndarray, negatives: np.ndarray) -> dict[str, float]:
    calibration = calibrate(positives, negatives, TARGET_FALSE_REJECT)
    assert calibration.false_accept_rate is not None  # there are outside photos
    return {
        "auc": float(np.mean(positives[:, None] > negatives[None, :])),
        "threshold": calibration.threshold,
        "false_accept": calibration.false_accept_rate,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from matcher.backends.embedded import EmbeddedBackend
    from matcher.dataset import discover, outside_images

    backend = EmbeddedBackend(args.model_dir)
    backend.load()
    with tempfile.TemporaryDirectory(prefix="bench-no-match-") as tmp:
        root = Path(tmp)
        build_demo(root, args)
        train, queries = discover(root / "train"), discover(root / "queries")
        outside = outside_images(root / "train" / "_outside")
        outside += outside_images(root / "queries" / "_outside")
        x_train, x_query = features(backend, train.paths), features(backend, queries.paths)
        x_outside = features(backend, outside)
    # The cat is the first object of the queries' outside folder (train.demo.OUTSIDE_QUERIES).
    cat = np.zeros(len(outside), bool)
    first_query_outside = len(outside) // 2
    cat[first_query_outside : first_query_outside + args.outside_views] = True
    labels = sorted(set(train.labels))
    truth = np.searchsorted(labels, queries.labels)
    inside, beyond = (
        candidate_scores(x_train, train.labels, x_query),
        candidate_scores(x_train, train.labels, x_outside),
    )
    figures: dict[str, dict[str, float]] = {}
    print(
        f"{len(queries.paths)} catalogue queries, {len(outside)} outside photos, "
        f"{len(train.paths)} reference views; threshold at {TARGET_FALSE_REJECT:.0%} false rejects"
    )
    print(f"{'score':16s} {'top-1':>6s} {'AUC':>7s} {'false accepts':>14s} {'(no cat)':>9s}")
    for name, (score, top) in inside.items():
        correct = top == truth
        negatives = beyond[name][0]
        row = separation(score[correct], negatives)
        row["top1"] = float(correct.mean())
        row["false_accept_without_cat"] = separation(score[correct], negatives[~cat])[
            "false_accept"
        ]
        figures[name] = row
        print(
            f"{name:16s} {row['top1']:6.1%} {row['auc']:7.4f} {row['false_accept']:14.1%} "
            f"{row['false_accept_without_cat']:9.1%}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"train_views": args.train_views, "outside_photos": len(outside), **figures}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
