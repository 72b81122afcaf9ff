"""`vclr data extract`: decode videos into packed JPEG frame shards (contract 2).

Resumable and atomic. Each finished video first becomes a one-video part file in `<WORK>/parts/`
(or a failure record in `<WORK>/failed/`), written atomically, so a killed run loses at most the videos
in flight. A shard (videos assigned by a stable hash of the key, so adding videos never moves others)
is packed into `<WORK>/shards/` once all its videos are done, reusing the frames already packed in it;
at the end the packed shards move into `<FRAMES>/shards/` and manifest.json is written last. The state
on disk - shards, parts, failure records - is the only truth a rerun needs. <WORK> defaults to
`<FRAMES>/.work`; the pipeline puts it OUTSIDE <FRAMES> (`--work`), because Snakemake and DVC delete
a stage's output folder before rerunning it and a killed extraction must resume, not restart.

Frames are resized by swscale (bicubic, as `ffmpeg -vf scale`) straight to full-range YCbCr and
JPEG-encoded by Pillow (libjpeg-turbo) from YCbCr, skipping the RGB round trip: per core this measured
faster than Pillow from RGB and as fast as FFmpeg's mjpeg encoder, and unlike the latter it takes the
usual 1-100 quality scale (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import fractions
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter
from PIL import Image

from vclr.data.packed import (
    FORMAT,
    ShardVideo,
    iter_shard_jpegs,
    read_manifest,
    read_shard_videos,
    write_shard,
)
from vclr.errors import VclrError
from vclr.io_utils import atomic_write_json

VIDEO_EXTENSIONS = (".avi", ".mp4", ".webm", ".mkv")
SHARD_NAME = re.compile(r"^(\d{5})\.vpk$")


@dataclass(frozen=True)
class ExtractSettings:
    fps: float | None
    short_side: int | None
    size: tuple[int, int] | None  # (width, height)
    num_frames: int | None
    quality: int  # JPEG quality 1..100 (libjpeg / Pillow scale)
    shards: int

    def to_json(self) -> dict:
        data = asdict(self)
        data["size"] = list(self.size) if self.size else None
        return data


# ---------------------------------------------------------------------------------------------------
# Decoding one video


class UndecodableVideo(Exception):
    """The reason a video yields no frames; recorded under "failed" in the manifest."""


def output_size(width: int, height: int, settings: ExtractSettings) -> tuple[int, int]:
    if settings.size:
        return settings.size
    s = settings.short_side
    if width <= height:
        return s, max(1, round(height * s / width))
    return max(1, round(width * s / height)), s


def _decoded_frames(container, stream) -> Iterator:
    """All frames of the stream. Damaged packets are skipped, as the ffmpeg command line does."""
    try:
        for packet in container.demux(stream):
            try:
                yield from packet.decode()
            except av.error.InvalidDataError:
                continue
    except av.error.FFmpegError:
        # The container ends early (truncated file): keep what was decoded, flush the decoder.
        try:
            yield from stream.codec_context.decode(None)
        except av.error.FFmpegError:
            return


def _resampled(
    frames: Iterator, fps: float | None, native_frame_time: fractions.Fraction
) -> Iterator:
    """Yield, for each target time k/fps, the source frame whose time is nearest (ties: earlier).

    Targets run while k/fps < last frame time + one native frame duration (the video's length).
    Times are exact fractions, so ties (e.g. 30 -> 60 fps) resolve the same way on every machine."""
    if fps is None:
        yield from frames
        return
    step = fractions.Fraction(fps).limit_denominator(1_000_000) ** -1
    start, previous, previous_t, k = None, None, fractions.Fraction(0), 0
    for count, frame in enumerate(frames):
        t = (
            frame.pts * frame.time_base
            if frame.pts is not None and frame.time_base
            else count * native_frame_time
        )
        if start is None:
            start = t
        t -= start
        while k * step <= t:
            target = k * step
            chosen = (
                previous
                if previous is not None and target - previous_t <= t - target
                else frame
            )
            yield chosen
            k += 1
        previous, previous_t = frame, t
    if previous is None:
        return
    end = previous_t + native_frame_time
    while k * step < end:
        yield previous
        k += 1


def extract_jpegs(
    source: Path, settings: ExtractSettings
) -> tuple[int, int, int, list[bytes]]:
    """Decode, resample, resize and JPEG-encode one video: (width, height, decoded, jpegs).

    With num_frames the list has exactly that length: longer videos are cut, shorter ones padded by
    repeating the last real frame; `decoded` counts the real (non-padding) frames.
    """
    if source.stat().st_size == 0:
        raise UndecodableVideo("empty file (0 bytes)")
    try:
        container = av.open(str(source))
    except av.error.FFmpegError as error:
        raise UndecodableVideo(f"cannot open: {error}") from None
    with container:
        if not container.streams.video:
            raise UndecodableVideo("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"
        stream.codec_context.thread_count = 1  # parallelism comes from worker processes
        rate = stream.average_rate or stream.guessed_rate
        native_frame_time = (
            1 / fractions.Fraction(rate) if rate else fractions.Fraction(1, 30)
        )
        reformatter = (
            VideoReformatter()
        )  # reused: it caches the swscale context across frames
        jpegs, last_source, width, height = [], None, 0, 0
        try:
            for frame in _resampled(
                _decoded_frames(container, stream), settings.fps, native_frame_time
            ):
                if (
                    settings.num_frames is not None
                    and len(jpegs) >= settings.num_frames
                ):
                    break
                if frame is last_source:  # upsampled: the same source frame again
                    jpegs.append(jpegs[-1])
                    continue
                if not jpegs:
                    width, height = output_size(frame.width, frame.height, settings)
                jpegs.append(
                    encode_jpeg(reformatter, frame, width, height, settings.quality)
                )
                last_source = frame
        except av.error.FFmpegError as error:
            raise UndecodableVideo(f"decoding failed: {error}") from None
    if not jpegs:
        raise UndecodableVideo("no decodable frames")
    decoded = len(jpegs)
    if settings.num_frames is not None:
        jpegs.extend([jpegs[-1]] * (settings.num_frames - decoded))
    return width, height, decoded, jpegs


def encode_jpeg(
    reformatter: VideoReformatter, frame, width: int, height: int, quality: int
) -> bytes:
    """Resize (bicubic) to full-range YCbCr 4:4:4 and let libjpeg subsample to 4:2:0 and encode."""
    planes = reformatter.reformat(
        frame, width, height, format="yuvj444p", interpolation=Interpolation.BICUBIC
    ).to_ndarray()  # [3, H, W]
    image = Image.frombytes(
        "YCbCr",
        (width, height),
        np.ascontiguousarray(planes.transpose(1, 2, 0)).tobytes(),
    )
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------
# Files, shards, work dir


def find_videos(videos_dir: Path) -> dict[str, Path]:
    """KEY (file stem) -> path for every video under videos_dir, recursively; duplicate keys are errors."""
    if not videos_dir.is_dir():
        raise VclrError(f"{videos_dir}: videos directory not found")
    found: dict[str, Path] = {}
    for path in sorted(videos_dir.rglob("*")):
        if path.suffix.lower() in VIDEO_EXTENSIONS and path.is_file():
            if path.stem in found:
                raise VclrError(
                    f"duplicate video key {path.stem!r}: {found[path.stem]} and {path}"
                )
            found[path.stem] = path
    return found


def shard_of(key: str, shards: int) -> int:
    """Stable across runs, machines and Python versions (unlike hash())."""
    return (
        int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % shards
    )


def shard_name(index: int) -> str:
    return f"shards/{index:05d}.vpk"


def _remove_temporaries(directory: Path) -> None:
    """Leftovers of atomic writes interrupted by a kill."""
    for path in directory.glob(".*.tmp"):
        path.unlink(missing_ok=True)


def _extract_to_part(job: tuple) -> tuple[str, bool]:
    """Worker: extract one video into its part file, or write its failure record."""
    key, source, source_rel, settings, parts_dir, failed_dir = job
    try:
        width, height, decoded, jpegs = extract_jpegs(Path(source), settings)
    except UndecodableVideo as error:
        atomic_write_json(
            Path(failed_dir) / f"{key}.json",
            {"source": source_rel, "reason": str(error)},
        )
        return key, False
    write_shard(
        Path(parts_dir) / f"{key}.vpk", [ShardVideo(key, width, height, decoded, jpegs)]
    )
    return key, True


def _valid_parts(parts_dir: Path) -> dict[str, Path]:
    """Part files that are complete; anything else (cut short by a crash or damaged) is deleted."""
    parts = {}
    for path in sorted(parts_dir.glob("*.vpk")):
        try:
            keys = list(read_shard_videos(path))
        except VclrError:
            keys = []
        if keys == [path.stem]:
            parts[path.stem] = path
        else:
            path.unlink()
    return parts


def _failure_records(failed_dir: Path) -> dict[str, dict]:
    failed = {}
    for path in sorted(failed_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            failed[path.stem] = {
                "source": str(record["source"]),
                "reason": str(record["reason"]),
            }
        except (ValueError, KeyError, TypeError):
            path.unlink()
    return failed


def _pack_shard(
    shard_path: Path, target: Path, old_keys: list[str], parts: dict[str, Path]
) -> dict:
    """(Re)write one shard at `target` with the videos packed at `shard_path` plus new parts."""

    def videos():
        for key in sorted([*old_keys, *parts]):
            source = parts.get(key, shard_path)
            entry = read_shard_videos(source)[key]
            yield ShardVideo(
                key,
                entry.width,
                entry.height,
                entry.decoded,
                iter_shard_jpegs(source, key),
            )

    index = write_shard(target, videos())
    for path in parts.values():
        path.unlink()
    return index


def run_extract(
    dataset: str,
    videos_dir: Path,
    frames_dir: Path,
    settings: ExtractSettings,
    workers: int = 1,
    retry_failed: bool = False,
    progress: bool = True,
    pause_after_video: float = 0.0,
    work_dir: Path | None = None,
) -> dict:
    """Extract every video under videos_dir into frames_dir; returns counts for the summary line."""
    sources = find_videos(videos_dir)
    manifest_path = frames_dir / "manifest.json"
    wanted = {"dataset": dataset, "settings": settings.to_json()}
    previous = read_manifest(frames_dir) if manifest_path.exists() else None
    if previous is not None and {k: previous[k] for k in wanted} != wanted:
        raise VclrError(
            f"{manifest_path}: made with dataset/settings {json.dumps({k: previous[k] for k in wanted})}, "
            f"asked for {json.dumps(wanted)}; use another --out or delete it"
        )
    work = Path(work_dir) if work_dir is not None else frames_dir / ".work"
    shards_dir, staged_dir = frames_dir / "shards", work / "shards"
    parts_dir, failed_dir = work / "parts", work / "failed"
    for directory in (parts_dir, failed_dir, shards_dir, staged_dir):
        directory.mkdir(parents=True, exist_ok=True)
        _remove_temporaries(directory)
    settings_path = work / "settings.json"
    if settings_path.exists():
        recorded = json.loads(settings_path.read_text(encoding="utf-8"))
        if recorded != wanted:
            raise VclrError(
                f"{settings_path}: an unfinished run used {json.dumps(recorded)}, asked for {json.dumps(wanted)}"
            )
    else:
        atomic_write_json(settings_path, wanted)

    # What is already done: packed shards, complete part files, failure records.
    packed: dict[str, tuple[str, object]] = {}
    # final shards first, then the staged ones of an unfinished run, which supersede them
    for path in [*sorted(shards_dir.glob("*.vpk")), *sorted(staged_dir.glob("*.vpk"))]:
        match = SHARD_NAME.match(path.name)
        if not match or int(match.group(1)) >= settings.shards:
            raise VclrError(
                f"{path}: unexpected shard file for --shards {settings.shards}"
            )
        try:
            index = read_shard_videos(path)
        except VclrError as error:
            raise VclrError(
                f"{error}; delete it and rerun to re-extract its videos"
            ) from None
        packed.update(
            {key: (f"shards/{path.name}", entry) for key, entry in index.items()}
        )
    parts = _valid_parts(parts_dir)
    for key in [
        k for k in parts if k in packed
    ]:  # killed between packing a shard and deleting its parts
        parts.pop(key).unlink()
    failed = dict(previous["failed"]) if previous else {}
    failed.update(_failure_records(failed_dir))
    if retry_failed:
        for key in [k for k in failed if k in sources]:
            del failed[key]
            (failed_dir / f"{key}.json").unlink(missing_ok=True)

    todo = sorted(
        (k for k in sources if k not in packed and k not in parts and k not in failed),
        key=lambda k: (shard_of(k, settings.shards), k),
    )
    def _current(name: str) -> Path:
        """Where a shard's latest packed copy is: staged in the work dir, else final."""
        staged = work / name
        return staged if staged.exists() else frames_dir / name

    remaining: dict[int, int] = {}
    for key in todo:
        remaining[shard_of(key, settings.shards)] = (
            remaining.get(shard_of(key, settings.shards), 0) + 1
        )
    new_parts: dict[int, dict[str, Path]] = {}
    for key, path in parts.items():
        new_parts.setdefault(shard_of(key, settings.shards), {})[key] = path

    def pack_if_complete(bucket: int) -> None:
        if remaining.get(bucket, 0) == 0 and new_parts.get(bucket):
            name = shard_name(bucket)
            old_keys = [k for k, (shard, _) in packed.items() if shard == name]
            index = _pack_shard(_current(name), work / name, old_keys, new_parts.pop(bucket))
            packed.update({key: (name, entry) for key, entry in index.items()})

    for bucket in list(new_parts):
        pack_if_complete(bucket)

    jobs = [
        (
            key,
            str(sources[key]),
            sources[key].relative_to(videos_dir).as_posix(),
            settings,
            str(parts_dir),
            str(failed_dir),
        )
        for key in todo
    ]
    extracted = newly_failed = 0
    results = _run_jobs(jobs, workers)
    from tqdm import tqdm

    for key, ok in tqdm(
        results,
        total=len(jobs),
        desc=f"extract {dataset}",
        unit="video",
        disable=not progress,
    ):
        bucket = shard_of(key, settings.shards)
        remaining[bucket] -= 1
        if ok:
            extracted += 1
            new_parts.setdefault(bucket, {})[key] = parts_dir / f"{key}.vpk"
        else:
            newly_failed += 1
            failed[key] = json.loads(
                (failed_dir / f"{key}.json").read_text(encoding="utf-8")
            )
        pack_if_complete(bucket)
        if pause_after_video:
            time.sleep(pause_after_video)
    if new_parts:
        raise RuntimeError(f"parts left unpacked for shards {sorted(new_parts)}")

    videos = {
        key: {
            "shard": shard,
            "frames": e.frames,
            "decoded": e.decoded,
            "width": e.width,
            "height": e.height,
        }
        for key, (shard, e) in sorted(packed.items())
    }
    manifest = {
        "format": FORMAT,
        **wanted,
        "shards": sorted({video["shard"] for video in videos.values()}),
        "videos": videos,
        "failed": {key: failed[key] for key in sorted(failed) if key not in packed},
    }
    for staged in sorted(staged_dir.glob("*.vpk")):
        os.replace(staged, shards_dir / staged.name)
    atomic_write_json(manifest_path, manifest)
    shutil.rmtree(work)
    return {
        "found": len(sources),
        "extracted": extracted,
        "already_done": len(sources) - len(todo),
        "failed": len(manifest["failed"]),
        "newly_failed": newly_failed,
        "packed": len(videos),
    }


def _run_jobs(jobs: list[tuple], workers: int) -> Iterator[tuple[str, bool]]:
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_extract_to_part, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(_extract_to_part, jobs, chunksize=1)


# ---------------------------------------------------------------------------------------------------
# CLI


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
        return value

    return parse


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or int(match.group(1)) == 0 or int(match.group(2)) == 0:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT, e.g. 171x128: {text!r}"
        )
    return int(match.group(1)), int(match.group(2))


