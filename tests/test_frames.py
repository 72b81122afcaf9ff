"""VideoFrameDataset over split-index rows and the uniform evaluation frame indices."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from vclr.data.frames import VideoFrameDataset, uniform_frame_indices
from vclr.data.index import IndexRow
from vclr.data.packed import FORMAT, PackedFrames, ShardVideo, write_shard
from vclr.errors import VclrError
from vclr.io_utils import atomic_write_json

VIDEOS = {
    "a": [10, 60, 110],
    "b": [200],
    "c": [30, 90, 150, 210, 250],
}  # red level of each frame


def write_packed(frames_dir, videos: dict[str, list[int]]) -> None:
    """A one-shard packed-frames directory of flat 16x8 frames."""

    def jpeg(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (16, 8), (value, 0, 0)).save(buffer, format="JPEG", quality=95)
        return buffer.getvalue()

    write_shard(
        frames_dir / "shards/00000.vpk",
        [ShardVideo(k, 16, 8, len(v), map(jpeg, v)) for k, v in videos.items()],
    )
    entries = {
        k: {
            "shard": "shards/00000.vpk",
            "frames": len(v),
            "decoded": len(v),
            "width": 16,
            "height": 8,
        }
        for k, v in videos.items()
    }
    manifest = {
        "format": FORMAT,
        "dataset": "toy",
        "settings": {},
        "shards": ["shards/00000.vpk"],
        "videos": entries,
        "failed": {},
    }
    atomic_write_json(frames_dir / "manifest.json", manifest)


def red(frame: torch.Tensor) -> int:
    return int(frame[0].float().mean().round())


def row(video_id: str, label: int, status: str = "found", frames: int = 0) -> IndexRow:
    return IndexRow(video_id, label, f"class{label}", status, frames, "", None, [])


def test_uniform_frame_indices():
    assert uniform_frame_indices(300, 30)[:3] == [0, 10, 21]
    assert uniform_frame_indices(300, 30)[-1] == 299
    assert uniform_frame_indices(10, 4) == [0, 3, 6, 9]
    assert uniform_frame_indices(1, 3) == [0, 0, 0]
    assert uniform_frame_indices(5, 8) == [0, 1, 1, 2, 2, 3, 3, 4]
    with pytest.raises(ValueError):
        uniform_frame_indices(0, 3)


def test_dataset_returns_chosen_frames_label_and_id_for_found_rows(tmp_path):
    write_packed(tmp_path, VIDEOS)
    rows = [
        row("a", 4, frames=3),
        row("gone", 1, status="missing"),
        row("c", 7),
        row("b", 2, status="undecodable"),
    ]
    seen = []

    def pick(num_frames, row_index):
        seen.append((num_frames, row_index))
        return [num_frames - 1, 0]

    dataset = VideoFrameDataset(
        rows, PackedFrames(tmp_path), pick, transform=lambda clip: clip.flip(0)
    )
    assert len(dataset) == 2
    clip, label, video_id = dataset[1]
    assert (label, video_id, clip.shape, clip.dtype) == (
        7,
        "c",
        (2, 3, 8, 16),
        torch.uint8,
    )
    assert (
        abs(red(clip[0]) - VIDEOS["c"][0]) <= 3
        and abs(red(clip[1]) - VIDEOS["c"][-1]) <= 3
    )  # flipped
    assert seen == [(5, 1)]


def test_uniform_clips_through_a_dataloader(tmp_path):
    write_packed(tmp_path, VIDEOS)
    dataset = VideoFrameDataset(
        [row("a", 0), row("c", 1)],
        PackedFrames(tmp_path),
        lambda n, _: uniform_frame_indices(n, 3),
    )
    clips, labels, ids = next(
        iter(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2))
    )
    assert (
        clips.shape == (2, 3, 3, 8, 16)
        and labels.tolist() == [0, 1]
        and list(ids) == ["a", "c"]
    )
    assert [red(clips[1, t]) // 4 for t in range(3)] == [v // 4 for v in (30, 150, 250)]


def test_stale_index_or_unknown_video_is_an_error(tmp_path):
    write_packed(tmp_path, VIDEOS)
    with pytest.raises(VclrError, match="'a' has 3 frames, the index says 30"):
        VideoFrameDataset(
            [row("a", 0, frames=30)], PackedFrames(tmp_path), uniform_frame_indices
        )
    with pytest.raises(VclrError, match="no video 'zzz'"):
        VideoFrameDataset(
            [row("zzz", 0)], PackedFrames(tmp_path), uniform_frame_indices
        )
