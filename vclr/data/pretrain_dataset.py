"""The VCLR pretraining dataset: one training sample per found video of a split index.

Item i of epoch e is a pure function of (seed, e, i, rank): frame indices come from
`sample_video` and every augmentation draw from a torch.Generator seeded with `derive_seed`, so the
global RNGs are never reseeded and a resumed run sees exactly the samples an uninterrupted one would.

With `clip_frames` (3D backbones) each segment sample is a clip of T frames (vclr.data.sampling)
with ONE augmentation draw for all its frames; the entries get a time axis: [3,T,crop,crop].
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vclr.data.augment import augment_clips, augment_frames, frame_transform
from vclr.data.batch_augment import (
    AugmentParams,
    apply_clip_params,
    apply_params,
    broadcast_params,
    cat_params,
    decode_jpegs,
    draw_params,
)
from vclr.data.index import IndexRow, read_split
from vclr.data.packed import PackedFrames
from vclr.data.sampling import check_clip, derive_seed, sample_video
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
    With clip_frames = T: clips [3,T,crop,crop] in place of frames, one augmentation per clip.
    """

    def __init__(self, rows: list[IndexRow], frames: PackedFrames, *, crop_size: int, num_segments: int,
                 seed: int, rank: int = 0, clip_frames: int | None = None, clip_stride: int = 1):
        self.keys = [row.video_id for row in rows]
        missing = [key for key in self.keys if key not in frames]
        if missing:
            raise VclrError(f"{frames.frames_dir / 'manifest.json'}: videos of the index not packed: "
                            f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}")
        self.frames = frames
        self.transform = frame_transform(crop_size)
        self.num_segments = num_segments
        check_clip(clip_frames, clip_stride)
        self.clip_frames, self.clip_stride = clip_frames, clip_stride
        self.seed = seed
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose samples __getitem__ draws (call before iterating a DataLoader)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.keys)

    def sample(self, index: int):
        """The frames (or clips) item `index` of the current epoch is made of (vclr.data.sampling)."""
        key = self.keys[index]
        return sample_video(self.frames.num_frames(key), seed=self.seed, epoch=self.epoch, index=index,
                            rank=self.rank, num_segments=self.num_segments, video=key,
                            clip_frames=self.clip_frames, clip_stride=self.clip_stride)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        key = self.keys[index]
        sample = self.sample(index)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index, self.rank))
        if self.clip_frames is None:
            read = lambda indices: [self.frames.read_frame(key, i) for i in indices]  # noqa: E731
            augment = augment_frames
            query_samples, key_samples, xq_sample = sample.query_frames, sample.key_frames, [sample.xq_frame]
        else:  # a clip [T,3,H,W] per segment, one draw for all its frames
            read = lambda clips: [torch.stack([self.frames.read_frame(key, i) for i in clip])  # noqa: E731
                                  for clip in clips]
            augment = augment_clips
            query_samples, key_samples = sample.query_clips, sample.key_clips
            xq_sample = [query_samples[sample.anchor_segment]]
        # Temporal order, one draw each; then x1 (same frame as xq, new draw); then the key frames.
        query = augment(read(query_samples), self.transform, generator)
        x1 = augment(read(xq_sample), self.transform, generator)[0]
        keys = augment(read(key_samples), self.transform, generator)
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


class PretrainJpegDataset(PretrainDataset):
    """The batched-augmentation path (pretrain setting `augment: batched`): the same samples, but a
    worker only reads the 2K JPEGs (K query frames, then K key frames) and draws the 2K+1 views'
    augmentation parameters (K query views, x1, K key views) from the item's own generator; the
    main process decodes and augments a whole batch on the training device (`decode_and_augment`).

    The parameters are a pure function of (seed, epoch, index, rank) like every other draw of an
    item, so a resumed run needs no extra RNG state and the batch does not depend on the number of
    processes.

    Clips: the 2K clips' frames are read clip after clip (2K*T JPEGs); still 2K+1 parameter sets
    (one per clip view, the same draws as for frames), `source` is each view's first frame.
    """

    def __getitem__(self, index: int) -> dict:
        key = self.keys[index]
        sample = self.sample(index)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index, self.rank))
        k, frames_per_sample = self.num_segments, self.clip_frames or 1
        jpegs = [torch.frombuffer(bytearray(self.frames.read_jpeg(key, i)), dtype=torch.uint8)
                 for clip in (*sample.query_clips, *sample.key_clips) for i in clip]
        width, height = self.frames.size(key)
        first, second = sample.other_segments
        return {
            "jpegs": jpegs,
            "source": torch.tensor([*range(k), sample.anchor_segment, *range(k, 2 * k)]) * frames_per_sample,
            "params": draw_params(torch.tensor([[height, width]]).expand(2 * k + 1, 2), generator),
            # views of xq, x1, x2, x3, the query tuple, the key tuple (in presentation order)
            "layout": torch.tensor([sample.anchor_segment, k, first, second, *sample.query_order,
                                    *(k + 1 + i for i in sample.key_order)]),
            "order_label": torch.tensor(sample.order_label, dtype=torch.long),
            "where": f"{self.frames.frames_dir / 'manifest.json'}: video {key!r}",
        }


