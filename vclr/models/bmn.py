"""BMN, the boundary-matching network (Lin et al., ICCV 2019), in plain PyTorch.

Follows the authors' stack (mmaction2 0.11 `BMN` + `BMNLoss`, itself a port of the JJBOY reference):
- base module: two grouped 1D convs (groups 4) over the [C, T] snippet features;
- temporal evaluation module (TEM): start and end probability per position;
- proposal evaluation module (PEM): 1D conv, the boundary-matching layer (a fixed sampling mask,
  one matmul: [B, C, T] x [T, N*T*T] -> [B, C, N, T, T]), a Conv3d over the N samples, 2D convs ->
  a confidence map [B, 2, T, T] indexed [duration, start]: channel 0 is the regression (IoU)
  confidence, channel 1 the classification confidence. Entry [d, s] is the proposal that starts at
  position s and ends at s + d + 1 (in units of 1/T of the video).
- losses: TEM = ratio-weighted binary logistic loss on start and end; PEM regression = MSE on a
  sample balanced between high (>0.7), middle (0.3..0.7] and low (0..0.3] IoU cells; PEM
  classification = ratio-weighted binary logistic loss at IoU > 0.9; total = TEM + 10 * reg + cls.
- labels from ground-truth segments given as fractions of the video: the IoU map (max over segments)
  and start / end labels = the largest overlap of each position's anchor with a 3/T-wide region around
  a segment boundary, measured as a fraction of the anchor.
Every size (temporal scale, samples, hidden widths) is a parameter so tests can run small models.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from vclr.errors import VclrError


def boundary_matching_mask(temporal_scale: int, num_samples: int = 32, samples_per_bin: int = 3,
                           boundary_ratio: float = 0.5) -> np.ndarray:
    """The BM layer's sampling weights M[t, n, d, s] (float32, shape [T, N, T, T]).

    For the proposal starting at s with duration index d (ending at s + d), the sampled region is
    [s - (d+1)*ratio, s + d + (d+1)*ratio], cut into N bins of `samples_per_bin` evenly spaced points
    (N * samples_per_bin points from end to end); each point is linearly interpolated between its two
    neighbouring positions and each bin averages its points. Cells with s + d >= T are all zero.

    As in the reference (math.modf): a point p in (-1, 0) puts its whole weight on position 0 (the
    "down" neighbour is trunc(p) = 0 with weight 1 - frac(p) > 1, the "up" one ceil(p) = 0 with frac(p) < 0);
    points <= -1 and >= T contribute nothing, a point in (T-1, T) only 1 - frac(p) at position T-1.
    """
    T, N, P = temporal_scale, num_samples, samples_per_bin
    if T < 1 or N < 1 or P < 1:
        raise VclrError(f"BM mask needs positive sizes, got temporal_scale {T}, samples {N}, per bin {P}")
    start, duration = np.meshgrid(np.arange(T), np.arange(T), indexing="xy")  # [d, s] grids
    valid = start + duration < T
    center = (duration + 1).astype(np.float64)
    low = start - center * boundary_ratio
    high = start + duration + center * boundary_ratio
    step = (high - low) / (N * P - 1.0)
    points = low[..., None] + step[..., None] * np.arange(N * P)  # [d, s, N*P], float64 as the reference
    down, up = np.trunc(points), np.ceil(points)
    frac = points - down
    d_index, s_index, k_index = np.meshgrid(np.arange(T), np.arange(T), np.arange(N * P), indexing="ij")
    cell = (k_index // P * T + d_index) * T + s_index  # flat (n, d, s) of each point
    flats, weights = [], []
    for position, weight in ((down, 1.0 - frac), (up, frac)):
        keep = valid[..., None] & (position >= 0) & (position <= T - 1)
        flats.append(position[keep].astype(np.int64) * (N * T * T) + cell[keep])  # flat [t, n, d, s]
        weights.append(weight[keep])
    mask = np.bincount(np.concatenate(flats), weights=np.concatenate(weights), minlength=T * N * T * T)
    return (mask / P).astype(np.float32).reshape(T, N, T, T)


def bm_valid_mask(temporal_scale: int) -> torch.Tensor:
    """[d, s] = 1 where the proposal fits in the video (s + d < T), else 0."""
    index = torch.arange(temporal_scale)
    return (index[None, :] + index[:, None] < temporal_scale).float()


class BMN(nn.Module):
    """features [B, C, T] -> (confidence map [B, 2, T, T], start [B, T], end [B, T]), all in (0, 1)."""

    def __init__(self, feat_dim: int = 200, temporal_scale: int = 100, num_samples: int = 32,
                 samples_per_bin: int = 3, boundary_ratio: float = 0.5, hidden_1d: int = 256,
                 hidden_2d: int = 128, hidden_3d: int = 512, groups: int = 4):
        super().__init__()
        if feat_dim % groups or hidden_1d % groups:
            raise VclrError(f"BMN: feat_dim {feat_dim} and hidden_1d {hidden_1d} must be multiples of groups {groups}")
        self.feat_dim, self.temporal_scale, self.num_samples = feat_dim, temporal_scale, num_samples
        self.config = {"feat_dim": feat_dim, "temporal_scale": temporal_scale, "num_samples": num_samples,
                       "samples_per_bin": samples_per_bin, "boundary_ratio": boundary_ratio,
                       "hidden_1d": hidden_1d, "hidden_2d": hidden_2d, "hidden_3d": hidden_3d, "groups": groups}
        mask = boundary_matching_mask(temporal_scale, num_samples, samples_per_bin, boundary_ratio)
        # a buffer, not a parameter: fixed, rebuilt from the config, so not stored in checkpoints
        self.register_buffer("sample_mask", torch.from_numpy(mask).view(temporal_scale, -1), persistent=False)
        relu = lambda: nn.ReLU(inplace=True)
        self.base = nn.Sequential(
            nn.Conv1d(feat_dim, hidden_1d, 3, padding=1, groups=groups), relu(),
            nn.Conv1d(hidden_1d, hidden_1d, 3, padding=1, groups=groups), relu())
        self.start = nn.Sequential(
            nn.Conv1d(hidden_1d, hidden_1d, 3, padding=1, groups=groups), relu(),
            nn.Conv1d(hidden_1d, 1, 1), nn.Sigmoid())
        self.end = nn.Sequential(
            nn.Conv1d(hidden_1d, hidden_1d, 3, padding=1, groups=groups), relu(),
            nn.Conv1d(hidden_1d, 1, 1), nn.Sigmoid())
        self.proposal_1d = nn.Sequential(nn.Conv1d(hidden_1d, hidden_1d, 3, padding=1), relu())
        self.proposal_3d = nn.Sequential(nn.Conv3d(hidden_1d, hidden_3d, (num_samples, 1, 1)), relu())
        self.proposal_2d = nn.Sequential(
            nn.Conv2d(hidden_3d, hidden_2d, 1), relu(),
            nn.Conv2d(hidden_2d, hidden_2d, 3, padding=1), relu(),
            nn.Conv2d(hidden_2d, hidden_2d, 3, padding=1), relu(),
            nn.Conv2d(hidden_2d, 2, 1), nn.Sigmoid())

    def boundary_matching(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T] -> [B, C, N, T(d), T(s)]: every proposal's N sampled feature bins."""
        batch, channels, _ = x.shape
        T = self.temporal_scale
        return torch.matmul(x, self.sample_mask).view(batch, channels, self.num_samples, T, T)

    def forward(self, features: torch.Tensor):
        if features.ndim != 3 or features.shape[1:] != (self.feat_dim, self.temporal_scale):
            raise VclrError(f"BMN expects features [B, {self.feat_dim}, {self.temporal_scale}], "
                            f"got {list(features.shape)}")
        base = self.base(features)
        start = self.start(base).squeeze(1)
        end = self.end(base).squeeze(1)
        confidence = self.proposal_3d(self.boundary_matching(self.proposal_1d(base))).squeeze(2)
        return self.proposal_2d(confidence), start, end


