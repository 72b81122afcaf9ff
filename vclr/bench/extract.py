"""`vclr bench extract`: our extraction's frames/s per core against the ffmpeg command line.

Both sides do the same job per video - decode, resize to the same size, JPEG-encode, write the frames
to disk - pinned to ONE core, measured alternately video by video in the same run (the machine is
shared and noisy), so the ratio is what to read. CPU time (user+sys, ffmpeg's taken from the child's
rusage) is the per-core measure; wall time on the pinned core is reported too.
"""

from __future__ import annotations

import argparse
import fractions
import os
import platform
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from vclr.data.extract import ExtractSettings, extract_jpegs, find_videos, output_size
from vclr.data.packed import ShardVideo, write_shard
from vclr.errors import VclrError
from vclr.io_utils import atomic_write_json


def make_synthetic_videos(
    directory: Path, count: int = 3, seconds: float = 10.0
) -> list[Path]:
    """340x256 30 fps H.264 MP4s with moving texture and noise (so the codecs have real work)."""
    import av

    directory.mkdir(parents=True, exist_ok=True)
    rows, cols = np.mgrid[0:256, 0:340]
    paths = []
    for v in range(count):
        path = directory / f"synthetic_{v}.mp4"
        rng = np.random.default_rng(v)
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=30)
            stream.width, stream.height, stream.pix_fmt = 340, 256, "yuv420p"
            for t in range(int(seconds * 30)):
                base = np.stack(
                    [
                        (cols * 3 + t * (5 + v)) % 256,
                        (rows * 2 + t * 3) % 256,
                        ((cols + rows) // 2 + t * 7) % 256,
                    ],
                    -1,
                )
                image = np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(
                    np.uint8
                )
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts, frame.time_base = t, fractions.Fraction(1, 30)
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        paths.append(path)
    return paths


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_ours(video: Path, settings: ExtractSettings, out_dir: Path) -> dict:
    """One video through our extraction path (decode, resample, resize, encode, write one part file)."""
    cpu, wall = _cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
    width, height, decoded, jpegs = extract_jpegs(video, settings)
    write_shard(
        out_dir / f"{video.stem}.vpk",
        [ShardVideo(video.stem, width, height, decoded, jpegs)],
    )
    return {
        "frames": len(jpegs),
        "cpu_s": _cpu_seconds(resource.RUSAGE_SELF) - cpu,
        "wall_s": time.perf_counter() - wall,
        "bytes": sum(map(len, jpegs)),
    }


def ffmpeg_command(
    ffmpeg: str, video: Path, width: int, height: int, qscale: int, out_dir: Path
) -> list[str]:
    # -threads before -i: decoder; -filter_threads: the scale filter; -threads after: the encoder.
    return [
        ffmpeg, "-nostdin", "-v", "error", "-threads", "1", "-i", str(video), "-filter_threads", "1",
        "-vf", f"scale={width}:{height}", "-threads", "1", "-q:v", str(qscale), str(out_dir / "%05d.jpg"),
    ]  # fmt: skip


def run_ffmpeg(command: list[str], out_dir: Path) -> dict:
    cpu, wall = _cpu_seconds(resource.RUSAGE_CHILDREN), time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - wall
    if result.returncode != 0:
        raise VclrError(
            f"ffmpeg failed on {command[7]}: {result.stderr.strip()[-500:]}"
        )
    files = list(out_dir.iterdir())
    return {
        "frames": len(files),
        "cpu_s": _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu,
        "wall_s": elapsed,
        "bytes": sum(p.stat().st_size for p in files),
    }


def _video_size(video: Path) -> tuple[int, int]:
    import av

    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        return stream.codec_context.width, stream.codec_context.height


def pin_to_one_core() -> int:
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})  # inherited by the ffmpeg child processes
    return core


def summarise(runs: list[dict]) -> dict:
    frames = sum(r["frames"] for r in runs)
    return {
        "frames": frames,
        "frames_per_cpu_s": frames / sum(r["cpu_s"] for r in runs),
        "frames_per_wall_s": frames / sum(r["wall_s"] for r in runs),
        "bytes_per_frame": sum(r["bytes"] for r in runs) / frames,
    }