PARAM_PREFIX = "aug_"


def collate_jpeg_batch(items: list[dict]) -> dict:
    """PretrainJpegDataset items -> one batch of CPU tensors (pinned by a DataLoader with pin_memory):
    all JPEG bytes in one buffer with offsets, each view's source frame, parameters and layout
    renumbered batch-wide."""
    sizes = [len(jpeg) for item in items for jpeg in item["jpegs"]]
    frames_per_item = len(items[0]["jpegs"])
    views_per_item = len(items[0]["source"])
    return {
        "jpeg_bytes": torch.cat([jpeg for item in items for jpeg in item["jpegs"]]),
        "jpeg_offsets": torch.tensor([0, *np.cumsum(sizes).tolist()], dtype=torch.long),
        "source": torch.cat([item["source"] + i * frames_per_item for i, item in enumerate(items)]),
        "layout": torch.stack([item["layout"] + i * views_per_item for i, item in enumerate(items)]),
        "order_label": torch.stack([item["order_label"] for item in items]),
        **cat_params([item["params"] for item in items]).to_dict(PARAM_PREFIX),
        "where": [item["where"] for item in items],
    }


def decode_and_augment(batch: dict, device: torch.device, *, crop_size: int, num_segments: int,
                       dtype: torch.dtype = torch.float32, channels_last: bool = False,
                       clip_frames: int | None = None) -> dict[str, torch.Tensor]:
    """A collate_jpeg_batch batch -> the entries of vclr.models.vclr.BATCH_KEYS on `device`:
    JPEG decode (nvjpeg on CUDA) and vclr.data.batch_augment over all views at once.
    With clip_frames = T (the dataset's): each view is a clip [3,T,crop,crop], its one parameter set
    broadcast over its T frames."""
    data, offsets = batch["jpeg_bytes"], batch["jpeg_offsets"].tolist()
    frames = decode_jpegs([data[a:b] for a, b in itertools.pairwise(offsets)], device)
    params = AugmentParams.from_dict(batch, PARAM_PREFIX)
    frames_per_sample = clip_frames or 1
    # every frame of every view's clip (2D: the view's frame), with its view's parameters
    source = (batch["source"][:, None] + torch.arange(frames_per_sample)).flatten()
    frame_params = params if clip_frames is None else broadcast_params(params, frames_per_sample)
    # The crops were drawn for the manifest's frame size: a frame of another size is a packing error.
    for index, (top, left, height, width) in zip(source.tolist(), frame_params.boxes.tolist()):
        frame = frames[index]
        if top + height > frame.shape[-2] or left + width > frame.shape[-1]:
            video = batch["where"][index // (2 * num_segments * frames_per_sample)]
            raise VclrError(f"{video}: a frame decodes to {tuple(frame.shape[-2:])}, which does not hold the "
                            f"crop drawn for the manifest's size (the manifest's width/height are wrong)")
    if clip_frames is None:
        views = apply_params(frames, params, crop_size=crop_size, source=source, dtype=dtype,
                             channels_last=channels_last)
    else:
        views = apply_clip_params(frames, params, clip_frames=clip_frames, crop_size=crop_size, source=source,
                                  dtype=dtype, channels_last=channels_last)
    layout = batch["layout"].to(device, non_blocking=True)

    def tuple_views(start: int) -> torch.Tensor:
        return views[layout[:, start:start + num_segments].flatten()].unflatten(0, (layout.shape[0], num_segments))

    return {
        "xq": views[layout[:, 0]], "x1": views[layout[:, 1]], "x2": views[layout[:, 2]], "x3": views[layout[:, 3]],
        "query_tuple": tuple_views(4), "key_tuple": tuple_views(4 + num_segments),
        "order_label": batch["order_label"].to(device, non_blocking=True),
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


def epoch_loader(dataset, *, epoch: int, seed: int, batch_size: int, world_size: int, rank: int,
                 start_iteration: int, workers: int, generator: torch.Generator, pin_memory: bool,
                 collate_fn=None) -> DataLoader:
    """This process's DataLoader for `epoch` (a training loop's, pretraining or fine-tuning): its share
    of the seeded global batches from `start_iteration` on (rank_indices), `generator` seeding workers."""
    dataset.set_epoch(epoch)
    order = epoch_order(len(dataset), seed=seed, epoch=epoch)
    indices = rank_indices(order, batch_size=batch_size, world_size=world_size, rank=rank,
                           start_iteration=start_iteration)
    return DataLoader(dataset, batch_size=batch_size // world_size, sampler=indices, drop_last=True,
                      num_workers=workers, generator=generator, pin_memory=pin_memory, collate_fn=collate_fn)
