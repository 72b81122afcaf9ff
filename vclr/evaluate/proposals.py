"""Temporal proposal metrics and post-processing (spec/protocols.md, "Temporal action localisation").

- `temporal_iou` / `pairwise_temporal_iou`: tIoU of segments, vectorised.
- `soft_nms`: BMN's Gaussian soft-NMS (mmaction2 `soft_nms`, the authors' stack): repeatedly keep the
  highest-scoring proposal and decay the score of every remaining proposal whose tIoU with it exceeds
  low + (high - low) * width_of_kept by exp(-tIoU^2 / alpha).
- `average_recall_vs_an`: the ActivityNet proposal challenge's AR-AN curve and AUC (the official
  `eval_proposal.py` / mmaction2 `average_recall_at_avg_proposals`), in NumPy, vectorised.

Conventions kept from the official computation so that numbers stay comparable:
- Only videos with at least one ground-truth segment count (the official ground-truth table has no
  row for a video without segments); a counted video without proposals recalls nothing.
- AN runs over 1..100 (not 0..100): AUC = 100 * trapezoid(AR, AN) / AN[-1], so a perfect proposal set
  (every ground truth hit by the top proposal at tIoU 1) scores 99.0, not 100.
- The number of proposals at AN step j is int(P * pcn_j) with pcn_j = j / 100 * (...) in floating
  point: at j = 29, 57, 58 this truncates to j - 1 (0.29 * 100 = 28.999...). The official code does
  the same; AR@1/5/10/100 are not affected.
Deliberate difference: proposals are ranked by a STABLE descending sort of their scores, so tied
proposals keep their given order (the official `argsort()[::-1]` leaves the order of ties to NumPy's
unstable sort).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vclr.errors import VclrError

TIOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
AR_AT = (1, 5, 10, 100)


def _segments(array, what: str) -> np.ndarray:
    segments = np.asarray(array, dtype=np.float64)
    if segments.size == 0:
        return segments.reshape(0, 2)
    if segments.ndim != 2 or segments.shape[1] != 2:
        raise VclrError(f"{what}: expected segments of shape [N, 2], got {segments.shape}")
    if not np.isfinite(segments).all():
        raise VclrError(f"{what}: segments must be finite")
    return segments


def temporal_iou(start: float, end: float, starts, ends) -> np.ndarray:
    """tIoU of one segment [start, end] with each of the segments [starts[i], ends[i]].

    A pair whose union is empty (two zero-length segments) has tIoU 0, not NaN.
    """
    starts, ends = np.asarray(starts, dtype=np.float64), np.asarray(ends, dtype=np.float64)
    intersection = np.clip(np.minimum(end, ends) - np.maximum(start, starts), 0.0, None)
    union = (ends - starts) + (end - start) - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def pairwise_temporal_iou(a, b) -> np.ndarray:
    """tIoU matrix [len(a), len(b)] of two segment arrays [N, 2] and [M, 2]."""
    a, b = _segments(a, "pairwise_temporal_iou: first"), _segments(b, "pairwise_temporal_iou: second")
    intersection = np.clip(np.minimum(a[:, None, 1], b[None, :, 1]) - np.maximum(a[:, None, 0], b[None, :, 0]),
                           0.0, None)
    union = (a[:, None, 1] - a[:, None, 0]) + (b[None, :, 1] - b[None, :, 0]) - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def rank_by_score(scores) -> np.ndarray:
    """Indices that sort `scores` descending; ties keep their given order."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def soft_nms(segments, scores, alpha: float = 0.4, low: float = 0.5, high: float = 0.9,
             top_k: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """BMN's soft-NMS; returns (segments [K, 2], scores [K]) of at most `top_k` kept proposals, in the
    order kept (scores non-increasing).

    Segments are in units of the video's length (BMN applies it to proposals in [0, 1]): the decay
    threshold low + (high - low) * width grows with the kept proposal's width, so long proposals
    suppress only near-duplicates. Among equal scores the proposal given first is kept first.
    """
    segments = _segments(segments, "soft_nms")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(segments):
        raise VclrError(f"soft_nms: {len(segments)} segments but {len(scores)} scores")
    if alpha <= 0 or top_k < 0:
        raise VclrError(f"soft_nms: need alpha > 0 and top_k >= 0, got {alpha} and {top_k}")
    order = rank_by_score(scores)
    remaining_segments, remaining_scores = segments[order], scores[order].copy()
    alive = np.ones(len(order), dtype=bool)
    kept: list[int] = []
    while len(kept) < top_k and alive.any():
        candidates = np.flatnonzero(alive)
        best = candidates[np.argmax(remaining_scores[candidates])]  # first of the maxima: the earliest
        start, end = remaining_segments[best]
        alive[best] = False
        kept.append(best)
        others = np.flatnonzero(alive)
        iou = temporal_iou(start, end, remaining_segments[others, 0], remaining_segments[others, 1])
        decay = iou > low + (high - low) * (end - start)
        remaining_scores[others[decay]] *= np.exp(-np.square(iou[decay]) / alpha)
    kept_index = np.asarray(kept, dtype=np.int64)
    return remaining_segments[kept_index].reshape(-1, 2), remaining_scores[kept_index]


