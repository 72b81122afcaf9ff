"""`vclr eval localize`: temporal action proposals on ActivityNet with BMN (spec/protocols.md,
"Temporal action localisation"): snippet features -> BMN training -> proposals -> AR@AN and AUC.

(a) Snippet features: the fine-tuned frame classifier (any callable frames [N,3,H,W] -> scores [N,C];
    `load_classifier` reads a vclr.models.tsn fine-tuned file) applied to the centre frame of every
    `interval` (16) stored frames, short side resized to 256 and centre-cropped 256. The raw snippet
    sequences are saved once (.npz with provenance; resumable in parts) and reused; each video is
    rescaled to T (100) positions when it is used (`rescale_snippets`).
    Stored frames are taken to be at the video's native rate (the paper extraction keeps it).
(b) BMN training on the train split: Adam, lr 1e-3 x0.1 after epoch 7, wd 1e-4, batch 16, 9 epochs;
    seeded; a checkpoint is written atomically after every epoch and a rerun resumes from it.
(c) Inference on the evaluation split + soft-NMS -> top 100 proposals per video -> JSON in the
    ActivityNet proposal-submission format.
(d) AR@1/5/10/100 and AUC (vclr.evaluate.proposals) over the evaluation videos that were scored.
(e) Videos in the blocked list (--blocked), missing from the frames or without segments are skipped;
    the record names the scored videos (count, sha256 of the sorted id list, and the list's file).

Time axis, as the reference (BSN/BMN, mmaction2): only whole 16-frame chunks are covered by
snippets, so the video is taken to last covered = (frames // 16 * 16) / frames * duration seconds;
ground-truth segments are divided by it (and clipped to [0, 1]) for training, and proposals in
[0, 1] are multiplied by it to give seconds. Evaluation compares with the annotation's seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from vclr.data.augment import IMAGENET_MEAN, IMAGENET_STD
from vclr.data.index import read_split
from vclr.data.packed import PackedFrames, read_manifest
from vclr.errors import VclrError
from vclr.evaluate.feature_files import file_sha256, load_npz_with_provenance
from vclr.evaluate.proposals import TIOU_THRESHOLDS, average_recall_vs_an, soft_nms, uniform_random_proposals
from vclr.io_utils import atomic_open, atomic_write_json, atomic_write_text
from vclr.models.backbones import read_checkpoint_file
from vclr.models.bmn import (
    bmn_labels,
    bmn_loss,
    candidate_proposals,
    default_groups,
    init_bmn,
)
from vclr.train.checkpoint import check_state_dict, restore_rng_states, rng_states
from vclr.train.distributed import resolve_device

FEATURES_FORMAT = "vclr-snippet-features/1"
CHECKPOINT_FORMAT = "vclr-bmn-checkpoint/1"
DEFAULT_BLOCKED = Path(__file__).resolve().parent.parent / "data" / "anet_blocked_videos.txt"
_VIDEO_ID = re.compile(r"^[A-Za-z0-9_-]+$")
# provenance keys that must agree for a saved features file (or a partial run) to be reused
_FEATURE_KEYS = ("classifier_sha256", "frames_manifest_sha256", "interval", "short_side", "crop")


# ----------------------------------------------------------------------------- blocked videos


def read_blocked(path: str | os.PathLike) -> set[str]:
    """Video ids of a blocked-video file: one per line, '#' starts a comment, blank lines ignored.

    Ids are index keys (v_<youtube id>); a bare 11-character YouTube id (the official list's form)
    gets the v_ prefix.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VclrError(f"{path}: blocked-video list not found") from None
    blocked = set()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not _VIDEO_ID.match(entry):
            raise VclrError(f"{path}:{number}: {entry!r} is not a video id (one id per line, '#' comments)")
        blocked.add(entry if entry.startswith("v_") and len(entry) != 11 else f"v_{entry}")
    return blocked


# ----------------------------------------------------------------------------- snippet features


def snippet_frames(num_frames: int, interval: int = 16) -> tuple[list[int], int]:
    """(frame index of each snippet, frames covered): the centre frame of each whole `interval`-frame
    chunk; a video shorter than one chunk gives one snippet (its middle frame) covering all of it."""
    if num_frames < 1 or interval < 1:
        raise VclrError(f"snippet_frames: need num_frames >= 1 and interval >= 1, got {num_frames}, {interval}")
    if num_frames < interval:
        return [num_frames // 2], num_frames
    chunks = num_frames // interval
    return [k * interval + interval // 2 for k in range(chunks)], chunks * interval


def rescale_snippets(scores: np.ndarray, temporal_scale: int = 100, samples_per_position: int = 3) -> np.ndarray:
    """[K, C] snippet scores -> [T, C]: linear interpolation to T positions.

    Snippet k sits at (k + 0.5) / K of the covered time; position i spans [i/T, (i+1)/T] and is the
    mean of `samples_per_position` points evenly inside it ((i + (j + 0.5)/S) / T), each linearly
    interpolated between its neighbouring snippets (held constant beyond the first and last). With
    K >> T this averages several snippets per position, as mmaction2's pool_feature (3 points per bin).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or len(scores) == 0:
        raise VclrError(f"rescale_snippets: expected scores [K >= 1, C], got {scores.shape}")
    count = len(scores)
    snippet_times = (np.arange(count) + 0.5) / count
    points = ((np.arange(temporal_scale)[:, None] + (np.arange(samples_per_position)[None, :] + 0.5)
               / samples_per_position) / temporal_scale).reshape(-1)
    # np.interp is 1-D: interpolate through positions as fractional snippet indices instead
    where = np.clip(np.interp(points, snippet_times, np.arange(count, dtype=np.float64)), 0, count - 1)
    low = np.floor(where).astype(np.int64)
    high = np.minimum(low + 1, count - 1)
    frac = (where - low)[:, None]
    values = scores[low] * (1 - frac) + scores[high] * frac
    return values.reshape(temporal_scale, samples_per_position, -1).mean(1).astype(np.float32)


def resize_center_crop(frames: torch.Tensor, short_side: int, crop: int) -> torch.Tensor:
    """uint8 [N,3,H,W] -> uint8 [N,3,crop,crop]: short side resized to `short_side` (bilinear,
    antialiased; skipped when it already is), then the centre crop."""
    height, width = frames.shape[-2:]
    if min(height, width) != short_side:
        scale = short_side / min(height, width)
        size = (max(short_side, round(height * scale)), max(short_side, round(width * scale)))
        frames = F.interpolate(frames.float(), size=size, mode="bilinear", align_corners=False,
                               antialias=True).round_().clamp_(0, 255).to(torch.uint8)
        height, width = size
    if min(height, width) < crop:
        raise VclrError(f"crop {crop} is larger than the resized frames ({height}x{width}); lower --crop")
    top, left = (height - crop) // 2, (width - crop) // 2
    return frames[..., top:top + crop, left:left + crop]


class _SnippetDataset(torch.utils.data.Dataset):
    """(video_id, uint8 [K,3,crop,crop], frames, covered frames) of each video to extract."""

    def __init__(self, video_ids: Sequence[str], frames: PackedFrames, interval: int, short_side: int, crop: int):
        self.video_ids, self.frames = list(video_ids), frames
        self.interval, self.short_side, self.crop = interval, short_side, crop

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, i: int):
        video = self.video_ids[i]
        count = self.frames.num_frames(video)
        indices, covered = snippet_frames(count, self.interval)
        clip = torch.stack([self.frames.read_frame(video, j) for j in indices])
        return video, resize_center_crop(clip, self.short_side, self.crop), count, covered


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """frames [N,3,H,W] (normalised) -> scores [N,C] of a fine-tuned file (vclr.models.tsn), imported
    only here so that the rest of this module does not depend on it."""
    try:
        from vclr.models import tsn
    except ImportError as error:
        raise VclrError(f"{path}: loading a fine-tuned classifier needs vclr.models.tsn ({error})") from None
    for name in ("load_finetuned", "frame_scores"):
        if not hasattr(tsn, name):
            raise VclrError(f"{path}: vclr.models.tsn has no {name}(); cannot load the classifier")
    model, _ = tsn.load_finetuned(path)
    model = model.to(device).eval()
    return lambda frames: tsn.frame_scores(model, frames)


@torch.no_grad()
def _extract(classifier: Callable, video_ids: Sequence[str], frames: PackedFrames, *, interval: int,
             short_side: int, crop: int, frame_batch: int, device: torch.device, workers: int):
    """Yield (video_id, scores float32 [K, C], frames, covered frames) per video, in order."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    loader = torch.utils.data.DataLoader(_SnippetDataset(video_ids, frames, interval, short_side, crop),
                                         batch_size=None, num_workers=workers)
    for video, clip, count, covered in loader:
        outputs = []
        for chunk in clip.split(frame_batch):
            chunk = (chunk.to(device).float().div_(255) - mean) / std
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                scores = classifier(chunk)
            if scores.ndim != 2 or scores.shape[0] != chunk.shape[0]:
                raise VclrError(f"the classifier returned scores {list(scores.shape)} for {chunk.shape[0]} frames "
                                f"(expected [N, classes])")
            outputs.append(scores.float().cpu())
        yield video, torch.cat(outputs).numpy().astype(np.float32), int(count), int(covered)


def save_snippet_features(path: Path, items: list[tuple[str, np.ndarray, int, int]], provenance: dict) -> None:
    """items (video_id, scores [K,C], frames, covered) -> one .npz: ragged scores + offsets."""
    offsets = np.cumsum([0] + [len(scores) for _, scores, _, _ in items]).astype(np.int64)
    width = items[0][1].shape[1] if items else 0
    with atomic_open(path, "wb") as handle:
        np.savez(handle, video_ids=np.asarray([item[0] for item in items], dtype=str), offsets=offsets,
                 scores=np.concatenate([item[1] for item in items]) if items else np.zeros((0, width), np.float32),
                 num_frames=np.asarray([item[2] for item in items], dtype=np.int64),
                 covered_frames=np.asarray([item[3] for item in items], dtype=np.int64),
                 provenance=np.asarray(json.dumps({"format": FEATURES_FORMAT, **provenance})))


def load_snippet_features(path: str | os.PathLike) -> dict:
    """{video_id: (scores [K,C], frames, covered)} plus "provenance"; VclrError naming the file."""
    path = Path(path)
    loaded, provenance = load_npz_with_provenance(
        path, ("video_ids", "offsets", "scores", "num_frames", "covered_frames"), "snippet-features file",
        FEATURES_FORMAT)
    ids, offsets, scores = loaded["video_ids"], loaded["offsets"], loaded["scores"]
    if (scores.ndim != 2 or len(offsets) != len(ids) + 1 or offsets[0] != 0 or offsets[-1] != len(scores)
            or np.any(np.diff(offsets) < 1) or len(loaded["num_frames"]) != len(ids)
            or len(loaded["covered_frames"]) != len(ids)):
        raise VclrError(f"{path}: arrays out of step (video_ids {ids.shape}, offsets {offsets.shape}, "
                        f"scores {scores.shape})")
    videos = {str(video): (scores[offsets[i]:offsets[i + 1]].astype(np.float32), int(loaded["num_frames"][i]),
                           int(loaded["covered_frames"][i])) for i, video in enumerate(ids)}
    if len(videos) != len(ids):
        raise VclrError(f"{path}: key 'video_ids' repeats a video")
    return {"videos": videos, "provenance": provenance}


def compute_snippet_features(path: str | os.PathLike, classifier: Callable, video_ids: Sequence[str],
                             frames_dir: str | os.PathLike, provenance: dict, *, interval: int = 16,
                             short_side: int = 256, crop: int = 256, frame_batch: int = 256,
                             device: str | torch.device = "cpu", workers: int = 0, chunk: int = 64,
                             progress: Callable[[str], None] | None = None) -> None:
    """Extract every video's snippet scores into `path`, resumably: chunks of `chunk` videos go to
    `<path>.parts/` as they finish (atomically) and a rerun with the same provenance keeps them; the
    parts are merged into `path` and removed at the end. `provenance` (classifier, frames manifest
    hash, ...) is stored in the file."""
    path, device = Path(path), torch.device(device)
    frames = PackedFrames(frames_dir)
    video_ids = sorted(video_ids)
    parts = path.with_name(path.name + ".parts")
    settings = {**provenance, "videos": video_ids, "chunk": chunk}
    settings_file = parts / "settings.json"
    if parts.exists():
        try:
            same = json.loads(settings_file.read_text(encoding="utf-8")) == settings
        except (OSError, ValueError):
            same = False
        if not same:  # a partial run with other inputs: its parts cannot be reused
            shutil.rmtree(parts)
    if not parts.exists():
        parts.mkdir(parents=True)
        atomic_write_json(settings_file, settings)
    items = []
    for start in range(0, len(video_ids), chunk):
        part = parts / f"part-{start // chunk:05d}.npz"
        wanted = video_ids[start:start + chunk]
        if part.exists():
            loaded = load_snippet_features(part)["videos"]
            if sorted(loaded) == wanted:
                items.extend((video, *loaded[video]) for video in wanted)
                continue
        done = list(_extract(classifier, wanted, frames, interval=interval, short_side=short_side, crop=crop,
                             frame_batch=frame_batch, device=device, workers=workers))
        save_snippet_features(part, done, provenance)
        items.extend(done)
        if progress:
            progress(f"snippet features: {min(start + chunk, len(video_ids))}/{len(video_ids)} videos")
    widths = {scores.shape[1] for _, scores, _, _ in items}
    if len(widths) > 1:
        raise VclrError(f"{path}: the classifier gave scores of several widths {sorted(widths)}")
    save_snippet_features(path, items, provenance)
    shutil.rmtree(parts, ignore_errors=True)


# ----------------------------------------------------------------------------- BMN training and inference


def lr_at_epoch(epoch: int, lr: float, step: int, gamma: float = 0.1) -> float:
    """The reference's StepLR: lr for epochs [0, step), lr * gamma from `step` on (every `step` epochs)."""
    return lr * gamma ** (epoch // step)


def _batch_labels(items: Sequence[dict], temporal_scale: int) -> tuple[torch.Tensor, ...]:
    labels = [bmn_labels(item["segments"], temporal_scale) for item in items]
    return tuple(torch.from_numpy(np.stack(parts)) for parts in zip(*labels))


def train_bmn(items: Sequence[dict], model_config: dict, *, checkpoint: str | os.PathLike, epochs: int = 9,
              batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 1e-4, lr_step: int = 7,
              seed: int = 0, device: str | torch.device = "cpu", log: Callable[[str], None] | None = None,
              run_config: dict | None = None):
    """Train a BMN on items ({"features" [C,T], "segments" [G,2] in [0,1]}); resumes from `checkpoint`
    when it holds the same configuration (else starts over and replaces it); writes it atomically
    after every epoch. Returns the model in eval mode."""
    device, checkpoint = torch.device(device), Path(checkpoint)
    if not items:
        raise VclrError("no training videos (with features and ground-truth segments) for BMN")
    config = {"model": model_config, "epochs": epochs, "batch_size": batch_size, "lr": lr,
              "weight_decay": weight_decay, "lr_step": lr_step, "seed": seed, **(run_config or {})}
    model = init_bmn(seed, **model_config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sampler = torch.Generator().manual_seed(seed + 1)  # PEM regression's random cell selection
    first_epoch = 0
    state = _load_checkpoint(checkpoint) if checkpoint.exists() else None
    if state is not None and state["config"] != config:
        # another run's state (other features, settings or videos) cannot continue this one
        differing = sorted(key for key in set(config) | set(state["config"]) if config.get(key) != state["config"].get(key))
        if log:
            log(f"{checkpoint}: made with another configuration (differs in {', '.join(differing)}); "
                f"training from scratch")
        state = None
    if state is not None:
        check_state_dict(model, state["model"], str(checkpoint))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_states(state["rng"], {"sampler": sampler})
        first_epoch = state["epoch"]
    temporal_scale = model_config["temporal_scale"]
    features = torch.from_numpy(np.stack([item["features"] for item in items]))
    for epoch in range(first_epoch, epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at_epoch(epoch, lr, lr_step)
        model.train()
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        totals, batches = {}, 0
        for begin in range(0, len(items), batch_size):
            index = order[begin:begin + batch_size]
            gt_iou, gt_start, gt_end = (t.to(device) for t in _batch_labels([items[i] for i in index], temporal_scale))
            confidence, start, end = model(features[index].to(device))
            losses = bmn_loss(confidence, start, end, gt_iou, gt_start, gt_end, generator=sampler)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach())
            batches += 1
        _save_checkpoint(checkpoint, model, optimizer, epoch + 1, config, sampler)
        if log:
            log(f"BMN epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k} {v / batches:.4f}" for k, v in totals.items()))
    return model.eval()


def _save_checkpoint(path: Path, model, optimizer, epoch: int, config: dict, sampler: torch.Generator) -> None:
    state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "epoch": epoch, "config": config, "rng": rng_states({"sampler": sampler})}
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)


def _load_checkpoint(path: Path) -> dict:
    state = read_checkpoint_file(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise VclrError(f"{path}: not a BMN checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    return state


@torch.no_grad()
def predict_proposals(model, items: Sequence[dict], *, alpha: float = 0.4, low: float = 0.5, high: float = 0.9,
                      top_k: int = 100, batch_size: int = 16, device: str | torch.device = "cpu"
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{video: (segments [<=top_k, 2] in seconds, scores)} for items ({"video", "features" [C,T],
    "covered_seconds"}): BMN candidates, soft-NMS on [0, 1] positions, scaled by the covered time."""
    device = torch.device(device)
    model = model.to(device).eval()
    results = {}
    for begin in range(0, len(items), batch_size):
        batch = items[begin:begin + batch_size]
        confidence, start, end = model(torch.from_numpy(np.stack([item["features"] for item in batch])).to(device))
        confidence, start, end = (t.float().cpu().numpy().astype(np.float64) for t in (confidence, start, end))
        for i, item in enumerate(batch):
            segments, scores = candidate_proposals(confidence[i], start[i], end[i])
            if len(scores) > 1:  # as the reference: a single candidate skips soft-NMS
                segments, scores = soft_nms(segments, scores, alpha, low, high, top_k)
            segments = np.clip(segments[:top_k], 0.0, 1.0) * item["covered_seconds"]
            results[item["video"]] = (segments, scores[:top_k])
    return results


def proposals_json(proposals: dict[str, tuple[np.ndarray, np.ndarray]], external: dict) -> dict:
    """The ActivityNet proposal-submission format; keys are YouTube ids (the v_ prefix removed)."""
    results = {}
    for video in sorted(proposals):
        segments, scores = proposals[video]
        key = video.removeprefix("v_")
        results[key] = [{"score": float(score), "segment": [float(a), float(b)]}
                        for (a, b), score in zip(segments, scores)]
    return {"version": "VERSION 1.3", "results": results, "external_data": external}


# ----------------------------------------------------------------------------- the whole protocol


def select_videos(rows, blocked: set[str], available: set[str]) -> tuple[list, dict]:
    """(rows to use, ids of those skipped): blocked, not found in the frames, without ground-truth
    segments, without snippet features (in that order of precedence)."""
    used, skipped = [], {"blocked": [], "not_found": [], "no_segments": [], "no_features": []}
    for row in rows:
        if row.video_id in blocked:
            skipped["blocked"].append(row.video_id)
        elif row.status != "found":
            skipped["not_found"].append(row.video_id)
        elif not row.segments:  # checked before features: such videos are never extracted
            skipped["no_segments"].append(row.video_id)
        elif row.video_id not in available:
            skipped["no_features"].append(row.video_id)
        else:
            used.append(row)
    return used, skipped


def bmn_items(rows, features: dict, temporal_scale: int, samples_per_position: int, feat_dim: int | None = None
              ) -> list[dict]:
    """Per row: {"video", "features" [C, T], "segments" [G, 2] in [0, 1] of the covered time,
    "covered_seconds"}."""
    items = []
    for row in rows:
        scores, count, covered = features[row.video_id]
        if feat_dim is not None and scores.shape[1] != feat_dim:
            raise VclrError(f"video {row.video_id}: snippet features have {scores.shape[1]} channels, expected {feat_dim}")
        if row.duration is None or not row.duration > 0:
            raise VclrError(f"video {row.video_id}: the index has no positive duration (column 'duration')")
        covered_seconds = covered / count * row.duration
        segments = np.asarray([[start, end] for start, end, _ in row.segments], dtype=np.float64)
        items.append({"video": row.video_id,
                      "features": rescale_snippets(scores, temporal_scale, samples_per_position).T.copy(),
                      "segments": np.clip(segments / covered_seconds, 0.0, 1.0),
                      "ground_truth": segments, "covered_seconds": covered_seconds})
    return items


def _write_metrics(path, **fields) -> dict:
    from vclr.evaluate.record import write_metrics_record

    return write_metrics_record(path, **fields)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, type=Path, help="ActivityNet index directory (<split>.csv)")
    parser.add_argument("--frames", type=Path, help="packed frames (needed unless --features can be reused)")
    parser.add_argument("--classifier", type=Path,
                        help="fine-tuned TSN (vclr.models.tsn) giving the snippet scores; needed unless "
                             "--features already holds every video")
    parser.add_argument("--features", required=True, type=Path,
                        help="snippet-features file (.npz): written once, reused when its provenance matches")
    parser.add_argument("--work", required=True, type=Path, help="run directory: BMN checkpoint, proposals, id list")
    parser.add_argument("--out", required=True, type=Path, help="metrics record (JSON) to write")
    parser.add_argument("--blocked", type=Path, default=DEFAULT_BLOCKED,
                        help="blocked-video list: one id per line, '#' comments (default: the versioned list)")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--eval-split", default="val")
    parser.add_argument("--interval", type=int, default=16, help="stored frames per snippet")
    parser.add_argument("--short-side", type=int, default=256)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--temporal-scale", type=int, default=100)
    parser.add_argument("--position-samples", type=int, default=3, help="interpolated points averaged per position")
    parser.add_argument("--num-samples", type=int, default=32, help="BM layer: sample bins per proposal")
    parser.add_argument("--samples-per-bin", type=int, default=3)
    parser.add_argument("--boundary-ratio", type=float, default=0.5)
    parser.add_argument("--hidden", type=int, nargs=3, default=[256, 128, 512], metavar=("D1", "D2", "D3"),
                        help="BMN widths: 1D, 2D and 3D hidden channels")
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--lr-step", type=int, default=7, help="lr x0.1 every this many epochs")
    parser.add_argument("--soft-nms-alpha", type=float, default=0.4)
    parser.add_argument("--soft-nms-low", type=float, default=0.5)
    parser.add_argument("--soft-nms-high", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=100, help="proposals kept per video (AN still runs to 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--workers", type=int, default=0, help="frame-decoding processes")
    parser.add_argument("--frame-batch", type=int, default=256, help="frames per classifier forward pass")
    parser.add_argument("--profile", default=None, help="profile name for the record")
    parser.add_argument("--config", type=Path, default=None, help="the config file, for the record")


def _check_args(args) -> None:
    for flag in ("interval", "short_side", "crop", "temporal_scale", "position_samples", "num_samples",
                 "samples_per_bin", "epochs", "batch_size", "lr_step", "top_k", "frame_batch"):
        if getattr(args, flag) < 1:
            raise VclrError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.workers < 0 or any(width < 1 for width in args.hidden):
        raise VclrError("--workers must be >= 0 and --hidden widths positive")
    if args.crop > args.short_side:
        raise VclrError(f"--crop {args.crop} is larger than --short-side {args.short_side}")


def _ensure_features(args, wanted: list[str], device: torch.device) -> dict:
    """The snippet features of `wanted` videos: reused from --features when it holds them all and its
    provenance matches this run, else extracted with --classifier (and saved)."""
    settings = {"interval": args.interval, "short_side": args.short_side, "crop": args.crop}
    expected = None
    if args.classifier is not None:
        if args.frames is None:
            raise VclrError("--classifier needs --frames (the packed frames to score)")
        expected = {"classifier": str(args.classifier.resolve()), "classifier_sha256": file_sha256(args.classifier),
                    "frames": str(args.frames.resolve()),
                    "frames_manifest_sha256": file_sha256(args.frames / "manifest.json"), **settings}
    if args.features.exists():
        loaded = load_snippet_features(args.features)
        provenance = loaded["provenance"]
        reference = expected or settings  # without a classifier only the extraction settings can be checked
        differing = [key for key in _FEATURE_KEYS if key in reference and provenance.get(key) != reference[key]]
        absent = sorted(set(wanted) - set(loaded["videos"]))
        if not differing and not absent:
            return loaded
        reason = (f"provenance differs in {', '.join(differing)}" if differing
                  else f"{len(absent)} videos are not in it (e.g. {absent[0]})")
        if expected is None:
            raise VclrError(f"{args.features}: cannot reuse ({reason}) and no --classifier to recompute it")
        print(f"{args.features}: {reason}; recomputing")
    elif expected is None:
        raise VclrError(f"{args.features}: not found; give --classifier and --frames to compute it")
    read_manifest(args.frames)  # a clear error before loading the classifier
    classifier = load_classifier(args.classifier, device)
    compute_snippet_features(args.features, classifier, wanted, args.frames, expected, interval=args.interval,
                             short_side=args.short_side, crop=args.crop, frame_batch=args.frame_batch,
                             device=device, workers=args.workers, progress=print)
    return load_snippet_features(args.features)


BASELINE_DRAWS = 10  # uniform-random proposal sets averaged for the baseline


def random_proposal_baseline(items: list[dict], count: int, seed: int) -> dict:
    """AR@N and AUC (percent) of uniformly random proposals over the same covered time of the same
    videos, `count` per video (what BMN keeps), the mean of BASELINE_DRAWS seeded draws: the trivial
    baseline the learned proposals must beat."""
    ground_truth = {item["video"]: item["ground_truth"] for item in items}
    durations = {item["video"]: item["covered_seconds"] for item in items}
    results = [average_recall_vs_an(ground_truth, uniform_random_proposals(durations, count, seed * 1000 + draw),
                                    max_avg_proposals=100) for draw in range(BASELINE_DRAWS)]
    summary = {f"AR@{n}": 100.0 * float(np.mean([r[f"AR@{n}"] for r in results])) for n in (1, 5, 10, 100)}
    summary["AUC"] = float(np.mean([r["auc"] for r in results]))
    return {**summary, "draws": BASELINE_DRAWS, "proposals_per_video": count}


def main(args: argparse.Namespace) -> int:
    began = time.time()
    _check_args(args)
    device = resolve_device(args.device)
    if device.type == "cuda":  # the same seed gives the same model
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    blocked = read_blocked(args.blocked)
    train_rows = read_split(args.index / f"{args.train_split}.csv")
    eval_rows = read_split(args.index / f"{args.eval_split}.csv")
    wanted = sorted({row.video_id for row in (*train_rows, *eval_rows)
                     if row.status == "found" and row.video_id not in blocked and row.segments})
    if not wanted:
        raise VclrError(f"{args.index}: no found, unblocked video with segments in {args.train_split} or {args.eval_split}")
    loaded = _ensure_features(args, wanted, device)
    features, provenance = loaded["videos"], loaded["provenance"]
    train_used, train_skipped = select_videos(train_rows, blocked, set(features))
    eval_used, eval_skipped = select_videos(eval_rows, blocked, set(features))
    if not eval_used:
        raise VclrError(f"{args.index / (args.eval_split + '.csv')}: no video left to score "
                        f"(skipped: {', '.join(f'{k} {len(v)}' for k, v in eval_skipped.items())})")
    feat_dim = next(iter(features.values()))[0].shape[1]
    train_items = bmn_items(train_used, features, args.temporal_scale, args.position_samples, feat_dim)
    eval_items = bmn_items(eval_used, features, args.temporal_scale, args.position_samples, feat_dim)

    groups = default_groups(feat_dim, args.hidden[0])
    model_config = {"feat_dim": feat_dim, "temporal_scale": args.temporal_scale, "num_samples": args.num_samples,
                    "samples_per_bin": args.samples_per_bin, "boundary_ratio": args.boundary_ratio,
                    "hidden_1d": args.hidden[0], "hidden_2d": args.hidden[1], "hidden_3d": args.hidden[2],
                    "groups": groups}
    cuts = (args.epochs - 1) // args.lr_step
    if cuts >= 2:  # the reference cuts once (step 7 of 9 epochs); more epochs need a larger --lr-step
        print(f"note: --lr-step {args.lr_step} with --epochs {args.epochs} cuts the lr x0.1 {cuts} times "
              f"(to {lr_at_epoch(args.epochs - 1, args.lr, args.lr_step):g} in the last epoch)")
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.work / "bmn_checkpoint.pt"
    features_sha = file_sha256(args.features)
    run_config = {"features_sha256": features_sha, "position_samples": args.position_samples,
                  "train_videos": hashlib.sha256("\n".join(item["video"] for item in train_items).encode()).hexdigest()}
    model = train_bmn(train_items, model_config, checkpoint=checkpoint, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, lr_step=args.lr_step,
                      seed=args.seed, device=device, log=print, run_config=run_config)
    proposals = predict_proposals(model, eval_items, alpha=args.soft_nms_alpha, low=args.soft_nms_low,
                                  high=args.soft_nms_high, top_k=args.top_k, batch_size=args.batch_size,
                                  device=device)
    proposals_path = args.work / f"proposals_{args.eval_split}.json"
    atomic_write_json(proposals_path, proposals_json(proposals, {"used": True, "details": "BMN on snippet scores "
                                                                 "of the fine-tuned TSN (vclr eval localize)"}),
                      indent=None)
    result = average_recall_vs_an({item["video"]: item["ground_truth"] for item in eval_items}, proposals,
                                  max_avg_proposals=100)
    baseline = random_proposal_baseline(eval_items, args.top_k, args.seed)
    scored = sorted(item["video"] for item in eval_items)
    scored_text = "".join(f"{video}\n" for video in scored)
    scored_path = args.work / f"scored_{args.eval_split}_videos.txt"
    atomic_write_text(scored_path, scored_text)
    metrics = {f"AR@{n}": 100.0 * result[f"AR@{n}"] for n in (1, 5, 10, 100)}
    metrics["AUC"] = result["auc"]
    extra = {
        "units": "AR@N and AUC in percent; AN = average proposals per video, 1..100",
        "scored_videos": {"count": len(scored), "sha256": hashlib.sha256(scored_text.encode()).hexdigest(),
                          "sha256_of": "the file: sorted ids, one per line, each ending in a newline",
                          "file": str(scored_path.resolve()), "ground_truths": result["ground_truths"]},
        "skipped": {"eval": {key: len(value) for key, value in eval_skipped.items()},
                    "train": {key: len(value) for key, value in train_skipped.items()}},
        "train_videos": len(train_items),
        "blocked_list": {"path": str(args.blocked.resolve()), "sha256": file_sha256(args.blocked),
                         "ids": len(blocked)},
        "features": {"path": str(args.features.resolve()), "sha256": features_sha, "provenance": provenance},
        "bmn": {**model_config, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                "weight_decay": args.weight_decay, "lr_step": args.lr_step, "position_samples": args.position_samples,
                "checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": file_sha256(checkpoint)},
        "post_processing": {"soft_nms_alpha": args.soft_nms_alpha, "soft_nms_low": args.soft_nms_low,
                            "soft_nms_high": args.soft_nms_high, "top_k": args.top_k},
        "proposals": {"path": str(proposals_path.resolve()), "sha256": file_sha256(proposals_path)},
        "tiou_thresholds": [round(float(t), 4) for t in TIOU_THRESHOLDS],
        "baseline_uniform_random": baseline,
        "curve": {"average_proposals": result["average_proposals"].tolist(),
                  "average_recall": result["average_recall"].tolist()},
        "device": str(device),
    }
    classifier = args.classifier if args.classifier is not None else provenance.get("classifier")
    if classifier is not None and not Path(classifier).exists():
        classifier = None  # moved since the features were made: the features' sha256 still names it
    _write_metrics(args.out, task="localize", dataset="anet", split=args.eval_split,
                   protocol="bmn-ar-an", metrics=metrics, seed=args.seed, profile=args.profile,
                   config_path=args.config, checkpoint=classifier, index_dir=args.index,
                   wall_time_s=time.time() - began, extra=extra)
    print(f"{len(scored)} {args.eval_split} videos scored ({', '.join(f'{k} {len(v)}' for k, v in eval_skipped.items())} "
          f"skipped): " + ", ".join(f"{key} {value:.2f}" for key, value in metrics.items()) + f" -> {args.out}")
    return 0
