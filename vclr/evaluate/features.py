"""Frozen-backbone video features (the linear-probe and retrieval protocol's extraction).

Per video: `num_frames` frames at uniform_frame_indices, each centre-cropped to `crop` with no resize
(a frame whose short side is under `crop` is first resized up so the short side equals it), ImageNet
normalised, through the backbone trunk (global-average-pooled feature, no head); the frame features
are averaged. Saved as one .npz with the provenance needed to tell two feature files apart.

A 3D backbone takes clips: `num_frames` clips per video (clip_frames frames every clip_stride frames,
clip starts spread uniformly over the video, frames past its end repeat the last one), each clip
through the trunk, the clip features averaged; the crop and normalisation are the same.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from vclr.data.augment import IMAGENET_MEAN, IMAGENET_STD
from vclr.data.batch_augment import decode_jpegs, eval_crops_sliced
from vclr.data.device_prefetch import DevicePrefetcher
from vclr.data.frames import VideoFrameDataset, uniform_frame_indices
from vclr.data.index import read_split
from vclr.data.packed import PackedFrames
from vclr.data.sampling import check_clip, clip_frame_indices, clip_span
from vclr.errors import VclrError
from vclr.evaluate.feature_files import file_sha256, save_features
from vclr.models.backbones import (
    ALL_BACKBONES,
    build_backbone,
    copy_checked,
    is_video_backbone,
    read_checkpoint_file,
)
from vclr.models.video3d import DEFAULT_CLIP_FRAMES, DEFAULT_CLIP_STRIDE
from vclr.train.checkpoint import CHECKPOINT_FORMAT
from vclr.train.distributed import resolve_device

QUERY_BACKBONE_PREFIX = "model.backbone."  # the query encoder's trunk inside a pretraining checkpoint


def load_backbone(path_or_checkpoint: str | os.PathLike, name: str, seed: int = 0) -> nn.Module:
    """The trunk `name` with weights from our backbone.pt, our checkpoint_last.pt (the query model's
    backbone) or, for 'random', a torchvision-style initialisation drawn from `seed`."""
    if str(path_or_checkpoint) == "random":
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(seed)
            backbone, _ = build_backbone(name)
        return backbone
    path = Path(path_or_checkpoint)
    state = read_checkpoint_file(path)
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        trunk = {key[len(QUERY_BACKBONE_PREFIX):]: value for key, value in state["vclr"].items()
                 if key.startswith(QUERY_BACKBONE_PREFIX)}
        if not trunk:
            raise VclrError(f"{path}: pretraining checkpoint without '{QUERY_BACKBONE_PREFIX}*' keys")
        backbone, _ = build_backbone(name)
        copy_checked(backbone, trunk, f"{path} (query backbone, {name})")
        return backbone
    backbone, _ = build_backbone(name, pretrained=path)
    return backbone


def center_crop(frames: torch.Tensor, crop: int) -> torch.Tensor:
    """uint8 [T,3,H,W] -> float32 [T,3,crop,crop] in [0,1]; short side resized up only if under crop."""
    frames = frames.float().div_(255)
    height, width = frames.shape[-2:]
    if min(height, width) < crop:
        scale = crop / min(height, width)
        size = (max(crop, round(height * scale)), max(crop, round(width * scale)))
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)
        height, width = size
    top, left = (height - crop) // 2, (width - crop) // 2
    return frames[..., top:top + crop, left:left + crop]


def _eval_transform(crop: int):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def transform(frames: torch.Tensor) -> torch.Tensor:
        return (center_crop(frames, crop) - mean) / std

    return transform


def uniform_clip_indices(num_frames: int, num_clips: int, clip_frames: int, clip_stride: int) -> list[int]:
    """num_clips clips of clip_frames frames (every clip_stride), starts spread evenly over the
    positions where a clip fits (0 only, if none does; frames past the end repeat the last one):
    the frame indices, clip after clip."""
    starts = uniform_frame_indices(max(1, num_frames - clip_span(clip_frames, clip_stride) + 1), num_clips)
    return [i for start in starts for i in clip_frame_indices(start, clip_frames, clip_stride, num_frames)]


class JpegVideoDataset(VideoFrameDataset):
    """VideoFrameDataset's found rows and frame picks, but the frames' JPEG bytes, not decoded:
    ([bytes], label, video_id). Decoding is batched (decode_jpegs: nvjpeg on CUDA)."""

    def __getitem__(self, row_index: int):
        row = self.rows[row_index]
        indices = self.frame_indices_fn(self.frames.num_frames(row.video_id), row_index)
        read = {i: self.frames.read_jpeg(row.video_id, int(i)) for i in dict.fromkeys(indices)}  # a clip may repeat
        return [read[i] for i in indices], row.label, row.video_id


def decode_eval_crops(jpegs: Sequence[torch.Tensor], crop: int, crops: int, device: torch.device,
                      where: str) -> torch.Tensor:
    """JPEG bytes -> normalised float32 evaluation crops [F*crops,3,crop,crop] on `device`, frame-major:
    decode_jpegs (nvjpeg on CUDA) + eval_crops (as eval_crops_sliced: no resampling when no frame needs
    resizing), the GPU input pipeline's decode path."""
    try:
        frames = decode_jpegs(jpegs, device)
    except VclrError as error:
        raise VclrError(f"{where}: {error}") from None
    return eval_crops_sliced(frames, crop, crops)