def uniform_random_proposals(durations: Mapping[str, float], count: int, seed: int) -> dict[str, tuple]:
    """The trivial baseline a proposal method must beat: per video `count` segments whose two ends
    are uniform in [0, duration] (sorted), with uniform random scores."""
    rng = np.random.default_rng(seed)
    proposals = {}
    for video in sorted(durations):
        ends = np.sort(rng.uniform(0.0, float(durations[video]), size=(count, 2)), axis=1)
        proposals[video] = (ends, rng.uniform(size=count))
    return proposals


def average_recall_vs_an(ground_truth: Mapping[str, object], proposals: Mapping[str, tuple],
                         max_avg_proposals: int = 100, tiou_thresholds=TIOU_THRESHOLDS) -> dict:
    """The AR-AN curve of `proposals` against `ground_truth` (the official computation, see module doc).

    ground_truth: {video: segments [G, 2]} (seconds); videos with G = 0 are not counted.
    proposals: {video: (segments [P, 2], scores [P])}; a video absent here has no proposals.
    Returns {"recall" [thresholds, 100], "average_recall" [100], "average_proposals" [100] (AN),
    "auc" (0..100), "AR@1", "AR@5", "AR@10", "AR@100" (fractions), "videos", "ground_truths",
    "proposals_used"}.
    """
    thresholds = np.asarray(tiou_thresholds, dtype=np.float64).reshape(-1)
    if max_avg_proposals < 1:
        raise VclrError(f"max_avg_proposals must be >= 1, got {max_avg_proposals}")
    videos = []
    for video, segments in ground_truth.items():
        segments = _segments(segments, f"ground truth of {video}")
        if len(segments):
            videos.append((video, segments))
    if not videos:
        raise VclrError("no ground-truth segments to evaluate against")
    ranked = {}
    for video, _ in videos:
        segments, scores = proposals.get(video, (np.zeros((0, 2)), np.zeros(0)))
        segments = _segments(segments, f"proposals of {video}")
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(scores) != len(segments):
            raise VclrError(f"proposals of {video}: {len(segments)} segments but {len(scores)} scores")
        ranked[video] = segments[rank_by_score(scores)]
    total = sum(len(segments) for segments in ranked.values())
    steps = np.arange(1, 101) / 100.0
    positives = sum(len(segments) for _, segments in videos)
    if total == 0:  # nothing proposed anywhere: the official code divides by zero here
        recall = np.zeros((len(thresholds), 100))
        return _summary(recall, steps * max_avg_proposals, len(videos), positives, 0)

    ratio = max_avg_proposals * float(len(videos)) / total
    retrieved = {video: ranked[video][:min(int(len(ranked[video]) * ratio), len(ranked[video]))]
                 for video, _ in videos}
    total_retrieved = sum(len(segments) for segments in retrieved.values())
    if total_retrieved == 0:  # ratio truncated every video's list to nothing
        recall = np.zeros((len(thresholds), 100))
        return _summary(recall, steps * max_avg_proposals, len(videos), positives, 0)
    pcn = steps * (max_avg_proposals * float(len(videos)) / total_retrieved)
    matches = np.zeros((len(thresholds), 100))
    for video, truth in videos:
        kept = retrieved[video]
        if len(kept) == 0:
            continue  # the official code scores such a video as one zero-tIoU column
        tiou = pairwise_temporal_iou(truth, kept)  # [G, P]
        hit = tiou[:, None, :] >= thresholds[None, :, None]  # [G, thresholds, P]
        # index of the first (best-ranked) proposal reaching each threshold; P when none does
        first = np.where(hit.any(-1), hit.argmax(-1), len(kept))
        counts = np.minimum((len(kept) * pcn).astype(int), len(kept))  # proposals looked at, per AN step
        matches += (first[:, :, None] < counts[None, None, :]).sum(0)
    recall = matches / positives
    return _summary(recall, pcn * (float(total_retrieved) / len(videos)), len(videos), positives, total_retrieved)


def _summary(recall: np.ndarray, average_proposals: np.ndarray, videos: int, positives: int, used: int) -> dict:
    average_recall = recall.mean(0)
    auc = 100.0 * float(np.trapezoid(average_recall, average_proposals)) / float(average_proposals[-1])
    result = {"recall": recall, "average_recall": average_recall, "average_proposals": average_proposals,
              "auc": auc, "videos": videos, "ground_truths": positives, "proposals_used": used}
    for n in AR_AT:
        result[f"AR@{n}"] = float(average_recall[n - 1])
    return result
