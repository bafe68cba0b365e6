"""The rescue threshold (`train.verification.calibrate_rescue`): the similarity at which a
match geometry could not verify is still a match."""

from __future__ import annotations

import numpy as np
import pytest

from train.verification import TARGET_FALSE_ACCEPT, calibrate_rescue

# 100 correct matches: 80 verified, 20 not, with similarities 0.30, 0.31, ... 0.49.
SIMILARITY = np.concatenate([np.full(80, 0.9), 0.30 + 0.01 * np.arange(20)])
VERIFIED = np.arange(100) < 80


def test_without_outside_photos_it_refuses_the_target_share_of_correct_matches() -> None:
    found = calibrate_rescue(SIMILARITY, VERIFIED, np.zeros(0), np.zeros(0, bool), 0.05)
    assert found.threshold == pytest.approx(0.35)  # 5 of 100 below it: 0.30 .. 0.34
    assert found.false_reject_rate == pytest.approx(0.05)
    assert found.false_accept_rate is None and not found.set_by_outside


def test_outside_photos_lower_it_when_a_lower_one_still_refuses_them() -> None:
    outside = np.linspace(0.10, 0.32, 40)  # all below 0.35: 0.30 and 0.31 may match
    found = calibrate_rescue(SIMILARITY, VERIFIED, outside, np.zeros(40, bool), 0.05)
    allowed = int(TARGET_FALSE_ACCEPT * 40)  # outside photos it may let through
    assert found.set_by_outside
    assert found.threshold > np.sort(outside)[::-1][allowed]
    assert found.threshold == pytest.approx(np.sort(outside)[::-1][allowed], abs=1e-6)
    assert found.false_accept_rate == pytest.approx(allowed / 40)
    assert found.false_reject_rate < 0.05
    assert found.false_reject_rate == pytest.approx(0.02)


def test_outside_photos_never_raise_it() -> None:
    outside = np.linspace(0.30, 0.60, 40)  # the target threshold lets many through
    found = calibrate_rescue(SIMILARITY, VERIFIED, outside, np.zeros(40, bool), 0.05)
    assert found.threshold == pytest.approx(0.35) and not found.set_by_outside
    assert found.false_accept_rate is not None and found.false_accept_rate > 0.5


def test_outside_photos_geometry_verified_leave_no_room_to_lower_it() -> None:
    outside = np.full(40, 0.1)
    verified = np.arange(40) < 2  # 2 of 40 verified by chance: over the 2.5 % allowed
    found = calibrate_rescue(SIMILARITY, VERIFIED, outside, verified, 0.05)
    assert found.threshold == pytest.approx(0.35) and not found.set_by_outside
