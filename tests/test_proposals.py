"""Proposal metrics (tIoU, AR@AN, AUC) and BMN's soft-NMS on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vclr.errors import VclrError
from vclr.evaluate.proposals import (
    average_recall_vs_an,
    pairwise_temporal_iou,
    soft_nms,
    temporal_iou,
)


def props(*rows):
    """[(start, end, score), ...] -> (segments, scores)."""
    array = np.asarray(rows, dtype=float).reshape(-1, 3)
    return array[:, :2], array[:, 2]


# ----------------------------------------------------------------------------- tIoU


def test_temporal_iou_by_hand():
    # [0,10] vs [5,15]: overlap 5, union 15 -> 1/3; touching [10,20]: 0; inside [2,4]: 2/10;
    # identical: 1; disjoint: 0
    got = temporal_iou(0, 10, [5, 10, 2, 0, 30], [15, 20, 4, 10, 40])
    np.testing.assert_allclose(got, [1 / 3, 0, 0.2, 1, 0])
    # two zero-length segments at the same point have an empty union: 0, not NaN
    assert temporal_iou(3, 3, [3], [3]).tolist() == [0.0]


def test_pairwise_temporal_iou_matches_one_to_many():
    a = np.array([[0, 10], [5, 6]], dtype=float)
    b = np.array([[5, 15], [0, 10], [20, 30]], dtype=float)
    matrix = pairwise_temporal_iou(a, b)
    assert matrix.shape == (2, 3)
    for i, (start, end) in enumerate(a):
        np.testing.assert_allclose(matrix[i], temporal_iou(start, end, b[:, 0], b[:, 1]))
    np.testing.assert_allclose(matrix[1], [0.1, 0.1, 0.0])  # [5,6] is 1 long, inside both 10-long ones
    with pytest.raises(VclrError, match=r"\[N, 2\]"):
        pairwise_temporal_iou(np.zeros((2, 3)), b)


# ----------------------------------------------------------------------------- AR@AN and AUC


def test_average_recall_by_hand():
    # Video A: ground truth [0,10]; proposals [0,10] (0.9, tIoU 1) and [20,30] (0.5, tIoU 0).
    # Video B: ground truths [0,10], [20,30]; proposals [0,5] (0.8; tIoU 0.5 with [0,10]) and
    #          [20,30] (0.7; tIoU 1 with [20,30]).
    # 4 proposals, 2 videos: ratio = 100*2/4 = 50 -> all kept; pcn_j = j/100 * 100*2/4 = j/2, so
    # each video looks at min(int(2 * j/2), 2) = 1 proposal at AN step j=1 and 2 from j=2 on;
    # AN = pcn * 4/2 = j. Three ground truths in all.
    # 1 proposal:  A hits at every threshold; B's [0,5] hits [0,10] only at tIoU 0.5 (0.5 >= 0.5).
    #              recall 2/3 at 0.5, 1/3 at the 9 others: mean (2/3 + 9/3) / 10 = 11/30.
    # 2 proposals: B's [20,30] adds one hit at every threshold: 3/3 at 0.5, 2/3 elsewhere:
    #              mean (1 + 9 * 2/3) / 10 = 7/10.
    # AUC = 100 * trapezoid over AN 1..100 / 100 = (11/30 + 7/10) / 2 + 98 * 7/10 = 69.1333...
    ground_truth = {"A": [[0, 10]], "B": [[0, 10], [20, 30]]}
    proposals = {"A": props((0, 10, 0.9), (20, 30, 0.5)), "B": props((0, 5, 0.8), (20, 30, 0.7))}
    result = average_recall_vs_an(ground_truth, proposals)
    assert result["AR@1"] == pytest.approx(11 / 30)
    assert result["AR@5"] == result["AR@10"] == result["AR@100"] == pytest.approx(0.7)
    np.testing.assert_allclose(result["average_proposals"], np.arange(1, 101))
    assert result["auc"] == pytest.approx((11 / 30 + 0.7) / 2 + 98 * 0.7)
    assert result["recall"].shape == (10, 100)
    assert result["recall"][0, 0] == pytest.approx(2 / 3) and result["recall"][1, 0] == pytest.approx(1 / 3)
    assert (result["videos"], result["ground_truths"], result["proposals_used"]) == (2, 3, 4)


def test_perfect_and_empty_proposal_sets():
    ground_truth = {"A": [[0, 10]], "B": [[5, 7.5]], "C": [[1, 2]]}
    perfect = {video: props((s, e, 1.0)) for video, [[s, e]] in ground_truth.items()}
    result = average_recall_vs_an(ground_truth, perfect)
    assert result["AR@1"] == result["AR@100"] == 1.0
    # the curve starts at AN = 1, not 0: 100 * (1 * 99) / 100 = 99, the official maximum
    assert result["auc"] == pytest.approx(99.0)

    empty = average_recall_vs_an(ground_truth, {})
    assert empty["auc"] == 0.0 and empty["AR@100"] == 0.0 and empty["proposals_used"] == 0
    assert empty["average_proposals"][-1] == 100


def test_a_video_without_proposals_recalls_nothing():
    # A: one exact proposal; B has a ground truth but no proposals (absent, or an empty list).
    # total 1 proposal, V=2: ratio 200, A keeps its 1; pcn = 2j, AN = 2j * 1/2 = j.
    # A's one ground truth is recalled at every step, B's never: AR = 1/2, AUC = 100 * 0.5 * 99 / 100.
    ground_truth = {"A": [[0, 10]], "B": [[0, 10]]}
    for proposals in ({"A": props((0, 10, 1.0))}, {"A": props((0, 10, 1.0)), "B": props()}):
        result = average_recall_vs_an(ground_truth, proposals)
        assert result["AR@1"] == result["AR@100"] == pytest.approx(0.5)
        assert result["auc"] == pytest.approx(49.5)


def test_videos_without_ground_truth_are_not_counted():
    ground_truth = {"A": [[0, 10]], "empty": []}
    result = average_recall_vs_an(ground_truth, {"A": props((0, 10, 1.0)), "empty": props((0, 1, 1.0))})
    assert result["videos"] == 1 and result["AR@1"] == 1.0
    with pytest.raises(VclrError, match="no ground-truth"):
        average_recall_vs_an({"empty": []}, {})


def test_ties_keep_the_given_order():
    # equal scores: the proposal given first is ranked first; AR@1 looks at it alone
    ground_truth = {"A": [[0, 10]]}
    miss_first = average_recall_vs_an(ground_truth, {"A": props((20, 30, 0.5), (0, 10, 0.5))})
    hit_first = average_recall_vs_an(ground_truth, {"A": props((0, 10, 0.5), (20, 30, 0.5))})
    assert miss_first["AR@1"] == 0.0 and hit_first["AR@1"] == 1.0
    assert miss_first["AR@5"] == hit_first["AR@5"] == 1.0


def test_at_most_100_proposals_per_video_count():
    # 200 proposals for one video: ratio = 100 * 1 / 200 = 0.5 keeps the best 100. The exact match is
    # ranked 101st, so it never counts; moved to 100th it counts from AN = 100 only.
    misses = [(20 + i, 21 + i, 1.0 - i / 1000) for i in range(200)]
    late = misses[:100] + [(0, 10, 0.9005)] + misses[100:199]  # below the 100th miss (0.901)
    result = average_recall_vs_an({"A": [[0, 10]]}, {"A": props(*late)})
    assert result["AR@100"] == 0.0
    in_time = misses[:99] + [(0, 10, 0.9015)] + misses[99:199]  # between the 99th (0.902) and 100th
    result = average_recall_vs_an({"A": [[0, 10]]}, {"A": props(*in_time)})
    assert result["AR@10"] == 0.0 and result["AR@100"] == 1.0


def test_bad_proposal_input():
    with pytest.raises(VclrError, match="2 segments but 1 scores"):
        average_recall_vs_an({"A": [[0, 1]]}, {"A": (np.zeros((2, 2)), np.zeros(1))})
    with pytest.raises(VclrError, match="finite"):
        average_recall_vs_an({"A": [[0, math.nan]]}, {})


# ----------------------------------------------------------------------------- soft-NMS


def test_soft_nms_gaussian_decay_by_hand():
    # A [0, .2] 0.9 is kept first; its width 0.2 gives the threshold 0.5 + 0.4 * 0.2 = 0.58.
    # B [0, .18] has tIoU .18/.2 = 0.9 > 0.58 with A -> 0.8 * exp(-0.81 / 0.4).
    # C [.5, .7] does not overlap A and keeps 0.7, so C is kept before the decayed B.
    segments, scores = soft_nms(*props((0, 0.2, 0.9), (0, 0.18, 0.8), (0.5, 0.7, 0.7)), alpha=0.4, low=0.5, high=0.9)
    np.testing.assert_allclose(segments, [[0, 0.2], [0.5, 0.7], [0, 0.18]])
    np.testing.assert_allclose(scores, [0.9, 0.7, 0.8 * math.exp(-0.81 / 0.4)])


def test_soft_nms_threshold_grows_with_width():
    # A [0, 1] (width 1): threshold 0.5 + 0.4 * 1 = 0.9. B [0, .85] has tIoU 0.85 < 0.9: untouched.
    # Against a narrow A' [0, .1] (threshold 0.54), B' [0, .085] (tIoU 0.85) decays.
    _, scores = soft_nms(*props((0, 1, 0.9), (0, 0.85, 0.8)))
    np.testing.assert_allclose(scores, [0.9, 0.8])
    _, scores = soft_nms(*props((0, 0.1, 0.9), (0, 0.085, 0.8)))
    np.testing.assert_allclose(scores, [0.9, 0.8 * math.exp(-0.85**2 / 0.4)])


def test_soft_nms_top_k_ties_and_edge_cases():
    disjoint = props(*[(i, i + 0.5, s) for i, s in enumerate([0.1, 0.5, 0.3, 0.5, 0.2])])
    segments, scores = soft_nms(*disjoint, top_k=3)
    np.testing.assert_allclose(scores, [0.5, 0.5, 0.3])
    np.testing.assert_allclose(segments[:, 0], [1, 3, 2])  # the tie: the one given first (1) first
    segments, scores = soft_nms(*props())
    assert segments.shape == (0, 2) and scores.shape == (0,)
    segments, scores = soft_nms(*props((0.2, 0.4, 0.3)))
    np.testing.assert_allclose(segments, [[0.2, 0.4]])
    with pytest.raises(VclrError, match="alpha"):
        soft_nms(*disjoint, alpha=0)
