"""The VCLR pretraining dataset: one training sample per found video of a split index.

Item i of epoch e is a pure function of (seed, e, i, rank): frame indices come from
`sample_video` and every augmentation draw from a torch.Generator seeded with `derive_seed`, so the
global RNGs are never reseeded and a resumed run sees exactly the samples an uninterrupted one would.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from vclr.data.augment import augment_frames, frame_transform
from vclr.data.index import IndexRow, read_split
from vclr.data.packed import PackedFrames
from vclr.data.sampling import derive_seed, sample_video
from vclr.errors import VclrError


def found_rows(index_csv: str | os.PathLike) -> list[IndexRow]:
    """The rows of a split index whose frames were extracted (status == "found")."""
    rows = [row for row in read_split(index_csv) if row.status == "found"]
    if not rows:
        raise VclrError(f"{index_csv}: no video with status 'found' (nothing to train on)")
    return rows


class PretrainDataset(Dataset):
    """Found videos of a split -> the batch entries VclrModel expects (vclr.models.vclr.BATCH_KEYS).

    Per video: xq, x1, x2, x3 [3,crop,crop]; query_tuple, key_tuple [K,3,crop,crop]; order_label.
    xq, x2, x3 are the very tensors of the query tuple (one augmentation per query frame); x1 is a
    fresh augmentation of xq's frame; the key tuple's frames are augmented independently.
    """

    def __init__(self, rows: list[IndexRow], frames: PackedFrames, *, crop_size: int, num_segments: int,
                 seed: int, rank: int = 0):
        self.keys = [row.video_id for row in rows]
        missing = [key for key in self.keys if key not in frames]
        if missing:
            raise VclrError(f"{frames.frames_dir / 'manifest.json'}: videos of the index not packed: "
                            f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}")
        self.frames = frames
        self.transform = frame_transform(crop_size)
        self.num_segments = num_segments
        self.seed = seed
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose samples __getitem__ draws (call before iterating a DataLoader)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        key = self.keys[index]
        sample = sample_video(self.frames.num_frames(key), seed=self.seed, epoch=self.epoch, index=index,
                              rank=self.rank, num_segments=self.num_segments, video=key)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index, self.rank))
        read = lambda indices: [self.frames.read_frame(key, i) for i in indices]  # noqa: E731
        # Temporal order, one draw each; then x1 (same frame as xq, new draw); then the key frames.
        query = augment_frames(read(sample.query_frames), self.transform, generator)
        x1 = augment_frames(read([sample.xq_frame]), self.transform, generator)[0]
        keys = augment_frames(read(sample.key_frames), self.transform, generator)
        first, second = sample.other_segments
        return {
            "xq": query[sample.anchor_segment],
            "x1": x1,
            "x2": query[first],
            "x3": query[second],
            "query_tuple": query[list(sample.query_order)],
            "key_tuple": keys[list(sample.key_order)],
            "order_label": torch.tensor(sample.order_label, dtype=torch.long),
        }


def epoch_order(num_videos: int, *, seed: int, epoch: int, rank: int = 0) -> list[int]:
    """The order videos are visited in during `epoch`: a seeded permutation (resumable mid-epoch).

    Its seed sequence has 5 entries, so it never coincides with sample_video's 4-entry streams.
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, rank, 0, 1])))
    return [int(i) for i in rng.permutation(num_videos)]


def rank_indices(order: list[int], *, batch_size: int, world_size: int, rank: int,
                 start_iteration: int = 0) -> list[int]:
    """The videos process `rank` loads, in order, from global batch `start_iteration` on.

    Global batch i is order[i*B:(i+1)*B] (B = batch_size, the global batch; the incomplete last
    batch is dropped); rank r loads its contiguous share order[i*B + r*b : i*B + (r+1)*b],
    b = B / world_size. So the per-rank batches gathered in rank order are the one-process batch
    (keys reach the queues in the same order whatever the number of processes).
    """
    if batch_size % world_size:
        raise VclrError(f"global batch {batch_size} is not divisible by the {world_size} processes")
    share = batch_size // world_size
    return [order[i * batch_size + rank * share + j]
            for i in range(start_iteration, len(order) // batch_size) for j in range(share)]
