"""`vclr bench filecount`: how many files DVC would track for the paper's Kinetics-400 frames.

A computation, not a timing: one extracted dataset directory holds manifest.json plus at most
`--shards` shard files (empty hash buckets write no shard), whatever the number of videos. DVC tracks
each file of a directory output (plus one `.dir` listing object in its cache).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vclr.errors import VclrError

LIMIT = 10_000
# spec/datasets.md: Kinetics-400 CSV rows (an upper bound on the videos one can have)
K400_SPLITS = {"train": 246_534, "val": 19_906, "test": 39_805}


def expected_nonempty_shards(videos: int, shards: int) -> float:
    """Hash buckets that receive at least one of `videos` keys (uniform hash)."""
    return shards * (1 - (1 - 1 / shards) ** videos)


def count(
    videos: int, shards: int, frames_per_video: int, bytes_per_frame: int
) -> dict:
    shard_files = min(shards, videos)
    return {
        "videos": videos,
        "shards_setting": shards,
        "shard_files_max": shard_files,
        "shard_files_expected": expected_nonempty_shards(videos, shards),
        "dvc_files": shard_files + 1,  # + manifest.json
        "dvc_cache_objects": shard_files + 2,  # + the directory's .dir listing
        "loose_jpeg_files": videos * frames_per_video,
        "videos_per_shard": videos / shards,
        "shard_gib_estimate": videos
        / shards
        * frames_per_video
        * bytes_per_frame
        / 2**30,
    }


def config_shards(config_path: Path) -> dict[str, int]:
    """`extract.shards` of every dataset in a profile config (e.g. config/paper.yaml)."""
    import yaml

    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        return {
            name: int(d["extract"]["shards"]) for name, d in config["datasets"].items()
        }
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as error:
        raise VclrError(
            f"{config_path}: cannot read datasets.*.extract.shards ({error})"
        ) from None


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shards",
        type=int,
        help="K400 --shards setting (default: from --config, else 1024)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="profile config whose datasets.k400.extract.shards to use",
    )
    parser.add_argument(
        "--frames-per-video",
        type=int,
        default=300,
        help="paper: 30 fps x 10 s, forced to 300",
    )
    parser.add_argument(
        "--bytes-per-frame",
        type=int,
        default=20_000,
        help="assumed mean JPEG size (340x256, q95)",
    )
    parser.add_argument("--out-json", type=Path, help="write the results here")


def main(args: argparse.Namespace) -> int:
    all_shards = config_shards(args.config) if args.config else {}
    shards = args.shards or all_shards.get("k400") or 1024
    videos = sum(K400_SPLITS.values())
    result = count(videos, shards, args.frames_per_video, args.bytes_per_frame)
    split_text = " + ".join(f"{n:,} {s}" for s, n in K400_SPLITS.items())
    print(f"Kinetics-400 videos (CSV rows, an upper bound): {split_text} = {videos:,}")
    print(
        f"one frames directory for all splits, --shards {shards}: videos per shard = {videos:,} / {shards} = {result['videos_per_shard']:.1f}"
    )
    print(
        f"shard files <= min(shards, videos) = {result['shard_files_max']:,} "
        f"(expected non-empty buckets {result['shard_files_expected']:.1f})"
    )
    print(
        f"files DVC tracks = {result['shard_files_max']:,} shards + 1 manifest.json = {result['dvc_files']:,}  (limit {LIMIT:,})"
    )
    print(
        f"for comparison, loose JPEGs: {videos:,} x {args.frames_per_video} = {result['loose_jpeg_files']:,} files; "
        f"shard size ~ {result['videos_per_shard']:.0f} x {args.frames_per_video} x {args.bytes_per_frame:,} B "
        f"= {result['shard_gib_estimate']:.2f} GiB (assumed {args.bytes_per_frame:,} B/frame)"
    )
    if all_shards:
        total = sum(s + 1 for s in all_shards.values())
        parts = " + ".join(f"{name} {s}+1" for name, s in all_shards.items())
        print(f"all datasets of {args.config}: {parts} = {total:,} files")
        result["all_datasets"] = {
            "config": str(args.config),
            "shards": all_shards,
            "dvc_files": total,
        }
    ok = result["dvc_files"] <= LIMIT and (
        not all_shards or result["all_datasets"]["dvc_files"] <= LIMIT
    )
    print("OK: within the limit" if ok else f"TOO MANY FILES: over {LIMIT:,}")
    if args.out_json:
        from vclr.io_utils import atomic_write_json

        atomic_write_json(args.out_json, {**result, "limit": LIMIT, "ok": ok})
    return 0 if ok else 1
