"""Which frames one training video contributes to a VCLR step (spec/method.md, "Sampling").

Pure: returns frame indices (0-based, as PackedFrames.read_frame takes them) and the order-task
permutations; the dataset reads and augments the frames. Every draw comes from a local numpy
Generator seeded from (seed, epoch, video index, rank), so a sample is reproducible and the global
RNGs are never touched (the public implementation reseeded them per sample).

For a 2D backbone a segment contributes frames; for a 3D backbone clips of T frames, one every
`clip_stride` frames, drawn by the same rule with "frame" read as "clip start" (2 distinct starts
per segment, each clip kept inside its segment).
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
    position permutation the tuple is presented in (identity when not shuffled).

    A clip sample (clip_frames set) draws the same way, `*_frames` being each segment's clip START;
    `key_clips` / `query_clips` give the clips' frames (`segment_stops` bounds each clip)."""

    key_frames: tuple[int, ...]
    query_frames: tuple[int, ...]
    query_order: tuple[int, ...]
    key_order: tuple[int, ...]
    order_label: int
    anchor_segment: int  # the segment (0 or K-1) whose query frame is xq and, re-augmented, x1
    other_segments: tuple[int, int]  # segments whose query frames are x2 and x3
    clip_frames: int | None = None  # None: frame samples (2D backbone)
    clip_stride: int = 1
    segment_stops: tuple[int, ...] = ()

    def _clips(self, starts: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        if self.clip_frames is None:
            return tuple((start,) for start in starts)
        return tuple(tuple(clip_frame_indices(start, self.clip_frames, self.clip_stride, stop))
                     for start, stop in zip(starts, self.segment_stops, strict=True))

    @property
    def query_clips(self) -> tuple[tuple[int, ...], ...]:
        """Each segment's query sample as frame indices, in temporal order (1 frame for 2D)."""
        return self._clips(self.query_frames)

    @property
    def key_clips(self) -> tuple[tuple[int, ...], ...]:
        return self._clips(self.key_frames)

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


def clip_frame_indices(start: int, clip_frames: int, clip_stride: int, stop: int) -> list[int]:
    """Frames start, start + s, ..., start + (T-1) s, each clamped to stop - 1 (a clip that does not
    fit before `stop` repeats its last available frame rather than reaching past it)."""
    return [min(start + j * clip_stride, stop - 1) for j in range(clip_frames)]


def clip_span(clip_frames: int, clip_stride: int) -> int:
    """Frames a clip covers from its first to its last frame."""
    return (clip_frames - 1) * clip_stride + 1


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


def clip_start_count(length: int, clip_frames: int | None, clip_stride: int = 1) -> int:
    """Positions a segment sample may start at in a segment of `length` frames: every frame for a
    2D sample; for a clip every start that keeps it inside the segment, but at least 2 (the two
    distinct draws; a clip longer than its segment repeats the segment's last frame)."""
    if clip_frames is None:
        return length
    return max(2, length - clip_span(clip_frames, clip_stride) + 1)


def check_clip(clip_frames: int | None, clip_stride: int, where: str = "clip") -> None:
    if clip_frames is not None and (clip_frames < 1 or clip_stride < 1):
        raise VclrError(f"{where}: clip_frames and clip_stride must be >= 1, got {clip_frames} and {clip_stride}")


def sample_video(num_frames: int, *, seed: int, epoch: int, index: int, rank: int = 0,
                 num_segments: int = 3, video: str = "?", clip_frames: int | None = None,
                 clip_stride: int = 1) -> VideoSample:
    """Draw one training sample of a video with `num_frames` frames (`video` names it in errors).

    K segments; 2 distinct frames per segment (first draw -> key tuple, second -> query tuple);
    anchor segment 0 or K-1 with p=0.5; query and key tuples shuffled independently with p=0.5.
    x2, x3 are the query frames of the other two segments among {0, K//2, K-1} (for K = 3, as in
    the paper: simply the other two segments).

    With `clip_frames` (3D backbones) the 2 draws per segment are distinct clip starts among
    clip_start_count(...) positions; everything else, the random stream included, is the same.
    """
    check_clip(clip_frames, clip_stride)
    if num_segments < 3:
        raise VclrError(f"num_segments must be >= 3 (the order task and the frame views need 3), got {num_segments}")
    if num_frames < 2 * num_segments:
        raise VclrError(
            f"video {video!r} has {num_frames} frames; sampling needs at least {2 * num_segments} "
            f"(2 distinct frames in each of {num_segments} segments)"
        )
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, index, rank])))
    key_frames, query_frames = [], []
    bounds = segment_bounds(num_frames, num_segments)
    for start, stop in bounds:
        first, second = rng.choice(clip_start_count(stop - start, clip_frames, clip_stride), size=2, replace=False)
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
        clip_frames=clip_frames,
        clip_stride=clip_stride if clip_frames is not None else 1,
        segment_stops=tuple(stop for _, stop in bounds) if clip_frames is not None else (),
    )