def _split_jpegs(data: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    return [data[a:b] for a, b in itertools.pairwise(offsets.tolist())]


def _collate_jpegs(items, frames_dir: str, crop: int, crops: int, decode: bool):
    """A batch of JpegVideoDataset items -> (x, labels, video_ids). x: on a CPU the decoded crops (so
    DataLoader workers decode in parallel); else (all JPEG bytes in one uint8 tensor, offsets [F+1]):
    one buffer crosses from a worker, not a tensor per frame."""
    jpegs = [jpeg for item in items for jpeg in item[0]]
    data = torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8)
    offsets = torch.tensor([0, *itertools.accumulate(map(len, jpegs))], dtype=torch.long)
    labels = torch.tensor([item[1] for item in items], dtype=torch.long)
    ids = [item[2] for item in items]
    if decode:
        return decode_eval_crops(_split_jpegs(data, offsets), crop, crops, torch.device("cpu"),
                                 f"{frames_dir}: videos {', '.join(ids)}"), labels, ids
    return (data, offsets), labels, ids


def _frame_indices(num_frames: int, clip_frames: int | None, clip_stride: int):
    if clip_frames is None:
        return lambda count, _: uniform_frame_indices(count, num_frames)
    return lambda count, _: uniform_clip_indices(count, num_frames, clip_frames, clip_stride)


def default_prefetch(device: torch.device) -> int:
    """Extraction's prefetch depth: 1 on CUDA, 0 on a CPU, where the loader decodes and the forward
    computes on the same cores: overlapping them slowed extraction to 0.89-0.94x on an idle 2-core
    machine (docs/benchmarks.md)."""
    return 1 if torch.device(device).type == "cuda" else 0


