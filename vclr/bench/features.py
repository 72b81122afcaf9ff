"""`vclr bench features`: videos/s of frozen-backbone feature extraction (vclr.evaluate.features).

The protocol's shapes: ResNet-50, 30 frames per video, centre crop 224 of 340x256 frames, the 30
frame features averaged; bf16 autocast on CUDA, fp32 on CPU, as extract_features runs them. Measured
on synthetic DECODED frames (uint8, so no JPEG decoding and no data files):
  forward   the backbone alone on ready, normalised [videos*30, 3, 224, 224] batches on the device:
            the ceiling;
  path      the per-frame path (extract_features_per_frame) from decoded uint8 frames: its DataLoader
            (batch_size // num_frames videos per batch, `workers` processes) applying center_crop +
            ImageNet normalisation per video on the CPU, the copy to the device, the forward and the
            per-video mean;
  crops     extract_features' crop step from decoded uint8 frames: the batch's frames copied to the
            device as they are and cut there by eval_crops_sliced, forward, mean.
The three alternate round by round. With --frames/--index, or --generate N (N videos of packed JPEG
frames written here with PIL: no PyAV needed, so it runs on a GPU machine without it), `end_to_end`
also times the two extraction functions on packed frames, alternating round by round: `batched`
(extract_features with prefetch=1: shard reads, one decode_jpegs per batch - nvjpeg on CUDA -,
eval_crops, forward, the next batch prepared in a background thread while the forward runs),
`batched_no_prefetch` (the same with prefetch=0: each batch prepared between forward passes) and
`per_frame` (extract_features_per_frame: each frame decoded alone, center_crop per video).
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vclr.data.batch_augment import eval_crops_sliced
from vclr.errors import VclrError
from vclr.evaluate.features import _eval_transform
from vclr.io_utils import atomic_write_json
from vclr.models.backbones import BACKBONES, build_backbone
from vclr.train.distributed import resolve_device

FRAME_SIZE = (256, 340)  # (height, width) of the paper's extracted frames
DISTINCT_VIDEOS = 8  # synthetic videos cycle over this many tensors, so memory stays small


class DecodedVideos(torch.utils.data.Dataset):
    """(transform(uint8 frames [T,3,H,W]), label, video_id) like VideoFrameDataset, frames already decoded."""

    def __init__(self, videos: int, num_frames: int, size: tuple[int, int], transform, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.pool = [torch.randint(0, 256, (num_frames, 3, *size), dtype=torch.uint8, generator=generator)
                     for _ in range(min(videos, DISTINCT_VIDEOS))]
        self.videos, self.transform = videos, transform

    def __len__(self) -> int:
        return self.videos

    def __getitem__(self, index: int):
        return self.transform(self.pool[index % len(self.pool)]), 0, f"v{index}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _forward_videos(backbone, clips: torch.Tensor, num_frames: int, device: torch.device) -> torch.Tensor:
    """extract_features' per-batch step: [V,T,3,h,w] -> [V,D] (bf16 autocast on CUDA, mean in fp32)."""
    videos = clips.shape[0]
    clips = clips.to(device, non_blocking=True).flatten(0, 1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        output = backbone(clips)
    return output.float().view(videos, num_frames, -1).mean(1).cpu()


def time_forward(backbone, videos: int, videos_per_batch: int, num_frames: int, crop: int,
                 device: torch.device, seed: int = 0) -> float:
    """Seconds for `videos` videos through the backbone alone, inputs already on the device."""
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randn(videos_per_batch, num_frames, 3, crop, crop, generator=generator).to(device)
    _synchronize(device)
    started = time.perf_counter()
    for start in range(0, videos, videos_per_batch):
        _forward_videos(backbone, batch[: min(videos_per_batch, videos - start)], num_frames, device)
    _synchronize(device)
    return time.perf_counter() - started


def time_path(backbone, dataset: DecodedVideos, videos_per_batch: int, num_frames: int, device: torch.device,
              workers: int) -> float:
    """Seconds for the whole dataset through extract_features' loader + forward loop."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=videos_per_batch, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    _synchronize(device)
    started = time.perf_counter()
    for clips, _, _ in loader:
        _forward_videos(backbone, clips, num_frames, device)
    _synchronize(device)
    return time.perf_counter() - started


def time_crops(backbone, dataset: DecodedVideos, videos_per_batch: int, num_frames: int, crop: int,
               device: torch.device, workers: int) -> float:
    """Seconds for the whole dataset (decoded uint8 frames, identity transform) through eval_crops_sliced
    on the device + forward: extract_features' step after decoding."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=videos_per_batch, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    _synchronize(device)
    started = time.perf_counter()
    for frames, _, _ in loader:
        x = eval_crops_sliced(frames.to(device, non_blocking=True).flatten(0, 1), crop)
        _forward_videos(backbone, x.unflatten(0, (frames.shape[0], num_frames)), num_frames, device)
    _synchronize(device)
    return time.perf_counter() - started


def write_packed_videos(frames_dir: Path, videos: int, frames_per_video: int, size: tuple[int, int],
                        quality: int = 90, seed: int = 0) -> list:
    """`videos` videos in one shard + manifest.json (vclr.data.packed's format); returns their IndexRows.

    Frames are smooth colour fields with mild noise, so their JPEGs are about the size of real video
    frames (not the much larger, slower to decode JPEGs of pure noise). Distinct frames come from a
    pool of `frames_per_video` images; decoding costs the same whichever bytes repeat.
    """
    import numpy as np
    from PIL import Image

    from vclr.data.index import IndexRow
    from vclr.data.packed import FORMAT, ShardVideo, write_shard

    rng = np.random.default_rng(seed)
    height, width = size
    pool = []
    for _ in range(frames_per_video):
        coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, 6, 8)).astype(np.float32))
        smooth = torch.nn.functional.interpolate(coarse, size=size, mode="bicubic", align_corners=False)[0]
        image = (smooth.permute(1, 2, 0).numpy() + rng.normal(0, 6, (height, width, 3))).clip(0, 255)
        buffer = io.BytesIO()
        Image.fromarray(image.astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
        pool.append(buffer.getvalue())
    keys = [f"video{i:05d}" for i in range(videos)]
    shard = "shards/00000.vpk"
    write_shard(frames_dir / shard, [ShardVideo(key, width, height, frames_per_video, iter(pool)) for key in keys])
    entry = {"shard": shard, "frames": frames_per_video, "decoded": frames_per_video, "width": width,
             "height": height}
    atomic_write_json(frames_dir / "manifest.json", {
        "format": FORMAT, "dataset": "bench", "settings": {"quality": quality}, "shards": [shard],
        "videos": dict.fromkeys(keys, entry), "failed": {}})
    return [IndexRow(key, 0, "bench", "found", frames_per_video, shard, None, []) for key in keys]


def time_end_to_end(backbone, rows: list, frames_dir: Path, num_frames: int, crop: int, batch_size: int,
                    device: torch.device, workers: int, rounds: int = 1, log=print) -> dict:
    """extract_features (`batched`; `batched_no_prefetch` with prefetch=0) and extract_features_per_frame
    (`per_frame`) on packed JPEG frames, alternating for `rounds` rounds after one untimed warm-up batch
    each; the top-level videos_per_s is the median of the one `vclr eval features` runs on `device`
    (extract_features' default prefetch: batched on CUDA, batched_no_prefetch on a CPU)."""
    from vclr.data.packed import PackedFrames
    from vclr.evaluate.features import default_prefetch, extract_features, extract_features_per_frame

    rows = [row for row in rows if row.status == "found"]
    if not rows:
        raise VclrError(f"{frames_dir}: no found videos to time")
    frames = PackedFrames(frames_dir)
    paths = {"batched": functools.partial(extract_features, prefetch=1),
             "batched_no_prefetch": functools.partial(extract_features, prefetch=0),
             "per_frame": extract_features_per_frame}
    warm = rows[: max(1, batch_size // num_frames)]
    for extract in paths.values():
        extract(backbone, warm, frames, num_frames, crop, batch_size, device, 0)
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for round_index in range(rounds):
        for name, extract in paths.items():
            _synchronize(device)
            started = time.perf_counter()
            features, _, _ = extract(backbone, rows, frames, num_frames, crop, batch_size, device, workers)
            _synchronize(device)
            seconds[name].append(time.perf_counter() - started)
        log(f"  end to end round {round_index + 1}/{rounds}: "
            + ", ".join(f"{name} {len(features) / values[-1]:.2f}" for name, values in seconds.items())
            + " videos/s")
    first = rows[0].video_id
    jpeg_bytes = statistics.mean(len(frames.read_jpeg(first, i)) for i in range(frames.num_frames(first)))
    result = {name: {"videos_per_s": len(features) / statistics.median(values),
                     "rounds": [len(features) / value for value in values]} for name, values in seconds.items()}
    default = "batched" if default_prefetch(device) else "batched_no_prefetch"
    return {"videos": len(features), "seconds": statistics.median(seconds[default]), "default_path": default,
            "videos_per_s": result[default]["videos_per_s"], **result,
            "speedup": result[default]["videos_per_s"] / result["per_frame"]["videos_per_s"],
            "prefetch_speedup": result["batched"]["videos_per_s"] / result["batched_no_prefetch"]["videos_per_s"],
            "workers": workers, "frame_width_height": list(frames.size(first)), "mean_jpeg_bytes": jpeg_bytes}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--backbone", default="resnet50", choices=BACKBONES)
    parser.add_argument("--num-frames", type=int, default=30)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--frame-size", default="256x340", help="HxW of the synthetic decoded frames")
    parser.add_argument("--batch-size", type=int, default=240, help="frames per forward pass (as vclr eval features)")
    parser.add_argument("--videos", type=int, help="synthetic videos per round (default: 256 cuda, 4 cpu)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int,
                        help="DataLoader processes (default: min(8, cores) on cuda, 0 on cpu)")
    parser.add_argument("--frames", type=Path, help="packed-frames directory for the end-to-end run")
    parser.add_argument("--index", type=Path, help="split CSV for the end-to-end run (with --frames)")
    parser.add_argument("--generate", type=int, default=0,
                        help="write this many synthetic videos of packed JPEG frames (--frame-size, twice "
                             "--num-frames frames each) for the end-to-end run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", type=Path)


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    try:
        size = tuple(int(side) for side in args.frame_size.lower().split("x"))
    except ValueError:
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise VclrError(f"--frame-size {args.frame_size!r}: expected HxW, e.g. 256x340")
    videos = args.videos or (256 if on_cuda else 4)
    for name in ("num_frames", "crop", "batch_size", "rounds"):
        if getattr(args, name) < 1:
            raise VclrError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if videos < 1:
        raise VclrError(f"--videos must be positive, got {videos}")
    if (args.frames is None) != (args.index is None):
        raise VclrError("--frames and --index: give both or neither")
    if args.frames is not None and args.generate:
        raise VclrError("--generate makes its own data: not with --frames/--index")
    workers = args.workers if args.workers is not None else (min(8, os.cpu_count() or 1) if on_cuda else 0)
    videos_per_batch = max(1, args.batch_size // args.num_frames)
    where = torch.cuda.get_device_name(device) if on_cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {device} ({where}), torch {torch.__version__}; {args.backbone}, {args.num_frames} frames "
          f"of {size[0]}x{size[1]}, crop {args.crop}, {videos_per_batch} videos per batch, {videos} videos "
          f"per round, {workers} workers, {'bf16 autocast' if on_cuda else 'fp32'}")

    torch.manual_seed(args.seed)
    backbone, _ = build_backbone(args.backbone)
    backbone = backbone.to(device).eval()
    dataset = DecodedVideos(videos, args.num_frames, size, _eval_transform(args.crop), args.seed)
    decoded = DecodedVideos(videos, args.num_frames, size, lambda frames: frames, args.seed)
    warm_s = time_forward(backbone, videos_per_batch, videos_per_batch, args.num_frames, args.crop, device)
    print(f"  warm-up batch {warm_s:.1f} s")
    rates: dict[str, list[float]] = {"forward": [], "path": [], "crops": []}
    for round_index in range(args.rounds):
        rates["forward"].append(videos / time_forward(backbone, videos, videos_per_batch, args.num_frames,
                                                      args.crop, device))
        rates["path"].append(videos / time_path(backbone, dataset, videos_per_batch, args.num_frames, device,
                                                workers))
        rates["crops"].append(videos / time_crops(backbone, decoded, videos_per_batch, args.num_frames, args.crop,
                                                  device, workers))
        print(f"  round {round_index + 1}/{args.rounds}: forward {rates['forward'][-1]:.2f}, "
              f"path {rates['path'][-1]:.2f}, crops {rates['crops'][-1]:.2f} videos/s")
    result = {
        "date": time.strftime("%Y-%m-%d"), "device": str(device), "device_name": where, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "backbone": args.backbone, "num_frames": args.num_frames, "crop": args.crop, "frame_height_width": list(size),
        "videos_per_batch": videos_per_batch, "videos_per_round": videos, "rounds": args.rounds,
        "workers": workers, "precision": "bf16 autocast" if on_cuda else "fp32",
        "synthetic": {mode: {"videos_per_s": statistics.median(values), "rounds": values,
                             "frames_per_s": statistics.median(values) * args.num_frames}
                      for mode, values in rates.items()},
        "end_to_end": None,
    }
    for mode, entry in result["synthetic"].items():
        print(f"{mode:8s} {entry['videos_per_s']:9.2f} videos/s ({entry['frames_per_s']:.0f} frames/s; median of "
              f"{args.rounds})")
    if args.frames is not None or args.generate:
        with tempfile.TemporaryDirectory(prefix="vclr-bench-features-") as tmp:
            if args.generate:
                frames_dir = Path(tmp) / "frames"
                started = time.perf_counter()
                rows = write_packed_videos(frames_dir, args.generate, 2 * args.num_frames, size, seed=args.seed)
                print(f"end to end: wrote {args.generate} videos of packed JPEGs in {time.perf_counter() - started:.1f} s")
            else:
                from vclr.data.index import read_split

                rows, frames_dir = read_split(args.index), args.frames
            e2e = time_end_to_end(backbone, rows, frames_dir, args.num_frames, args.crop, args.batch_size,
                                  device, workers, args.rounds)
        e2e["fraction_of_path"] = e2e["videos_per_s"] / result["synthetic"]["path"]["videos_per_s"]
        result["end_to_end"] = e2e
        print(f"end to end (packed JPEGs, {e2e['frame_width_height'][0]}x{e2e['frame_width_height'][1]} WxH, "
              f"{e2e['videos']} videos, median of {args.rounds}): batched {e2e['batched']['videos_per_s']:.2f}, "
              f"without prefetching {e2e['batched_no_prefetch']['videos_per_s']:.2f} (prefetch "
              f"x{e2e['prefetch_speedup']:.2f}), per-frame {e2e['per_frame']['videos_per_s']:.2f} videos/s; the "
              f"default on {device.type} ({e2e['default_path']}) x{e2e['speedup']:.2f} the per-frame path, "
              f"{e2e['fraction_of_path']:.2f} of the decoded-frames per-frame path")
    if args.out_json:
        atomic_write_json(args.out_json, result)
    return 0
