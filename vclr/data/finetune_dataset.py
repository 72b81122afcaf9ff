"""Fine-tuning data (spec/protocols.md, "Fine-tuning"): TSN segment sampling, the training
augmentation and the multi-crop test views, over packed frames.

Training item i of epoch e is a pure function of (seed, e, i, rank): one frame per segment and every
augmentation draw come from a local numpy Generator (as vclr.data.sampling does), so the global RNGs
are never touched and a resumed run sees exactly the samples an uninterrupted one would. The same
crop and flip apply to every frame of a clip (as in TSN/mmaction2). Geometry follows mmaction2 0.11,
the authors' stack: Resize(short side S) -> RandomResizedCrop (area 0.08-1, ratio 3/4-4/3) or
MultiScaleCrop (scales 1/.875/.75/.66, max w/h scale gap 1, 13 fixed offsets) -> resize to the crop
-> flip p=0.5 (not for SSv2); test: N frames at segment centres, centre / three / ten crop.

A 3D backbone's classifier takes a clip per segment instead of a frame (clip_frames frames every
clip_stride frames): training draws each segment's clip start uniformly among the starts that keep
the clip inside its segment; the test centres each clip on its segment centre. Items get a time
axis ([K,3,T,crop,crop] / [V,N,3,T,crop,crop]); the geometry is the same for every frame.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from vclr.data.augment import IMAGENET_MEAN, IMAGENET_STD
from vclr.data.index import IndexRow
from vclr.data.packed import PackedFrames
from vclr.data.sampling import check_clip, clip_frame_indices, clip_span, segment_bounds
from vclr.errors import VclrError

AUGMENTATIONS = ("resized_crop", "multi_scale")
TEST_VIEWS = {"centre": 1, "three": 3, "ten": 10}
MULTI_SCALES = (1.0, 0.875, 0.75, 0.66)

Box = tuple[int, int, int, int]  # top, left, height, width


@dataclass(frozen=True)
class Clip:
    """Frames [start, stop) of a video, with the label the model must predict."""

    video_id: str
    label: int
    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start


def read_classes(index_dir: str | os.PathLike) -> list[str]:
    """Class names by label from <index_dir>/classes.csv (columns index,name; labels 0..C-1)."""
    path = Path(index_dir) / "classes.csv"
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise VclrError(f"{path}: class list not found (run `vclr data index`)") from None
    if not rows or rows[0] != ["index", "name"]:
        raise VclrError(f"{path}:1: expected header index,name")
    names = []
    for line, fields in enumerate(rows[1:], start=2):
        if len(fields) != 2 or fields[0] != str(len(names)):
            raise VclrError(f"{path}:{line}: expected '{len(names)},<name>'")
        names.append(fields[1])
    if not names:
        raise VclrError(f"{path}: no classes")
    return names


def video_clips(rows: Sequence[IndexRow], frames: PackedFrames, index_file: str | os.PathLike, *,
                trimmed: bool = False) -> list[Clip]:
    """Clips of the found, labelled rows of a split index (other statuses are skipped).

    trimmed=False: one clip per video (all its frames, the video's label). trimmed=True (ActivityNet's
    "trimmed action clips"): one clip per annotated segment, its frames [floor(start/duration * N),
    ceil(end/duration * N)) of the video's N frames, with the segment's label.
    """
    clips = []
    for row in rows:
        if row.status != "found":
            continue
        where = f"{index_file}: video {row.video_id!r}"
        if row.video_id not in frames:
            raise VclrError(f"{where} is not in {frames.frames_dir / 'manifest.json'}")
        count = frames.num_frames(row.video_id)
        if not trimmed:
            if row.label < 0:
                raise VclrError(f"{where} has no label (-1): this split cannot be used for fine-tuning")
            clips.append(Clip(row.video_id, row.label, 0, count))
            continue
        if not row.duration or not row.segments:
            raise VclrError(f"{where}: trimmed clips need a duration and annotated segments")
        for start_s, end_s, label in row.segments:
            start = min(count, max(0, math.floor(start_s / row.duration * count)))
            stop = min(count, max(start, math.ceil(end_s / row.duration * count)))
            clips.append(Clip(row.video_id, label, start, stop))
    if not clips:
        raise VclrError(f"{index_file}: no found, labelled video to fine-tune or test on")
    return clips


def check_clip_lengths(clips: Sequence[Clip], minimum: int, index_file: str | os.PathLike, what: str) -> None:
    """VclrError naming the index file and the (first few) clips shorter than `minimum` frames."""
    short = [clip for clip in clips if clip.length < minimum]
    if short:
        listed = ", ".join(f"{clip.video_id!r} ({clip.length} frames)" for clip in short[:4])
        raise VclrError(f"{index_file}: {len(short)} video(s) shorter than the {minimum} {what}: "
                        f"{listed}{', ...' if len(short) > 4 else ''}")


def item_rng(seed: int, epoch: int, index: int, rank: int = 0) -> np.random.Generator:
    """The local generator of one training item. The trailing tag keeps it apart from pretraining's
    streams (vclr.data.sampling) of the same (seed, epoch, index, rank)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, index, rank, 7])))


