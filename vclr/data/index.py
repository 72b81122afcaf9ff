"""The index stage: official annotations + packed-frame manifest -> split CSVs (contract 3).

Each listed video is marked found (its frames are in the manifest), undecodable (extraction tried and
failed) or missing (never extracted: no file was downloaded, or no frames directory was given), so a
missing video is counted and reported instead of silently vanishing from a split.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from vclr.data.annotations import DATASETS, Annotations, parse_annotations
from vclr.data.packed import read_manifest
from vclr.errors import VclrError
from vclr.io_utils import atomic_directory

COLUMNS = ["video_id", "label", "label_name", "status", "frames", "shard", "duration", "segments"]
STATUSES = ("found", "missing", "undecodable")


@dataclass(frozen=True)
class IndexRow:
    video_id: str
    label: int
    label_name: str
    status: str
    frames: int
    shard: str
    duration: float | None
    segments: list[tuple[float, float, int]]


def build_index(
    dataset: str,
    annotations_dir: str | Path,
    frames_dir: str | Path | None,
    split: int | None,
    out_dir: str | Path,
) -> dict:
    """Write `<out_dir>/{<split>.csv, classes.csv, summary.json}` atomically; return the summary.

    `split` picks the official ucf101/hmdb51 split (None means 1) and must be None for the others.
    """
    annotations = parse_annotations(dataset, annotations_dir, split)
    videos, failed = _manifest_entries(dataset, frames_dir)
    summary = {"dataset": dataset, "classes": len(annotations.classes), "splits": {}}
    with atomic_directory(out_dir) as tmp:
        _write_classes(tmp / "classes.csv", annotations)
        for split_name, entries in annotations.splits.items():
            counts = dict.fromkeys(STATUSES, 0)
            rows = []
            for entry in entries:
                status = "found" if entry.key in videos else "undecodable" if entry.key in failed else "missing"
                counts[status] += 1
                video = videos.get(entry.key, {}) if status == "found" else {}
                rows.append(IndexRow(entry.key, entry.label, entry.label_name, status, int(video.get("frames", 0)),
                                     video.get("shard", ""), entry.duration,
                                     list(entry.segments) if dataset == "anet" else []))
            write_split(tmp / f"{split_name}.csv", rows, with_segments=dataset == "anet")
            summary["splits"][split_name] = {"listed": len(entries), **counts}
        with open(tmp / "summary.json", "w", encoding="utf-8") as handle:
            handle.write(json.dumps(summary, indent=2) + "\n")
    return summary


def write_split(path: str | Path, rows: list[IndexRow], with_segments: bool = False) -> None:
    """One `<split>.csv` (COLUMNS; read back by read_split); with_segments (ActivityNet) writes every
    row's segments as JSON, an empty list too. Written in place: callers that need atomicity write
    into a temporary directory (build_index) or a fresh one."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([
                row.video_id, row.label, row.label_name, row.status, row.frames, row.shard,
                "" if row.duration is None else repr(row.duration),
                json.dumps([list(segment) for segment in row.segments]) if with_segments else "",
            ])


def _manifest_entries(dataset: str, frames_dir: str | Path | None) -> tuple[dict, dict]:
    """(videos, failed) of the packed-frames manifest; both empty without a frames directory."""
    if frames_dir is None:
        return {}, {}
    manifest = read_manifest(Path(frames_dir))
    if manifest.get("dataset") != dataset:
        raise VclrError(
            f"{Path(frames_dir) / 'manifest.json'}: key dataset is {manifest.get('dataset')!r}, expected {dataset!r}"
        )
    return manifest["videos"], manifest["failed"]


def _write_classes(path: Path, annotations: Annotations) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["index", "name"])
        writer.writerows(enumerate(annotations.classes))


def read_split(csv_path: str | Path) -> list[IndexRow]:
    """Read one `<split>.csv` written by build_index, checking every field's type."""
    csv_path = Path(csv_path)
    try:
        handle = open(csv_path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise VclrError(f"{csv_path}: split index not found (run `vclr data index`)") from None
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != COLUMNS:
            raise VclrError(f"{csv_path}:1: expected header {','.join(COLUMNS)}, got {header}")
        return [_parse_row(fields, f"{csv_path}:{reader.line_num}") for fields in reader if fields]


def _parse_row(fields: list[str], where: str) -> IndexRow:
    if len(fields) != len(COLUMNS):
        raise VclrError(f"{where}: expected {len(COLUMNS)} fields, got {len(fields)}")
    video_id, label, label_name, status, frames, shard, duration, segments = fields
    if status not in STATUSES:
        raise VclrError(f"{where}: status {status!r} is not one of {', '.join(STATUSES)}")
    try:
        label_value, frames_value = int(label), int(frames)
        duration_value = float(duration) if duration else None
    except ValueError:
        raise VclrError(f"{where}: label/frames must be integers and duration a number") from None
    if duration_value is not None and not math.isfinite(duration_value):
        raise VclrError(f"{where}: duration {duration!r} is not finite")
    parsed_segments = []
    if segments:
        try:
            raw = json.loads(segments)
            parsed_segments = [(float(start), float(end), int(label_idx)) for start, end, label_idx in raw]
        except (json.JSONDecodeError, TypeError, ValueError):
            raise VclrError(f"{where}: segments must be a JSON list of [start_s, end_s, label_idx]") from None
    return IndexRow(video_id, label_value, label_name, status, frames_value, shard, duration_value, parsed_segments)


def format_summary(summary: dict) -> str:
    """A small fixed-width table: one row per split."""
    lines = [f"{summary['dataset']}: {summary['classes']} classes"]
    lines.append(f"{'split':<8}{'listed':>9}{'found':>9}{'missing':>9}{'undecodable':>13}")
    for name, counts in summary["splits"].items():
        lines.append(
            f"{name:<8}{counts['listed']:>9}{counts['found']:>9}{counts['missing']:>9}{counts['undecodable']:>13}"
        )
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--annotations", required=True, type=Path, metavar="DIR",
                        help="directory of the official annotation files")
    parser.add_argument("--frames", type=Path, metavar="DIR",
                        help="packed frames (manifest.json); without it every video counts as missing")
    parser.add_argument("--split", type=int, metavar="N", help="official split 1..3 (ucf101, hmdb51; default 1)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="index directory to (re)write")


def main(args: argparse.Namespace) -> int:
    summary = build_index(args.dataset, args.annotations, args.frames, args.split, args.out)
    print(format_summary(summary))
    print(f"wrote {args.out}")
    return 0
