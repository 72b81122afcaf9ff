"""`vclr bench reads`: random frame reads from packed shards against the same frames as loose JPEGs.

Same frames, same random access pattern, one core, torch single-threaded, the two layouts measured
alternately round by round. Page cache cannot be dropped here (no root over the shared machine's
caches), so both sides are read WARM: after a first untimed pass, every byte is in memory, and the
numbers compare the per-read software cost (open/pread/close vs one pread on an open shard), not disk
seeks. "bytes" = the JPEG bytes only; "decoded" = bytes + torchvision decode_jpeg to a [3,H,W] tensor.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from vclr.bench.extract import pin_to_one_core
from vclr.data.packed import (
    FORMAT,
    PackedFrames,
    ShardVideo,
    decode_jpeg_bytes,
    write_shard,
)
from vclr.io_utils import atomic_write_json


def synthetic_jpegs(
    count: int, width: int, height: int, quality: int, seed: int = 0
) -> list[bytes]:
    """Distinct frames with smooth texture and noise, so sizes resemble real video frames."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(count):
        base = np.stack(
            [
                (cols * 3 + i * 5) % 256,
                (rows * 2 + i * 3) % 256,
                ((cols + rows) // 2 + i * 7) % 256,
            ],
            -1,
        )
        image = np.clip(base + rng.integers(0, 12, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        frames.append(buffer.getvalue())
    return frames


def build_layouts(
    root: Path, videos: int, frames: int, shards: int, jpegs: list[bytes]
) -> tuple[Path, Path]:
    """The same frames as packed shards (root/packed) and as loose files (root/loose/<key>/NNNNN.jpg)."""
    keys = [f"video{v:05d}" for v in range(videos)]
    frame_of = lambda v, i: jpegs[(v * 7 + i) % len(jpegs)]
    packed, loose = root / "packed", root / "loose"
    entries, names = {}, []
    for s in range(shards):
        name = f"shards/{s:05d}.vpk"
        mine = [v for v in range(videos) if v % shards == s]
        write_shard(
            packed / name,
            [
                ShardVideo(
                    keys[v], 0, 0, frames, (frame_of(v, i) for i in range(frames))
                )
                for v in mine
            ],
        )
        names.append(name)
        entries.update(
            {
                keys[v]: {
                    "shard": name,
                    "frames": frames,
                    "decoded": frames,
                    "width": 0,
                    "height": 0,
                }
                for v in mine
            }
        )
    manifest = {
        "format": FORMAT,
        "dataset": "bench",
        "settings": {},
        "shards": names,
        "videos": entries,
        "failed": {},
    }
    atomic_write_json(packed / "manifest.json", manifest)
    for v, key in enumerate(keys):
        (loose / key).mkdir(parents=True)
        for i in range(frames):
            (loose / key / f"{i + 1:05d}.jpg").write_bytes(frame_of(v, i))
    return packed, loose


def read_packed(frames_dir: Path, reads: list[tuple[str, int]], decode: bool) -> float:
    """Seconds for the reads; the reader is created inside (shard opening is part of the cost)."""
    start = time.perf_counter()
    frames = PackedFrames(frames_dir)
    for key, i in reads:
        data = frames.read_jpeg(key, i)
        if decode:
            decode_jpeg_bytes(data, key)
    frames.close()
    return time.perf_counter() - start


def read_loose(loose_dir: Path, reads: list[tuple[str, int]], decode: bool) -> float:
    start = time.perf_counter()
    for key, i in reads:
        with open(loose_dir / key / f"{i + 1:05d}.jpg", "rb") as handle:
            data = handle.read()
        if decode:
            decode_jpeg_bytes(data, key)
    return time.perf_counter() - start


def benchmark(
    videos: int, frames: int, shards: int, reads_per_round: int, rounds: int, root: Path
) -> dict:
    jpegs = synthetic_jpegs(64, 340, 256, 90)
    packed, loose = build_layouts(root, videos, frames, shards, jpegs)
    rng = np.random.default_rng(0)
    keys = [f"video{v:05d}" for v in range(videos)]
    reads = [
        (keys[v], int(i))
        for v, i in zip(
            rng.integers(0, videos, reads_per_round),
            rng.integers(0, frames, reads_per_round),
        )
    ]
    for decode in (
        False,
        True,
    ):  # warm both: every byte in the page cache, decoder loaded
        read_packed(packed, reads, decode), read_loose(loose, reads, decode)
    results = {}
    for mode, decode in (("bytes", False), ("decoded", True)):
        packed_rates, loose_rates = [], []
        for r in range(rounds):
            sides = [("packed", read_packed, packed), ("loose", read_loose, loose)]
            for name, fn, directory in sides if r % 2 == 0 else sides[::-1]:
                rate = len(reads) / fn(directory, reads, decode)
                (packed_rates if name == "packed" else loose_rates).append(rate)
        ratios = [p / lo for p, lo in zip(packed_rates, loose_rates)]
        results[mode] = {
            "packed_frames_per_s": statistics.median(packed_rates),
            "loose_frames_per_s": statistics.median(loose_rates),
            "ratio_packed_over_loose": {
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
            },
        }
    return {
        "videos": videos,
        "frames_per_video": frames,
        "shards": shards,
        "frame_size": "340x256",
        "mean_jpeg_bytes": float(np.mean([len(j) for j in jpegs])),
        "reads_per_round": reads_per_round,
        "rounds": rounds,
        "cache": "warm (both layouts read once untimed first; page cache cannot be dropped here)",
        **results,
    }


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--videos", type=int, default=200, help="videos in the synthetic data set"
    )
    parser.add_argument("--frames", type=int, default=60, help="frames per video")
    parser.add_argument(
        "--shards", type=int, default=4, help="shard files for the packed layout"
    )
    parser.add_argument(
        "--reads", type=int, default=5000, help="random reads per round"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternating rounds per mode"
    )
    parser.add_argument("--out-json", type=Path, help="write the results here")
    parser.add_argument(
        "--tmp",
        type=Path,
        help="directory for the temporary data (default: system temp)",
    )


def main(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    core = pin_to_one_core()
    with tempfile.TemporaryDirectory(prefix="vclr-bench-reads-", dir=args.tmp) as tmp:
        result = benchmark(
            args.videos, args.frames, args.shards, args.reads, args.rounds, Path(tmp)
        )
    result.update(
        date=time.strftime("%Y-%m-%d"),
        core=core,
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
    )
    print(
        f"{args.videos} videos x {args.frames} frames (340x256, ~{result['mean_jpeg_bytes']:.0f} B/JPEG), "
        f"{args.reads} random reads/round, {args.rounds} rounds, 1 core, warm cache"
    )
    for mode in ("bytes", "decoded"):
        m = result[mode]
        ratio = m["ratio_packed_over_loose"]
        print(
            f"{mode:8}: packed {m['packed_frames_per_s']:9.0f} frames/s   loose {m['loose_frames_per_s']:9.0f} frames/s   "
            f"packed/loose median {ratio['median']:.2f} (min {ratio['min']:.2f}, max {ratio['max']:.2f})"
        )
    if args.out_json:
        atomic_write_json(args.out_json, result)
    return 0
