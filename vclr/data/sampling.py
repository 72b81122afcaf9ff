"""Which frames one training video contributes to a VCLR step (spec/method.md, "Sampling").

Pure: returns frame indices (0-based, as PackedFrames.read_frame takes them) and the order-task
permutations; the dataset reads and augments the frames. Every draw comes from a local numpy
Generator seeded from (seed, epoch, video index, rank), so a sample is reproducible and the global
RNGs are never touched (the public implementation reseeded them per sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vclr.errors import VclrError

# Order-task label: 0 = neither tuple shuffled, 1 = query only, 2 = key only, 3 = both.
ORDER_LABELS = {(False, False): 0, (True, False): 1, (False, True): 2, (True, True): 3}


@dataclass(frozen=True)
class VideoSample:
    """One video's frames. `*_frames` are in temporal order (one per segment); `*_order` is the
    position permutation the tuple is presented in (identity when not shuffled)."""

    key_frames: tuple[int, ...]
    query_frames: tuple[int, ...]
    query_order: tuple[int, ...]
    key_order: tuple[int, ...]
    order_label: int
    anchor_segment: int  # the segment (0 or K-1) whose query frame is xq and, re-augmented, x1
    other_segments: tuple[int, int]  # segments whose query frames are x2 and x3

    @property
    def query_tuple(self) -> tuple[int, ...]:
        """Query-tuple frame indices in presentation order (after the order-task shuffle)."""
        return tuple(self.query_frames[position] for position in self.query_order)

    @property
    def key_tuple(self) -> tuple[int, ...]:
        return tuple(self.key_frames[position] for position in self.key_order)

    @property
    def xq_frame(self) -> int:
        """The frame of xq and x1 (x1 = the same frame, augmented again)."""
        return self.query_frames[self.anchor_segment]

    @property
    def x2_frame(self) -> int:
        return self.query_frames[self.other_segments[0]]

    @property
    def x3_frame(self) -> int:
        return self.query_frames[self.other_segments[1]]


def derive_seed(seed: int, epoch: int, index: int, rank: int = 0) -> int:
    """A 63-bit seed that is a pure function of (seed, epoch, video index, rank), e.g. for the
    torch.Generator of the augmentation."""
    state = np.random.SeedSequence([seed, epoch, index, rank]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def segment_bounds(num_frames: int, num_segments: int) -> list[tuple[int, int]]:
    """[start, stop) of K contiguous segments of length N//K covering 0..N-1; the last takes the remainder."""
    length = num_frames // num_segments
    return [(k * length, num_frames if k == num_segments - 1 else (k + 1) * length) for k in range(num_segments)]


def shuffled_order(rng: np.random.Generator, size: int) -> tuple[int, ...]:
    """A uniformly drawn permutation of range(size) that is neither the forward nor the reversed order."""
    forward, backward = tuple(range(size)), tuple(reversed(range(size)))
    while True:
        order = tuple(int(i) for i in rng.permutation(size))
        if order != forward and order != backward:
            return order


def sample_video(num_frames: int, *, seed: int, epoch: int, index: int, rank: int = 0,
                 num_segments: int = 3, video: str = "?") -> VideoSample:
    """Draw one training sample of a video with `num_frames` frames (`video` names it in errors).

    K segments; 2 distinct frames per segment (first draw -> key tuple, second -> query tuple);
    anchor segment 0 or K-1 with p=0.5; query and key tuples shuffled independently with p=0.5.
    x2, x3 are the query frames of the other two segments among {0, K//2, K-1} (for K = 3, as in
    the paper: simply the other two segments).
    """
    if num_segments < 3:
        raise VclrError(f"num_segments must be >= 3 (the order task and the frame views need 3), got {num_segments}")
    if num_frames < 2 * num_segments:
        raise VclrError(
            f"video {video!r} has {num_frames} frames; sampling needs at least {2 * num_segments} "
            f"(2 distinct frames in each of {num_segments} segments)"
        )
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, index, rank])))
    key_frames, query_frames = [], []
    for start, stop in segment_bounds(num_frames, num_segments):
        first, second = rng.choice(stop - start, size=2, replace=False)
        key_frames.append(start + int(first))
        query_frames.append(start + int(second))
    anchor = 0 if rng.random() < 0.5 else num_segments - 1
    others = tuple(s for s in sorted({0, num_segments // 2, num_segments - 1}) if s != anchor)
    identity = tuple(range(num_segments))
    query_shuffled = bool(rng.random() < 0.5)
    key_shuffled = bool(rng.random() < 0.5)
    return VideoSample(
        key_frames=tuple(key_frames),
        query_frames=tuple(query_frames),
        query_order=shuffled_order(rng, num_segments) if query_shuffled else identity,
        key_order=shuffled_order(rng, num_segments) if key_shuffled else identity,
        order_label=ORDER_LABELS[(query_shuffled, key_shuffled)],
        anchor_segment=anchor,
        other_segments=others,
    )
