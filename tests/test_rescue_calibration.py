"""The rescue threshold (`train.verification.calibrate_rescue`): the similarity at which a
match geometry could not verify is still a match."""

from __future__ import annotations

import numpy as np
import pytest

from train.photo_views import impostor_similarity, twin_labels
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


def test_without_outside_photos_catalogue_stand_ins_lower_it() -> None:
    impostors = np.linspace(0.05, 0.33, 80)  # the catalogue's photos against other items
    found = calibrate_rescue(
        SIMILARITY, VERIFIED, np.zeros(0), np.zeros(0, bool), 0.05, impostors=impostors
    )
    allowed = int(TARGET_FALSE_ACCEPT * 80)
    assert found.set_by_impostors and not found.set_by_outside
    assert found.threshold == pytest.approx(np.sort(impostors)[::-1][allowed], abs=1e-6)
    assert found.impostor_photos == 80
    assert found.impostor_accept_rate == pytest.approx(allowed / 80)
    assert found.false_reject_rate == pytest.approx(0.03)  # 0.30, 0.31, 0.32 refused


def test_stand_ins_never_raise_it() -> None:
    impostors = np.linspace(0.30, 0.90, 80)
    found = calibrate_rescue(
        SIMILARITY, VERIFIED, np.zeros(0), np.zeros(0, bool), 0.05, impostors=impostors
    )
    assert found.threshold == pytest.approx(0.35) and not found.set_by_impostors
    assert found.impostor_accept_rate is not None and found.impostor_accept_rate > 0.5


def test_outside_photos_when_there_are_some_are_what_it_rests_on() -> None:
    outside = np.full(40, 0.36)  # no room below 0.35 for the outside photos
    found = calibrate_rescue(
        SIMILARITY, VERIFIED, outside, np.zeros(40, bool), 0.05, impostors=np.full(80, 0.1)
    )
    assert found.threshold == pytest.approx(0.35)
    assert not found.set_by_outside and not found.set_by_impostors


def test_stand_ins_score_each_photo_on_other_items_but_its_twins() -> None:
    names = np.array(["left", "right", "cup", "key"])
    # Photos of `left` and `right` (two halves of one photo) are near each other; `cup` and
    # `key` are far from everything.
    by_label = np.array(
        [
            [0.90, 0.88, 0.30, 0.20],  # left
            [0.85, 0.86, 0.25, 0.35],  # left
            [0.87, 0.91, 0.40, 0.10],  # right
            [0.86, 0.84, 0.20, 0.30],  # right
            [0.30, 0.20, 0.80, 0.45],  # cup
            [0.25, 0.50, 0.75, 0.40],  # cup
            [0.10, 0.20, 0.40, 0.85],  # key
            [0.33, 0.10, 0.20, 0.90],  # key, on clutter: left out
        ]
    )
    truths = np.array(["left", "left", "right", "right", "cup", "cup", "key", "key"])
    rows = np.array([True] * 7 + [False])
    twins = twin_labels(by_label, np.array([0, 0, 1, 1, 2, 2, 3, 3]), rows)
    assert twins[0, 1] and twins[1, 0] and twins.sum() == 2
    found = impostor_similarity(by_label, truths, names, rows)
    # Each photo's best label that is neither its own nor a twin; the clutter photo is left out.
    assert found.tolist() == pytest.approx([0.30, 0.35, 0.40, 0.30, 0.45, 0.50, 0.40])


def test_stand_ins_leave_out_photos_whose_every_other_item_is_a_twin() -> None:
    names = np.array(["left", "right"])
    by_label = np.array([[0.90, 0.88], [0.87, 0.91]])
    rows = np.ones(2, bool)
    assert impostor_similarity(by_label, np.array(["left", "right"]), names, rows).size == 0


def test_the_curve_records_the_rule_at_other_thresholds() -> None:
    outside = np.linspace(0.10, 0.32, 40)
    found = calibrate_rescue(
        SIMILARITY, VERIFIED, outside, np.zeros(40, bool), 0.05, impostors=np.full(10, 0.2)
    )
    curve = found.curve
    thresholds = [point["threshold"] for point in curve]
    assert thresholds == sorted(thresholds) and thresholds[0] == pytest.approx(0.10)
    assert thresholds[-1] == pytest.approx(0.49)  # the highest unverified similarity
    rejects = [point["false_reject"] for point in curve]
    accepts = [point["false_accept"] for point in curve]
    # Lower thresholds refuse fewer correct matches and let more outside photos through;
    # verified matches are never refused (20 of 100 unverified at most).
    assert rejects == sorted(rejects) and accepts == sorted(accepts, reverse=True)
    assert rejects[0] == 0.0 and rejects[-1] == pytest.approx(0.19)
    assert accepts[0] == 1.0 and accepts[-1] == 0.0
    assert all(point["impostor_accept"] in (0.0, 1.0) for point in curve)


def test_without_outside_photos_or_stand_ins_the_curve_has_no_accepts() -> None:
    found = calibrate_rescue(SIMILARITY, VERIFIED, np.zeros(0), np.zeros(0, bool), 0.05)
    assert found.curve and all(
        point["false_accept"] is None and point["impostor_accept"] is None for point in found.curve
    )