def _quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError("JPEG quality must be in 1..100")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", required=True, help="dataset id, recorded in the manifest"
    )
    parser.add_argument(
        "--videos",
        required=True,
        type=Path,
        help="directory searched recursively for videos",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="packed-frames directory to write"
    )
    parser.add_argument(
        "--fps",
        type=_positive(float),
        help="resample to this rate (default: native rate)",
    )
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument(
        "--short-side",
        type=_positive(int),
        help="resize so the short side is S, keeping aspect",
    )
    size.add_argument("--size", type=_size, help="resize to exactly WIDTHxHEIGHT")
    parser.add_argument(
        "--num-frames",
        type=_positive(int),
        help="exactly N frames per video (cut or pad)",
    )
    parser.add_argument(
        "--quality",
        type=_quality,
        default=90,
        help="JPEG quality 1..100 (Pillow scale)",
    )
    parser.add_argument(
        "--shards",
        type=_positive(int),
        default=16,
        help="number of shard files (fixed per output)",
    )
    parser.add_argument(
        "--workers", type=_positive(int), default=1, help="parallel decoding processes"
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="try again videos that failed before",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="resumable state of an unfinished run (default <OUT>/.work); keep it outside <OUT> "
        "when a workflow manager deletes <OUT> before rerunning",
    )
    # Test hook: slows the run down so that a test can kill it mid-way.
    parser.add_argument(
        "--pause-after-video", type=float, default=0.0, help=argparse.SUPPRESS
    )


def main(args: argparse.Namespace) -> int:
    settings = ExtractSettings(
        fps=args.fps,
        short_side=args.short_side,
        size=args.size,
        num_frames=args.num_frames,
        quality=args.quality,
        shards=args.shards,
    )
    counts = run_extract(
        args.dataset,
        args.videos,
        args.out,
        settings,
        workers=args.workers,
        retry_failed=args.retry_failed,
        progress=not args.no_progress,
        pause_after_video=args.pause_after_video,
        work_dir=args.work,
    )
    print(
        f"{args.dataset}: {counts['found']} videos found, {counts['extracted']} extracted now, "
        f"{counts['already_done']} already done, {counts['packed']} packed in total; "
        f"{counts['failed']} failed (see 'failed' in {args.out / 'manifest.json'})"
    )
    return 0
