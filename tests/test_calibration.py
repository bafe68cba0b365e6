"""The no-match threshold: the highest that rejects at most the target share of matches."""

from __future__ import annotations

import numpy as np
import pytest

from matcher.calibration import calibrate


def test_the_threshold_rejects_at_most_the_target_share_of_matches() -> None:
    matched = np.linspace(0.5, 0.99, 100)
    result = calibrate(matched, np.array([0.1, 0.2, 0.52, 0.6]), target=0.02)
    assert result.threshold == pytest.approx(matched[2])
    assert result.false_reject_rate == pytest.approx(0.02)
    assert result.false_accept_rate == pytest.approx(0.5)  # 0.52 is below, 0.6 above
    assert (result.matched_holdout, result.outside_photos) == (100, 4)


def test_without_outside_photos_the_false_accept_rate_is_unknown() -> None:
    result = calibrate(np.array([0.7, 0.8, 0.9]), np.zeros(0))
    assert result.false_accept_rate is None
    # Fewer matches than one rejection allows: nothing may be rejected.
    assert result.threshold == pytest.approx(0.7) and result.false_reject_rate == 0.0
    assert all(point["false_accept"] is None for point in result.curve)


def test_the_curve_runs_from_accepting_everything_to_rejecting_almost_everything() -> None:
    result = calibrate(np.linspace(0.6, 0.9, 50), np.linspace(0.1, 0.5, 20))
    first, last = result.curve[0], result.curve[-1]
    assert (first["false_reject"], first["false_accept"]) == (0.0, 1.0)
    assert last["false_accept"] == 0.0 and last["false_reject"] > 0.95
    rejects = [point["false_reject"] for point in result.curve]
    assert rejects == sorted(rejects)


def test_no_match_needs_at_least_one_correct_match() -> None:
    with pytest.raises(ValueError, match="no correct held-out match"):
        calibrate(np.zeros(0), np.zeros(0))
