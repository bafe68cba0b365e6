"""The "no match" threshold, set on photos the matcher never saw during training.

`train` calibrates every run with it, and `bench/no_match.py` compares candidate scores with
the same rule, so the benchmark's figures are those a training would record.

The score is the cosine similarity between a photo and its nearest reference view in the whole
catalogue (`matcher.index`, centred features): how close the photo comes to anything the
catalogue holds, whichever matcher ranks the labels. On the demo catalogue it separated
out-of-catalogue photos from catalogue ones better than the margin between the two best items
or a prototype's similarity (docs/benchmarks.md, "No match").

The held-out split is searched against an index of the training split only, so every held-out
photo is as new to it as a field photo. The threshold is the highest that turns at most
`TARGET_FALSE_REJECT` of the correctly matched held-out photos into "no match"; photos of things
outside the catalogue (`DATA/_outside/` or `--outside DIR`), when there are any, then measure
how many it lets through. Without them the false-accept rate is unknown and recorded as such.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: Correct matches the threshold may turn into "no match" on the held-out split.
TARGET_FALSE_REJECT = 0.02
#: Points of the recorded curve (false accepts against false rejects).
CURVE_POINTS = 41
SCORE = "nearest_reference_similarity"


@dataclass(frozen=True)
class NoMatchCalibration:
    """The threshold and what it was measured to do; recorded in report.json."""

    threshold: float
    #: Correct held-out matches below the threshold (turned into "no match").
    false_reject_rate: float
    #: Outside photos at or above it (taken for a catalogue item); None without outside photos.
    false_accept_rate: float | None
    matched_holdout: int
    outside_photos: int
    target_false_reject: float = TARGET_FALSE_REJECT
    score: str = SCORE
    #: {"threshold", "false_reject", "false_accept"} points, thresholds ascending.
    curve: list[dict[str, float | None]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(
    matched: np.ndarray, outside: np.ndarray, target: float = TARGET_FALSE_REJECT
) -> NoMatchCalibration:
    """The threshold for `matched` (scores of correct held-out matches) and `outside` scores."""
    positives = np.sort(np.asarray(matched, dtype=np.float64))
    negatives = np.asarray(outside, dtype=np.float64)
    if len(positives) == 0:
        raise ValueError("no correct held-out match to set the no-match threshold on")
    # Accepted: score >= threshold. Rejecting the `allowed` lowest keeps the rate <= target.
    allowed = math.floor(target * len(positives))
    threshold = float(positives[allowed])
    return NoMatchCalibration(
        threshold=threshold,
        false_reject_rate=_below(positives, threshold),
        false_accept_rate=_at_or_above(negatives, threshold),
        matched_holdout=len(positives),
        outside_photos=len(negatives),
        target_false_reject=target,
        curve=_curve(positives, negatives),
    )


def _below(scores: np.ndarray, threshold: float) -> float:
    return float(np.mean(scores < threshold))


def _at_or_above(scores: np.ndarray, threshold: float) -> float | None:
    return float(np.mean(scores >= threshold)) if len(scores) else None


def _curve(positives: np.ndarray, negatives: np.ndarray) -> list[dict[str, float | None]]:
    every = np.concatenate([positives, negatives])
    thresholds = np.linspace(every.min(), every.max(), CURVE_POINTS)
    return [
        {
            "threshold": round(float(t), 5),
            "false_reject": _below(positives, float(t)),
            "false_accept": _at_or_above(negatives, float(t)),
        }
        for t in thresholds
    ]