def train_frame_indices(length: int, num_segments: int, rng: np.random.Generator,
                        clip_frames: int | None = None, clip_stride: int = 1) -> list[int]:
    """TSN's training sampling: one uniformly drawn frame in each of K contiguous segments
    (vclr.data.sampling.segment_bounds); 0-based indices into the clip.

    With clip_frames = T: one clip per segment, its start drawn uniformly among the starts that keep
    it inside the segment (the segment start if none does; frames past the segment's end repeat its
    last frame); K*T indices, segment after segment."""
    if length < num_segments:
        raise VclrError(f"a clip of {length} frames cannot give {num_segments} segments")
    bounds = segment_bounds(length, num_segments)
    if clip_frames is None:
        return [start + int(rng.integers(stop - start)) for start, stop in bounds]
    span = clip_span(clip_frames, clip_stride)
    return [i for start, stop in bounds
            for i in clip_frame_indices(start + int(rng.integers(max(1, stop - start - span + 1))), clip_frames,
                                        clip_stride, stop)]


def eval_frame_indices(length: int, num_frames: int, clip_frames: int | None = None,
                       clip_stride: int = 1) -> list[int]:
    """TSN's test sampling: the centre frame of each of `num_frames` equal segments (mmaction2's
    SampleFrames in test mode); a clip shorter than num_frames repeats frames.

    With clip_frames = T: `num_frames` clips, each centred on its segment's centre frame and moved
    inside the video where it would reach past an end (frames past the last repeat it); N*T indices."""
    if length < 1 or num_frames < 1:
        raise VclrError(f"need a clip of >= 1 frame and >= 1 test frame, got {length} and {num_frames}")
    interval = length / num_frames
    centres = [min(length - 1, int(interval * k + interval / 2)) for k in range(num_frames)]
    if clip_frames is None:
        return centres
    span = clip_span(clip_frames, clip_stride)
    starts = [min(max(0, centre - (span - 1) // 2), max(0, length - span)) for centre in centres]
    return [i for start in starts for i in clip_frame_indices(start, clip_frames, clip_stride, length)]


def to_clips(views: torch.Tensor, clip_frames: int | None) -> torch.Tensor:
    """[..., N*T, 3, H, W] frames, clip after clip -> [..., N, 3, T, H, W] (a 3D backbone's input);
    unchanged without clip_frames."""
    if clip_frames is None:
        return views
    return views.unflatten(-4, (-1, clip_frames)).transpose(-4, -3).contiguous()


# ------------------------------------------------------------------------------------- geometry


def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) after resizing so the short side is `short_side`, keeping the aspect ratio."""
    scale = short_side / min(height, width)
    return max(short_side, round(height * scale)), max(short_side, round(width * scale))


def random_resized_box(height: int, width: int, rng: np.random.Generator, scale=(0.08, 1.0),
                       ratio=(3 / 4, 4 / 3)) -> Box:
    """torchvision/mmaction2 RandomResizedCrop's box: 10 tries of (area, log-uniform aspect), then
    the centre crop of the clamped aspect ratio."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def multi_scale_box(height: int, width: int, rng: np.random.Generator, scales=MULTI_SCALES,
                    max_wh_scale_gap: int = 1) -> Box:
    """mmaction2 MultiScaleCrop (random_crop=False, num_fixed_crops=13): crop sides from
    short_side * scales, width and height at most `max_wh_scale_gap` scale steps apart, placed at
    one of 13 fixed offsets (corners, centre, edge midpoints, quarter points)."""
    base = min(height, width)
    sizes = [int(base * s) for s in scales]
    candidates = [(w, h) for i, h in enumerate(sizes) for j, w in enumerate(sizes) if abs(i - j) <= max_wh_scale_gap]
    w, h = candidates[int(rng.integers(len(candidates)))]
    ws, hs = (width - w) // 4, (height - h) // 4
    offsets = [(0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs),
               (0, 2 * hs), (4 * ws, 2 * hs), (2 * ws, 4 * hs), (2 * ws, 0),
               (ws, hs), (3 * ws, hs), (ws, 3 * hs), (3 * ws, 3 * hs)]
    x, y = offsets[int(rng.integers(len(offsets)))]
    return y, x, h, w


def view_boxes(height: int, width: int, crop: int, views: str) -> list[tuple[Box, bool]]:
    """Test views as (box, flipped): 'centre' one centre crop; 'three' (mmaction2 ThreeCrop) three
    crops along the long side (start, end, middle), centred on the short side; 'ten' (TenCrop) the
    four corners and the centre, then the same five flipped."""
    if crop > min(height, width):
        raise VclrError(f"test crop {crop} is larger than the {width}x{height} frame")
    if views == "centre":
        return [(((height - crop) // 2, (width - crop) // 2, crop, crop), False)]
    if views == "three":
        top, left = (height - crop) // 2, (width - crop) // 2
        if width >= height:
            step = (width - crop) // 2
            return [((top, x, crop, crop), False) for x in (0, 2 * step, step)]
        step = (height - crop) // 2
        return [((y, left, crop, crop), False) for y in (0, 2 * step, step)]
    if views == "ten":
        ws, hs = (width - crop) // 4, (height - crop) // 4
        corners = [(0, 0), (0, 4 * ws), (4 * hs, 0), (4 * hs, 4 * ws), (2 * hs, 2 * ws)]
        return [((y, x, crop, crop), flip) for flip in (False, True) for y, x in corners]
    raise VclrError(f"test views {views!r} not one of {', '.join(TEST_VIEWS)}")


def _to_float(frames: torch.Tensor, short_side: int) -> torch.Tensor:
    """uint8 [T,3,H,W] -> float [T,3,H',W'] in [0,1], short side resized to `short_side`."""
    frames = frames.float().div_(255)
    size = short_side_size(*frames.shape[-2:], short_side)
    if size != tuple(frames.shape[-2:]):
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)
    return frames


def _normalise(frames: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (frames - mean) / std


def _crop(frames: torch.Tensor, box: Box, size: int | None = None, flip: bool = False) -> torch.Tensor:
    top, left, h, w = box
    out = frames[..., top:top + h, left:left + w]
    if size is not None and (h, w) != (size, size):
        out = F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.flip(-1) if flip else out


def train_views(frames: torch.Tensor, rng: np.random.Generator, *, short_side: int, crop: int,
                augmentation: str, flip: bool) -> torch.Tensor:
    """uint8 [T,3,H,W] -> normalised float32 [T,3,crop,crop]; one box (and flip) for all T frames."""
    frames = _to_float(frames, short_side)
    height, width = frames.shape[-2:]
    if augmentation == "resized_crop":
        box = random_resized_box(height, width, rng)
    elif augmentation == "multi_scale":
        box = multi_scale_box(height, width, rng)
    else:
        raise VclrError(f"augmentation {augmentation!r} not one of {', '.join(AUGMENTATIONS)}")
    flipped = bool(flip and rng.random() < 0.5)
    return _normalise(_crop(frames, box, crop, flipped))


def eval_views(frames: torch.Tensor, *, short_side: int, crop: int, views: str) -> torch.Tensor:
    """uint8 [T,3,H,W] -> normalised float32 [V,T,3,crop,crop] (V = 1, 3 or 10 views)."""
    frames = _to_float(frames, short_side)
    return torch.stack([_normalise(_crop(frames, box, flip=flipped))
                        for box, flipped in view_boxes(*frames.shape[-2:], crop, views)])


# ------------------------------------------------------------------------------------- datasets


class FinetuneTrainDataset(Dataset):
    """(clip [K,3,crop,crop] float32, label) per training clip; call set_epoch before each epoch.
    With clip_frames = T (a 3D backbone): [K,3,T,crop,crop], one T-frame clip per segment.

    rank stays 0 under DDP (as in pretraining), so a sample does not depend on the process count.
    """

    def __init__(self, clips: Sequence[Clip], frames: PackedFrames, index_file: str | os.PathLike, *,
                 num_segments: int, short_side: int, crop: int, augmentation: str, flip: bool, seed: int,
                 rank: int = 0, clip_frames: int | None = None, clip_stride: int = 1):
        check_clip_lengths(clips, num_segments, index_file, "training segments")
        check_clip(clip_frames, clip_stride, "fine-tuning")
        self.clip_frames, self.clip_stride = clip_frames, clip_stride
        if augmentation not in AUGMENTATIONS:
            raise VclrError(f"augmentation {augmentation!r} not one of {', '.join(AUGMENTATIONS)}")
        self.clips, self.frames = list(clips), frames
        self.num_segments, self.short_side, self.crop = num_segments, short_side, crop
        self.augmentation, self.flip, self.seed, self.rank = augmentation, flip, seed, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.clips)

    def frame_indices(self, index: int, rng: np.random.Generator) -> list[int]:
        clip = self.clips[index]
        return [clip.start + i for i in train_frame_indices(clip.length, self.num_segments, rng, self.clip_frames,
                                                            self.clip_stride)]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        clip = self.clips[index]
        rng = item_rng(self.seed, self.epoch, index, self.rank)
        frames = torch.stack([self.frames.read_frame(clip.video_id, i) for i in self.frame_indices(index, rng)])
        views = train_views(frames, rng, short_side=self.short_side, crop=self.crop,
                            augmentation=self.augmentation, flip=self.flip)
        return to_clips(views, self.clip_frames), clip.label


class FinetuneTestDataset(Dataset):
    """(views [V,T,3,crop,crop] float32, label, clip index) per test clip: T frames at segment
    centres, V crops (centre / three / ten). With clip_frames (a 3D backbone): [V,N,3,clip_frames,crop,crop],
    N = num_frames clips centred on the segment centres."""

    def __init__(self, clips: Sequence[Clip], frames: PackedFrames, index_file: str | os.PathLike, *,
                 num_frames: int, short_side: int, crop: int, views: str, clip_frames: int | None = None,
                 clip_stride: int = 1):
        check_clip(clip_frames, clip_stride, "fine-tuning test")
        self.clip_frames, self.clip_stride = clip_frames, clip_stride
        if views not in TEST_VIEWS:
            raise VclrError(f"test views {views!r} not one of {', '.join(TEST_VIEWS)}")
        if crop > short_side:
            raise VclrError(f"test crop {crop} is larger than the short side {short_side} it is cut from")
        check_clip_lengths(clips, 1, index_file, "frame a test clip needs")
        self.clips, self.frames = list(clips), frames
        self.num_frames, self.short_side, self.crop, self.views = num_frames, short_side, crop, views

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        clip = self.clips[index]
        indices = [clip.start + i for i in eval_frame_indices(clip.length, self.num_frames, self.clip_frames,
                                                              self.clip_stride)]
        frames = torch.stack([self.frames.read_frame(clip.video_id, i) for i in indices])
        views = eval_views(frames, short_side=self.short_side, crop=self.crop, views=self.views)
        return to_clips(views, self.clip_frames), clip.label, index