# ----------------------------------------------------------------------------- labels


def _overlap_of_anchor(anchor_min, anchor_max, box_min, box_max):
    """|anchor ∩ box| / |anchor| for every anchor (rows) against every box (columns)."""
    inter = np.clip(np.minimum(anchor_max[:, None], box_max[None, :]) - np.maximum(anchor_min[:, None], box_min[None, :]),
                    0.0, None)
    return inter / (anchor_max - anchor_min)[:, None]


def bmn_labels(segments, temporal_scale: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(IoU map [T(d), T(s)], start [T], end [T]) float32 from segments [G, 2] given as fractions of the
    video (clipped to [0, 1] here).

    IoU map [d, s]: the best tIoU of the proposal [s/T, (s+d+1)/T] with any segment (also where the
    proposal runs past the video end; the loss masks those cells). Start/end label at position i: the
    largest fraction of the anchor [(i-0.5)/T, (i+1.5)/T] covered by [b - 1.5/T, b + 1.5/T] around a
    segment's start/end b. The anchors are 2/T wide, not 1/T, exactly as in the reference
    (`_temporal_anchors(-0.5, 1.5)`): the label is 1 where i/T <= b <= (i+1)/T and drops by 0.5 per 1/T
    beyond. `candidate_proposals` puts position i's boundary at i/T, so, as in the reference, the
    best-labelled positions round a boundary down (by 0.5/T on average). With T = 32 and the tiny
    stand-in's 1.5-3 s actions in ~8 s, this grid caps a BMN whose outputs equal its labels at
    AR@100 ~90, AUC ~88 (measured).
    """
    segments = np.asarray(segments, dtype=np.float64)
    if segments.size == 0:
        raise VclrError("bmn_labels: a video without ground-truth segments has no BMN training target")
    if segments.ndim != 2 or segments.shape[1] != 2 or not np.isfinite(segments).all():
        raise VclrError(f"bmn_labels: expected finite segments [G, 2], got shape {segments.shape}")
    segments = np.clip(segments, 0.0, 1.0)
    T = temporal_scale
    gap = 1.0 / T
    index = np.arange(T)
    # match map, [d, s] -> proposal [s*gap, s*gap + (d+1)*gap]
    tmin = np.broadcast_to(index[None, :] * gap, (T, T)).reshape(-1)
    tmax = (index[None, :] * gap + (index[:, None] + 1) * gap).reshape(-1)
    intersection = np.clip(np.minimum(tmax[:, None], segments[None, :, 1]) - np.maximum(tmin[:, None], segments[None, :, 0]),
                           0.0, None)
    union = (tmax - tmin)[:, None] + (segments[:, 1] - segments[:, 0])[None, :] - intersection
    iou_map = (intersection / union).max(1).reshape(T, T)
    anchor_min, anchor_max = gap * (index - 0.5), gap * (index + 1.5)
    half = 1.5 * gap  # the reference's 3 * gap wide boundary region
    start = _overlap_of_anchor(anchor_min, anchor_max, segments[:, 0] - half, segments[:, 0] + half).max(1)
    end = _overlap_of_anchor(anchor_min, anchor_max, segments[:, 1] - half, segments[:, 1] + half).max(1)
    return iou_map.astype(np.float32), start.astype(np.float32), end.astype(np.float32)


# ----------------------------------------------------------------------------- losses


def binary_logistic_loss(scores: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5,
                         ratio_range: tuple[float, float] = (1.05, 21.0), eps: float = 1e-5) -> torch.Tensor:
    """mmaction2's `binary_logistic_regression_loss`: positives (label > threshold) weighted 0.5*r,
    negatives 0.5*r/(r-1), r = entries / positives clamped to ratio_range (so neither side vanishes)."""
    scores, labels = scores.reshape(-1), labels.reshape(-1)
    positive = (labels > threshold).float()
    ratio = labels.numel() / positive.sum().clamp(min=1)
    ratio = ratio.clamp(*ratio_range)
    loss = 0.5 * ratio * positive * torch.log(scores + eps) \
        + 0.5 * ratio / (ratio - 1) * (1.0 - positive) * torch.log(1.0 - scores + eps)
    return -loss.mean()


def tem_loss(pred_start, pred_end, gt_start, gt_end) -> torch.Tensor:
    return binary_logistic_loss(pred_start, gt_start) + binary_logistic_loss(pred_end, gt_end)


def pem_reg_loss(pred: torch.Tensor, gt_iou: torch.Tensor, mask: torch.Tensor, high: float = 0.7,
                 low: float = 0.3, generator: torch.Generator | None = None) -> torch.Tensor:
    """Half the mean squared error over all high-IoU cells plus random samples of the middle and low
    cells, each kept with probability min(1, #high / #middle) and min(1, #high / #low): about as many
    of each. Low cells are the valid ones with 0 < IoU <= low (cells with IoU 0 never count). Zero when
    no cell is selected (the reference divides by zero there)."""
    high_mask = (gt_iou > high).float()
    middle_mask = ((gt_iou <= high) & (gt_iou > low)).float()
    low_mask = ((gt_iou <= low) & (gt_iou > 0.0)).float() * mask
    count_high = high_mask.sum()
    # drawn on the CPU (from `generator` when given, so a resumed run draws the same) and then moved
    draws = torch.rand((2, *gt_iou.shape), generator=generator).to(gt_iou.device)
    # the reference writes (mask * rand > 1 - r): once r > 1 (more high cells than middle ones) that
    # also selects every cell OUTSIDE the mask; here only the mask's cells can be selected
    keep_middle = middle_mask * (draws[0] > 1.0 - count_high / middle_mask.sum().clamp(min=1)).float()
    keep_low = low_mask * (draws[1] > 1.0 - count_high / low_mask.sum().clamp(min=1)).float()
    weights = high_mask + keep_middle + keep_low
    total = weights.sum()
    if total == 0:
        return (pred * 0).sum()
    return 0.5 * (((pred - gt_iou) * weights) ** 2).sum() / total


def pem_cls_loss(pred: torch.Tensor, gt_iou: torch.Tensor, mask: torch.Tensor, threshold: float = 0.9,
                 ratio_range: tuple[float, float] = (1.05, 21.0), eps: float = 1e-5) -> torch.Tensor:
    """Ratio-weighted binary logistic loss over the valid cells, positives IoU > threshold."""
    positive = (gt_iou > threshold).float()
    negative = (gt_iou <= threshold).float() * mask
    count_positive = positive.sum().clamp(min=1)
    entries = count_positive + negative.sum()
    ratio = (entries / count_positive).clamp(*ratio_range)
    loss = 0.5 * ratio * torch.log(pred + eps) * positive \
        + 0.5 * ratio / (ratio - 1) * torch.log(1.0 - pred + eps) * negative
    return -loss.sum() / entries


def bmn_loss(confidence: torch.Tensor, start: torch.Tensor, end: torch.Tensor, gt_iou: torch.Tensor,
             gt_start: torch.Tensor, gt_end: torch.Tensor, generator: torch.Generator | None = None) -> dict:
    """{"loss", "tem", "pem_reg", "pem_cls"}: loss = tem + 10 * pem_reg + pem_cls (the reference weights)."""
    mask = bm_valid_mask(confidence.shape[-1]).to(confidence.device)
    gt_iou = gt_iou * mask
    reg = pem_reg_loss(confidence[:, 0], gt_iou, mask, generator=generator)
    cls = pem_cls_loss(confidence[:, 1], gt_iou, mask)
    tem = tem_loss(start, end, gt_start, gt_end)
    return {"loss": tem + 10.0 * reg + cls, "tem": tem, "pem_reg": reg, "pem_cls": cls}


# ----------------------------------------------------------------------------- inference


def candidate_proposals(confidence: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segments [K, 2] as fractions of the video, scores [K]) of one video's outputs, as mmaction2's
    `BMN.forward_test`: starts are position 0, local maxima and positions above half the best start
    score (ends likewise, with the last position); every pair start s < end e = s + d + 1 <= T - 1 gets
    score start[s] * end[e] * cls[d, s] * reg[d, s]. As in the reference, the end index stays below T,
    so no proposal reaches the very end of the video (its last end is (T-1)/T).
    """
    T = len(start)
    if confidence.shape != (2, T, T) or end.shape != (T,):
        raise VclrError(f"candidate_proposals: expected confidence [2, {T}, {T}] and end [{T}], "
                        f"got {confidence.shape} and {end.shape}")

    def boundaries(scores: np.ndarray, edge: int) -> np.ndarray:
        chosen = np.zeros(T, dtype=bool)
        chosen[edge] = True
        if T > 2:
            middle = scores[1:-1]
            peak = (middle > scores[2:]) & (middle > scores[:-2])
            chosen[1:-1] |= peak | (middle > 0.5 * scores.max())
        return chosen

    start_ok, end_ok = boundaries(start, 0), boundaries(end, -1)
    d, s = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    e = s + d + 1
    keep = (e < T) & start_ok[s] & end_ok[np.minimum(e, T - 1)]
    d, s, e = d[keep], s[keep], e[keep]
    scores = start[s] * end[e] * confidence[1, d, s] * confidence[0, d, s]
    segments = np.stack([s / T, e / T], axis=1).astype(np.float64)
    return segments, scores.astype(np.float64)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def init_bmn(seed: int, **config) -> BMN:
    """A BMN with PyTorch's default initialisation drawn from `seed`; the caller's RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BMN(**config)


def default_groups(feat_dim: int, hidden_1d: int = 256) -> int:
    """The reference's 4 groups where the widths allow it (200 classes: yes), else their common divisor."""
    return math.gcd(math.gcd(feat_dim, 4), hidden_1d)