@torch.no_grad()
def extract_features(backbone: nn.Module, rows: Sequence, frames: PackedFrames, num_frames: int = 30,
                     crop: int = 224, batch_size: int = 240, device: str | torch.device = "cpu",
                     workers: int = 0, clip_frames: int | None = None, clip_stride: int = 1,
                     crops: int = 1, prefetch: int | None = None) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(features float32 [N,D], video_ids, labels) for the found rows, in row order.

    The GPU input pipeline's decode path: a batch's JPEG bytes (read by `workers` DataLoader processes)
    decoded together (decode_jpegs: nvjpeg on CUDA; on a CPU inside the loader workers) and cut by
    eval_crops (crops=1: center_crop's centre crop; 3: start, centre and end of the long side, all
    averaged). `batch_size` counts crops per forward pass: whole videos are batched,
    batch_size // (num_frames * crops) of them (at least 1). bf16 autocast on CUDA, fp32 on CPU; the
    average is always taken in fp32. With clip_frames (a 3D backbone): `num_frames` clips per video
    (uniform_clip_indices), each [3,clip_frames,crop,crop] through the trunk (every crop of a clip cut
    at the same place); batch_size // (num_frames * clip_frames * crops) videos per batch.
    extract_features_per_frame is the per-frame reference it is tested against (same crops).
    `prefetch` batches are read (and decoded, on CUDA on a side stream) ahead of the forward pass in a
    background thread (vclr.data.device_prefetch; 0: between passes); the features are the same.
    None: default_prefetch(device).
    """
    device = torch.device(device)
    if prefetch is None:
        prefetch = default_prefetch(device)
    check_clip(clip_frames, clip_stride, "feature extraction")
    if crops not in (1, 3):
        raise VclrError(f"crops must be 1 or 3, got {crops}")
    per_sample = clip_frames or 1
    dataset = JpegVideoDataset(rows, frames, _frame_indices(num_frames, clip_frames, clip_stride))
    if len(dataset) == 0:
        raise VclrError(f"{frames.frames_dir}: no found videos to extract features from")
    on_cpu = device.type == "cpu"
    collate = functools.partial(_collate_jpegs, frames_dir=str(frames.frames_dir), crop=crop, crops=crops,
                                decode=on_cpu)
    loader = DataLoader(dataset, batch_size=max(1, batch_size // (num_frames * per_sample * crops)),
                        num_workers=workers, collate_fn=collate)
    backbone = backbone.to(device).eval()

    def prepare(item: tuple) -> tuple:
        batch, batch_labels, batch_ids = item
        x = batch if on_cpu else decode_eval_crops(_split_jpegs(*batch), crop, crops, device,
                                                      f"{frames.frames_dir}: videos {', '.join(batch_ids)}")
        if clip_frames is not None:  # [V*n*T*crops,3,c,c] -> [V*n*crops,3,T,c,c]
            x = x.unflatten(0, (-1, clip_frames, crops)).permute(0, 2, 3, 1, 4, 5).flatten(0, 1).contiguous()
        return x, batch_labels, batch_ids

    features, video_ids, labels = [], [], []
    with DevicePrefetcher(loader, prepare, device, depth=prefetch) as batches:
        for x, batch_labels, batch_ids in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                output = backbone(x)
            features.append(output.float().view(len(batch_ids), num_frames * crops, -1).mean(1).cpu())
            video_ids.extend(batch_ids)
            labels.append(batch_labels)
    return torch.cat(features).numpy().astype(np.float32), list(video_ids), torch.cat(labels).numpy()


@torch.no_grad()
def extract_features_per_frame(backbone: nn.Module, rows: Sequence, frames: PackedFrames, num_frames: int = 30,
                     crop: int = 224, batch_size: int = 240, device: str | torch.device = "cpu",
                     workers: int = 0, clip_frames: int | None = None,
                     clip_stride: int = 1) -> tuple[np.ndarray, list[str], np.ndarray]:
    """extract_features through the per-frame path: each frame decoded alone (PackedFrames.read_frame)
    and cropped by center_crop in the DataLoader's transform. The reference extract_features is tested
    and benchmarked against (vclr bench features); the pipeline does not use it.

    `batch_size` counts frames: whole videos are batched, batch_size // num_frames of them (at least 1).
    bf16 autocast on CUDA, fp32 on CPU; the average over frames is always taken in fp32.
    With clip_frames (a 3D backbone): `num_frames` clips per video (uniform_clip_indices), each
    [3,clip_frames,crop,crop] through the trunk; batch_size // (num_frames * clip_frames) videos per batch.
    """
    device = torch.device(device)
    check_clip(clip_frames, clip_stride, "feature extraction")
    per_sample = clip_frames or 1
    dataset = VideoFrameDataset(rows, frames, _frame_indices(num_frames, clip_frames, clip_stride),
                                _eval_transform(crop))
    if len(dataset) == 0:
        raise VclrError(f"{frames.frames_dir}: no found videos to extract features from")
    loader = DataLoader(dataset, batch_size=max(1, batch_size // (num_frames * per_sample)), num_workers=workers,
                        pin_memory=device.type == "cuda")
    backbone = backbone.to(device).eval()
    features, video_ids, labels = [], [], []
    for clips, clip_labels, clip_ids in loader:
        videos = clips.shape[0]
        clips = clips.to(device, non_blocking=True).flatten(0, 1)
        if clip_frames is not None:  # [videos*n*T,3,c,c] -> [videos*n,3,T,c,c]
            clips = clips.unflatten(0, (-1, clip_frames)).transpose(1, 2).contiguous()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            output = backbone(clips)
        features.append(output.float().view(videos, num_frames, -1).mean(1).cpu())
        video_ids.extend(clip_ids)
        labels.append(clip_labels)
    return torch.cat(features).numpy().astype(np.float32), list(video_ids), torch.cat(labels).numpy()


def features_for_split(backbone_name: str, checkpoint: str, index_csv: str | os.PathLike,
                       frames_dir: str | os.PathLike, out: str | os.PathLike, num_frames: int = 30,
                       crop: int = 224, batch_size: int = 240, device: str = "cpu", seed: int = 0,
                       workers: int = 0, clip_frames: int | None = None, clip_stride: int | None = None,
                       crops: int = 1) -> dict:
    """Load, extract and save one split; returns the provenance written (features_for_splits)."""
    return features_for_splits(backbone_name, checkpoint, [(index_csv, frames_dir, out)], num_frames, crop,
                               batch_size, device, seed, workers, clip_frames, clip_stride, crops)[0]


def features_for_splits(backbone_name: str, checkpoint: str, splits: Sequence[tuple], num_frames: int = 30,
                        crop: int = 224, batch_size: int = 240, device: str = "cpu", seed: int = 0,
                        workers: int = 0, clip_frames: int | None = None, clip_stride: int | None = None,
                        crops: int = 1) -> list[dict]:
    """Features of several splits, (index_csv, frames_dir, out) each, with the backbone built and loaded
    once; each .npz is written (atomically) as soon as its split is done. Returns the provenances
    written. Every split's index and frames are read before the model loads, so a wrong path fails
    in seconds, not after the splits before it. A 3D backbone takes clips (clip_frames / clip_stride:
    None = DEFAULT_CLIP_FRAMES / DEFAULT_CLIP_STRIDE); a 2D one refuses them."""
    clip = resolve_feature_clip(backbone_name, clip_frames, clip_stride)
    outs = [Path(out).resolve() for _, _, out in splits]
    if not splits or len(set(outs)) != len(outs):
        raise VclrError(f"features: {len(splits)} splits, {len(set(outs))} distinct output files; "
                        f"each split needs its own")
    inputs = [(read_split(index_csv), PackedFrames(frames_dir)) for index_csv, frames_dir, _ in splits]
    backbone = load_backbone(checkpoint, backbone_name, seed=seed)
    is_random = checkpoint == "random"
    weights = {
        "backbone": backbone_name,
        "checkpoint": f"random:seed={seed}" if is_random else str(Path(checkpoint).resolve()),
        "checkpoint_sha256": None if is_random else file_sha256(checkpoint),
    }
    written = []
    for (index_csv, frames_dir, out), (rows, frames) in zip(splits, inputs):
        features, video_ids, labels = extract_features(backbone, rows, frames, num_frames, crop, batch_size,
                                                       device, workers, crops=crops, **clip)
        names = {row.label: row.label_name for row in rows}
        provenance = {
            **weights, "index": str(Path(index_csv).resolve()), "frames": str(Path(frames_dir).resolve()),
            "num_frames": num_frames, "crop": crop, "crops": crops, "videos": len(video_ids),
            "skipped_not_found": sum(row.status != "found" for row in rows),
            "class_names": {str(label): names[int(label)] for label in sorted(set(labels.tolist()))},
        }
        if clip["clip_frames"] is not None:  # 3D: num_frames counts clips
            provenance.update(clip)
        save_features(out, features, video_ids, labels, provenance)
        written.append(provenance)
    return written


def resolve_feature_clip(backbone_name: str, clip_frames: int | None, clip_stride: int | None) -> dict:
    """{clip_frames, clip_stride} for extract_features: defaults for a 3D backbone; a 2D one takes none."""
    if not is_video_backbone(backbone_name):
        if clip_frames is not None or clip_stride is not None:
            raise VclrError(f"--clip-frames / --clip-stride: backbone {backbone_name!r} is 2D (frames); "
                            f"clips need a 3D backbone")
        return {"clip_frames": None, "clip_stride": 1}
    clip = {"clip_frames": DEFAULT_CLIP_FRAMES if clip_frames is None else clip_frames,
            "clip_stride": DEFAULT_CLIP_STRIDE if clip_stride is None else clip_stride}
    check_clip(clip["clip_frames"], clip["clip_stride"], "--clip-frames / --clip-stride")
    return clip


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", required=True, choices=ALL_BACKBONES)
    parser.add_argument("--checkpoint", required=True,
                        help="backbone.pt, checkpoint_last.pt (query backbone) or 'random'")
    parser.add_argument("--index", type=Path, help="split CSV, e.g. INDEX/train.csv (with --frames, --out)")
    parser.add_argument("--frames", type=Path, help="packed-frames directory")
    parser.add_argument("--out", type=Path, help="features file to write (.npz)")
    parser.add_argument("--split", nargs=3, action="append", type=Path, default=[],
                        metavar=("INDEX_CSV", "FRAMES_DIR", "OUT_NPZ"),
                        help="a split to extract (repeatable; with or instead of --index/--frames/--out): "
                             "the backbone is loaded once for all of them")
    parser.add_argument("--num-frames", type=int, default=30,
                        help="frames per video (2D backbone); clips per video (3D backbone)")
    parser.add_argument("--clip-frames", type=int, default=None,
                        help=f"3D backbones: frames per clip (default {DEFAULT_CLIP_FRAMES})")
    parser.add_argument("--clip-stride", type=int, default=None,
                        help=f"3D backbones: frame step inside a clip (default {DEFAULT_CLIP_STRIDE})")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--crops", type=int, default=1, choices=(1, 3),
                        help="crops per frame, averaged: 1 centre (the protocol), 3 along the long side")
    parser.add_argument("--batch-size", type=int, default=240, help="crops per forward pass")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0, help="init seed for --checkpoint random")
    parser.add_argument("--workers", type=int, default=0, help="frame-reading (CPU: and decoding) processes")


def main(args: argparse.Namespace) -> int:
    for flag in ("num_frames", "crop", "batch_size"):
        if getattr(args, flag) < 1:
            raise VclrError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    single = (args.index, args.frames, args.out)
    if any(path is not None for path in single) and not all(path is not None for path in single):
        raise VclrError("--index, --frames and --out: give all three (or use --split INDEX_CSV FRAMES_DIR OUT_NPZ)")
    splits = ([tuple(single)] if args.index is not None else []) + [tuple(split) for split in args.split]
    if not splits:
        raise VclrError("no split to extract: give --index/--frames/--out or --split INDEX_CSV FRAMES_DIR OUT_NPZ")
    device = resolve_device(args.device)
    written = features_for_splits(args.backbone, args.checkpoint, splits, args.num_frames, args.crop,
                                  args.batch_size, device, args.seed, args.workers, args.clip_frames,
                                  args.clip_stride, args.crops)
    for (_, _, out), provenance in zip(splits, written):
        print(f"{provenance['videos']} videos ({provenance['skipped_not_found']} not found, skipped) -> {out}")
    return 0
