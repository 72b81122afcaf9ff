"""Packed frame shards: format round trip, manifest validation, damage detection, worker safety."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from vclr.data.packed import (
    FORMAT,
    PackedFrames,
    ShardVideo,
    iter_shard_jpegs,
    read_manifest,
    read_shard_videos,
    write_shard,
)
from vclr.errors import VclrError


def jpeg(value: int, width: int = 16, height: int = 8) -> bytes:
    """A flat-colour JPEG whose red channel encodes `value` (survives JPEG to within a few levels)."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (value, 255 - value, 128)).save(
        buffer, format="JPEG", quality=95
    )
    return buffer.getvalue()


def write_packed(frames_dir, videos: dict[str, list[int]], shards: int = 2) -> None:
    """A packed-frames directory: video i of the sorted keys goes to shard i % shards."""
    by_shard: dict[str, list[ShardVideo]] = {}
    entries = {}
    for i, key in enumerate(sorted(videos)):
        name = f"shards/{i % shards:05d}.vpk"
        by_shard.setdefault(name, []).append(
            ShardVideo(key, 16, 8, len(videos[key]), [jpeg(v) for v in videos[key]])
        )
        entries[key] = {
            "shard": name,
            "frames": len(videos[key]),
            "decoded": len(videos[key]),
            "width": 16,
            "height": 8,
        }
    for name, shard_videos in by_shard.items():
        write_shard(frames_dir / name, shard_videos)
    manifest = {
        "format": FORMAT,
        "dataset": "toy",
        "settings": {},
        "shards": sorted(by_shard),
        "videos": entries,
        "failed": {},
    }
    (frames_dir / "manifest.json").write_text(json.dumps(manifest))


VIDEOS = {"a": [10, 60, 110], "b": [200], "c": [30, 90, 150, 210, 250]}


def red(frame: torch.Tensor) -> int:
    return int(frame[0].float().mean().round())


def test_round_trip_reads_every_frame_of_every_video(tmp_path):
    write_packed(tmp_path, VIDEOS)
    frames = PackedFrames(tmp_path)
    assert sorted(frames.keys()) == ["a", "b", "c"]
    for key, values in VIDEOS.items():
        assert frames.num_frames(key) == len(values)
        for i, value in enumerate(values):
            assert frames.read_jpeg(key, i) == jpeg(value)
            frame = frames.read_frame(key, i)
            assert frame.dtype == torch.uint8 and frame.shape == (3, 8, 16)
            assert abs(red(frame) - value) <= 3
    with pytest.raises(IndexError):
        frames.read_jpeg("a", 3)
    with pytest.raises(VclrError, match="'zzz'"):
        frames.num_frames("zzz")


def test_one_shard_is_one_self_describing_file(tmp_path):
    write_shard(
        tmp_path / "s.vpk",
        [
            ShardVideo("x", 16, 8, 1, [jpeg(1), jpeg(2)]),
            ShardVideo("y", 4, 2, 1, [jpeg(3)]),
        ],
    )
    assert [p.name for p in tmp_path.iterdir()] == ["s.vpk"]
    index = read_shard_videos(tmp_path / "s.vpk")
    assert {k: (v.frames, v.width, v.height, v.decoded) for k, v in index.items()} == {
        "x": (2, 16, 8, 1),
        "y": (1, 4, 2, 1),
    }
    assert list(iter_shard_jpegs(tmp_path / "s.vpk", "x")) == [jpeg(1), jpeg(2)]


def test_duplicate_key_in_a_shard_is_refused_and_leaves_no_file(tmp_path):
    with pytest.raises(VclrError, match="'x' written twice"):
        write_shard(
            tmp_path / "s.vpk",
            [ShardVideo("x", 1, 1, 1, [jpeg(1)]), ShardVideo("x", 1, 1, 1, [jpeg(2)])],
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cut", [1, 20, 100])
def test_truncated_shard_gives_error_naming_it(tmp_path, cut):
    write_packed(tmp_path, VIDEOS, shards=1)
    shard = tmp_path / "shards/00000.vpk"
    shard.write_bytes(shard.read_bytes()[:-cut])
    frames = PackedFrames(tmp_path)
    with pytest.raises(VclrError, match=str(shard).replace(".", r"\.")):
        frames.read_jpeg("a", 0)


def test_damaged_index_is_detected_by_checksum(tmp_path):
    write_packed(tmp_path, VIDEOS, shards=1)
    shard = tmp_path / "shards/00000.vpk"
    data = bytearray(shard.read_bytes())
    position = data.rindex(b'"c"')  # inside the index JSON
    data[position + 1] = ord("d")
    shard.write_bytes(bytes(data))
    with pytest.raises(VclrError, match="checksum"):
        PackedFrames(tmp_path).read_jpeg("a", 0)


def test_manifest_that_disagrees_with_its_shard_is_an_error(tmp_path):
    write_packed(tmp_path, VIDEOS, shards=1)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["videos"]["a"]["frames"] = 2
    manifest["videos"]["a"]["decoded"] = 2
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VclrError, match="does not hold video 'a'"):
        PackedFrames(tmp_path).read_jpeg("a", 0)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format="other/1"), "format"),
        (lambda m: m.pop("videos"), "'videos'"),
        (
            lambda m: m["videos"]["a"].update(shard="shards/99999.vpk"),
            r"videos\['a'\]\.shard",
        ),
        (lambda m: m["videos"]["b"].update(frames="1"), r"videos\['b'\]\.frames"),
        (lambda m: m["failed"].update(z={"source": "z.mp4"}), r"failed\['z'\]\.reason"),
    ],
)
def test_malformed_manifest_errors_name_file_and_key(tmp_path, edit, message):
    write_packed(tmp_path, VIDEOS)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    edit(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VclrError, match="manifest.json: .*" + message):
        read_manifest(tmp_path)


def test_invalid_json_and_missing_manifest(tmp_path):
    with pytest.raises(VclrError, match="no manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": \n oops')
    with pytest.raises(VclrError, match=r"manifest.json:2: invalid JSON"):
        read_manifest(tmp_path)


def test_pickled_reader_holds_no_open_file_and_still_reads(tmp_path):
    write_packed(tmp_path, VIDEOS)
    frames = PackedFrames(tmp_path)
    frames.read_jpeg("a", 0)  # opens a shard
    clone = pickle.loads(pickle.dumps(frames))
    assert clone._open == {}
    assert clone.read_jpeg("c", 4) == jpeg(250)


class _Reads(torch.utils.data.Dataset):
    def __init__(self, frames: PackedFrames, items: list[tuple[str, int]]):
        self.frames, self.items = frames, items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        key, j = self.items[i]
        return red(self.frames.read_frame(key, j)), key, j


def test_reader_works_in_dataloader_worker_processes(tmp_path):
    write_packed(tmp_path, VIDEOS)
    frames = PackedFrames(tmp_path)
    frames.read_jpeg("b", 0)  # the parent has a shard open before the workers start
    items = [(k, j) for k, values in VIDEOS.items() for j in range(len(values))] * 2
    loader = torch.utils.data.DataLoader(
        _Reads(frames, items), batch_size=3, num_workers=2
    )
    got = [
        (k, int(j), int(v))
        for values, keys, js in loader
        for v, k, j in zip(values, keys, js)
    ]
    assert len(got) == len(items)
    for key, j, value in got:
        assert abs(value - VIDEOS[key][j]) <= 3
    assert np.all(np.array([k for k, _, _ in got]) == np.array([k for k, _ in items]))