def benchmark(
    videos: list[Path],
    short_side: int,
    quality: int,
    qscale: int,
    rounds: int,
    work: Path,
) -> dict:
    ffmpeg = shutil.which("ffmpeg")
    settings = ExtractSettings(
        fps=None,
        short_side=short_side,
        size=None,
        num_frames=None,
        quality=quality,
        shards=1,
    )
    ours, theirs, ratios = [], [], []
    for round_index in range(rounds):
        for video in videos:
            # Alternate which side goes first, so drifting machine load hits both alike.
            order = ("ours", "ffmpeg") if round_index % 2 == 0 else ("ffmpeg", "ours")
            pair = {}
            for side in order:
                out_dir = Path(tempfile.mkdtemp(dir=work))
                if side == "ours":
                    pair[side] = run_ours(video, settings, out_dir)
                elif ffmpeg:
                    width, height = output_size(*_video_size(video), settings)
                    pair[side] = run_ffmpeg(
                        ffmpeg_command(ffmpeg, video, width, height, qscale, out_dir),
                        out_dir,
                    )
                shutil.rmtree(out_dir)
            ours.append(pair["ours"])
            if "ffmpeg" in pair:
                theirs.append(pair["ffmpeg"])
                if pair["ffmpeg"]["frames"] != pair["ours"]["frames"]:
                    raise VclrError(
                        f"{video}: ffmpeg wrote {pair['ffmpeg']['frames']} frames, we {pair['ours']['frames']}"
                    )
                ratios.append(
                    (pair["ours"]["frames"] / pair["ours"]["cpu_s"])
                    / (pair["ffmpeg"]["frames"] / pair["ffmpeg"]["cpu_s"])
                )
    example = videos[0]
    result = {
        "videos": [str(v) for v in videos],
        "rounds": rounds,
        "ours": {**summarise(ours), "settings": settings.to_json()},
        "ffmpeg": None,
    }
    if ffmpeg:
        width, height = output_size(*_video_size(example), settings)
        result["ffmpeg"] = {
            **summarise(theirs),
            "binary": ffmpeg,
            "version": subprocess.run(
                [ffmpeg, "-version"], capture_output=True, text=True, check=True
            ).stdout.splitlines()[0],
            "command": " ".join(
                ffmpeg_command("ffmpeg", Path("V"), width, height, qscale, Path("DIR"))
            ),
        }
        result["ratio_cpu_ours_over_ffmpeg"] = {
            "median_per_video": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "overall": result["ours"]["frames_per_cpu_s"]
            / result["ffmpeg"]["frames_per_cpu_s"],
        }
        result["ratio_wall_ours_over_ffmpeg"] = (
            result["ours"]["frames_per_wall_s"] / result["ffmpeg"]["frames_per_wall_s"]
        )
    return result


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--videos",
        type=Path,
        help="videos to use (default: generate 3 synthetic 340x256 10 s MP4s)",
    )
    parser.add_argument("--out-json", type=Path, help="write the results here")
    parser.add_argument(
        "--short-side", type=int, default=128, help="output short side for both sides"
    )
    parser.add_argument(
        "--quality", type=int, default=90, help="our JPEG quality (1..100)"
    )
    parser.add_argument(
        "--ffmpeg-q",
        type=int,
        default=2,
        help="ffmpeg -q:v (2 = its best usual setting)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="passes over the videos")


def main(args: argparse.Namespace) -> int:
    core = pin_to_one_core()
    with tempfile.TemporaryDirectory(prefix="vclr-bench-extract-") as tmp:
        work = Path(tmp)
        if args.videos:
            videos = list(find_videos(args.videos).values())
            if not videos:
                raise VclrError(f"{args.videos}: no videos found")
        else:
            print("generating 3 synthetic 340x256 30 fps 10 s H.264 videos ...")
            videos = make_synthetic_videos(work / "videos")
        result = benchmark(
            videos, args.short_side, args.quality, args.ffmpeg_q, args.rounds, work
        )
    result.update(
        date=time.strftime("%Y-%m-%d"),
        core=core,
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
    )
    ours = result["ours"]
    print(
        f"ours   : {ours['frames_per_cpu_s']:8.1f} frames/CPU-s  {ours['frames_per_wall_s']:8.1f} frames/s wall "
        f"(1 core)  {ours['bytes_per_frame']:7.0f} B/frame (quality {args.quality})"
    )
    if result["ffmpeg"] is None:
        print(
            "ffmpeg : NOT FOUND on PATH - no comparison made (install it: apt-get install -y ffmpeg)"
        )
    else:
        theirs, ratio = result["ffmpeg"], result["ratio_cpu_ours_over_ffmpeg"]
        print(
            f"ffmpeg : {theirs['frames_per_cpu_s']:8.1f} frames/CPU-s  {theirs['frames_per_wall_s']:8.1f} frames/s wall "
            f"(1 core)  {theirs['bytes_per_frame']:7.0f} B/frame (-q:v {args.ffmpeg_q})"
        )
        print(
            f"ours/ffmpeg per CPU-second: median {ratio['median_per_video']:.2f} "
            f"(min {ratio['min']:.2f}, max {ratio['max']:.2f}); wall: {result['ratio_wall_ours_over_ffmpeg']:.2f}"
        )
        print(f"ffmpeg command: {theirs['command']}  ({theirs['version']})")
    if args.out_json:
        atomic_write_json(args.out_json, result)
    return 0
