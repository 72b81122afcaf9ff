"""PyTorch access to packed frames: a Dataset over the found rows of a split index."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from vclr.data.packed import PackedFrames
from vclr.errors import VclrError


def uniform_frame_indices(num_frames: int, n: int) -> list[int]:
    """n frame indices spread evenly over [0, num_frames-1]: the evaluation protocol's 30 frames."""
    if num_frames < 1 or n < 1:
        raise ValueError(f"need num_frames >= 1 and n >= 1, got {num_frames} and {n}")
    return [int(i) for i in np.round(np.linspace(0, num_frames - 1, n))]


class VideoFrameDataset(torch.utils.data.Dataset):
    """(frames uint8 [T,3,H,W], label, video_id) for each row with status "found".

    frame_indices_fn(num_frames, row_index) picks the frames, so the same class serves training
    (random clips) and evaluation (uniform frames). `transform` gets the [T,3,H,W] tensor.
    """

    def __init__(
        self,
        index_rows: Sequence,
        frames: PackedFrames,
        frame_indices_fn: Callable[[int, int], Sequence[int]],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.rows = [row for row in index_rows if row.status == "found"]
        self.frames = frames
        self.frame_indices_fn = frame_indices_fn
        self.transform = transform
        for row in self.rows:
            if row.video_id not in frames:
                raise VclrError(
                    f"{frames.frames_dir / 'manifest.json'}: no video {row.video_id!r} that the index lists as found"
                )
            if row.frames and row.frames != frames.num_frames(row.video_id):
                raise VclrError(
                    f"{frames.frames_dir / 'manifest.json'}: video {row.video_id!r} has "
                    f"{frames.num_frames(row.video_id)} frames, the index says {row.frames} (stale index?)"
                )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, row_index: int):
        row = self.rows[row_index]
        indices = self.frame_indices_fn(self.frames.num_frames(row.video_id), row_index)
        clip = torch.stack(
            [self.frames.read_frame(row.video_id, int(i)) for i in indices]
        )
        if self.transform is not None:
            clip = self.transform(clip)
        return clip, row.label, row.video_id
