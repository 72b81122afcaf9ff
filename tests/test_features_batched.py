"""Feature extraction through the batched decode path (decode_jpegs + eval_crops) against the per-frame
reference, multi-crop by hand, and `vclr eval features` with several splits in one process.

Tolerance of the equivalence: atol = rtol = 1e-5 on the features (measured: at most ~1e-6, float
rounding of grid_sample at exact pixel centres against slicing; the crop convention is the same)."""

from __future__ import annotations

import argparse
import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_pretrain import write_tiny_data

from vclr.data import batch_augment as ba
from vclr.data.augment import IMAGENET_MEAN, IMAGENET_STD
from vclr.data.frames import uniform_frame_indices
from vclr.data.index import COLUMNS, read_split
from vclr.data.packed import FORMAT, PackedFrames, ShardVideo, write_shard
from vclr.errors import VclrError
from vclr.evaluate import features as features_module
from vclr.evaluate.feature_files import load_features
from vclr.evaluate.features import (
    JpegVideoDataset,
    _collate_jpegs,
    _split_jpegs,
    decode_eval_crops,
    extract_features,
    extract_features_per_frame,
    features_for_split,
    load_backbone,
    uniform_clip_indices,
)

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """8 found videos of 12 frames of 48x40 (+ one 'missing' row), written by the packing code."""
    return write_tiny_data(tmp_path_factory.mktemp("features_batched"))


@pytest.fixture(autouse=True)
def isolated_rng():
    with torch.random.fork_rng(devices=[]):
        yield


@pytest.mark.parametrize(("backbone", "settings"), [
    ("resnet_tiny", {"num_frames": 3, "crop": 32, "batch_size": 7}),  # 2 videos a batch, crop inside the frame
    ("resnet_tiny", {"num_frames": 5, "crop": 48, "batch_size": 240}),  # short side 40 resized up to 48
    ("r2plus1d_tiny", {"num_frames": 2, "crop": 32, "batch_size": 16, "clip_frames": 4, "clip_stride": 2}),
    ("r2plus1d_tiny", {"num_frames": 2, "crop": 44, "batch_size": 8, "clip_frames": 3, "clip_stride": 5}),
])
def test_batched_path_gives_the_per_frame_features(tiny_data, backbone, settings):
    index_csv, frames_dir = tiny_data
    rows, frames = read_split(index_csv), PackedFrames(frames_dir)
    trunk = load_backbone("random", backbone, seed=1)
    batched, ids, labels = extract_features(trunk, rows, frames, **settings)
    reference, ref_ids, ref_labels = extract_features_per_frame(trunk, rows, frames, **settings)
    assert ids == ref_ids == [f"video{i}" for i in range(8)] and labels.tolist() == ref_labels.tolist()
    assert batched.dtype == np.float32 and batched.shape == reference.shape
    np.testing.assert_allclose(batched, reference, **TOLERANCE)
    assert np.abs(reference).max() > 0.1  # not a comparison of near-zero features


def _normalised(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def test_three_crops_average_start_centre_and_end_by_hand(tiny_data):
    """48x40 frames, crop 24: windows at left 0, 12, 24 of the long (width) side, top (40-24)//2 = 8."""
    index_csv, frames_dir = tiny_data
    rows, frames = read_split(index_csv), PackedFrames(frames_dir)
    trunk = load_backbone("random", "resnet_tiny", seed=2).eval()
    features, _, _ = extract_features(trunk, rows, frames, num_frames=2, crop=24, batch_size=12, crops=3)
    picks = uniform_frame_indices(12, 2)
    video = torch.stack([frames.read_frame("video5", i) for i in picks])
    windows = torch.cat([video[..., 8:32, left:left + 24] for left in (0, 12, 24)])
    with torch.no_grad():
        expected = trunk(_normalised(windows)).mean(0)
    np.testing.assert_allclose(features[5], expected.numpy(), **TOLERANCE)
    centre, _, _ = extract_features(trunk, rows, frames, num_frames=2, crop=24, batch_size=12)
    assert not np.allclose(features[5], centre[5], atol=1e-3)  # the side crops count
    # 3D: each clip's three crops are three clips cut at the same place in every frame
    trunk3d = load_backbone("random", "r2plus1d_tiny", seed=2).eval()
    clips, _, _ = extract_features(trunk3d, rows, frames, num_frames=2, crop=24, batch_size=64, clip_frames=4,
                                   clip_stride=2, crops=3)
    picks = uniform_clip_indices(12, 2, 4, 2)
    video = _normalised(torch.stack([frames.read_frame("video2", i) for i in picks]))  # [8,3,40,48]
    cut = torch.stack([video[..., 8:32, left:left + 24] for left in (0, 12, 24)])  # [3 crops,8,3,24,24]
    x = cut.unflatten(1, (2, 4)).flatten(0, 1).transpose(1, 2)  # [crops*clips,3,T,24,24]
    with torch.no_grad():
        expected = trunk3d(x).mean(0)
    np.testing.assert_allclose(clips[2], expected.numpy(), **TOLERANCE)
    with pytest.raises(VclrError, match="crops must be 1 or 3"):
        extract_features(trunk, rows, frames, num_frames=2, crop=24, crops=2)


def test_sliced_eval_crops_are_eval_crops():
    generator = torch.Generator().manual_seed(0)
    frames = [torch.randint(0, 256, size, dtype=torch.uint8, generator=generator)
              for size in ((3, 30, 50), (3, 50, 30), (3, 30, 41))]
    for crop, crops in ((24, 1), (24, 3), (30, 3), (36, 1)):  # 36: short sides under the crop -> resized
        sliced = ba.eval_crops_sliced(frames, crop, crops)
        assert sliced.shape == (3 * crops, 3, crop, crop)
        torch.testing.assert_close(sliced, ba.eval_crops(frames, crop, crops), rtol=0, atol=1e-4)
    # frame 1 (50x30), crop 24, 3 crops: its start window is rows 0..23, columns 3..26, exactly
    expected = (frames[1][:, 0:24, 3:27].float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(ba.eval_crops_sliced(frames, 24, 3)[3], expected, rtol=0, atol=1e-6)


def test_loader_workers_and_prefetching_give_the_same_features(tiny_data):
    index_csv, frames_dir = tiny_data
    rows, frames = read_split(index_csv), PackedFrames(frames_dir)
    trunk = load_backbone("random", "resnet_tiny", seed=3)
    alone, _, _ = extract_features(trunk, rows, frames, num_frames=3, crop=32, batch_size=9, prefetch=0)
    workers, ids, labels = extract_features(trunk, rows, frames, num_frames=3, crop=32, batch_size=9, workers=1)
    assert ids == [f"video{i}" for i in range(8)] and labels.tolist() == [row.label for row in rows[:8]]
    np.testing.assert_array_equal(workers, alone)
    ahead, ahead_ids, _ = extract_features(trunk, rows, frames, num_frames=3, crop=32, batch_size=9, prefetch=3)
    assert ahead_ids == ids
    np.testing.assert_array_equal(ahead, alone)


def test_extraction_prefetches_by_default_on_cuda_only(tiny_data, monkeypatch):
    """On a CPU the loader's decode and the forward share the cores (prefetching measured 0.9x there)."""
    index_csv, frames_dir = tiny_data
    depths = []
    real = features_module.DevicePrefetcher

    def recording(batches, prepare, device, depth):
        depths.append((torch.device(device).type, depth))
        return real(batches, prepare, device, depth)

    monkeypatch.setattr(features_module, "DevicePrefetcher", recording)
    trunk = load_backbone("random", "resnet_tiny", seed=3)
    rows, frames = read_split(index_csv), PackedFrames(frames_dir)
    extract_features(trunk, rows, frames, num_frames=3, crop=32, batch_size=9)
    extract_features(trunk, rows, frames, num_frames=3, crop=32, batch_size=9, prefetch=2)
    assert depths == [("cpu", 0), ("cpu", 2)]
    assert features_module.default_prefetch(torch.device("cuda", 1)) == 1


def test_bytes_batches_decode_after_the_loader_as_in_the_loader(tiny_data):
    """The CUDA branch (one bytes buffer from the loader, decoded where the model is) cuts the same
    crops as the CPU branch (decoded in the loader's collate), here both on the CPU."""
    index_csv, frames_dir = tiny_data
    frames = PackedFrames(frames_dir)
    dataset = JpegVideoDataset(read_split(index_csv), frames, lambda count, _: uniform_clip_indices(count, 2, 3, 5))
    items = [dataset[1], dataset[6]]
    assert [len(item[0]) for item in items] == [6, 6] and items[0][1:] == (1, "video1")
    settings = {"frames_dir": str(frames_dir), "crop": 32, "crops": 3}
    decoded, labels, ids = _collate_jpegs(items, **settings, decode=True)
    (data, offsets), labels_bytes, ids_bytes = _collate_jpegs(items, **settings, decode=False)
    assert data.dtype == torch.uint8 and offsets.shape == (13,) and int(offsets[-1]) == data.numel()
    later = decode_eval_crops(_split_jpegs(data, offsets), 32, 3, torch.device("cpu"), "here")
    assert decoded.shape == (36, 3, 32, 32) and torch.equal(later, decoded)
    assert labels.tolist() == labels_bytes.tolist() == [1, 0] and ids == ids_bytes == ["video1", "video6"]


def test_an_undecodable_frame_names_the_frames_dir_and_videos(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(good, format="JPEG")
    frames_dir = tmp_path / "frames"
    write_shard(frames_dir / "shards/00000.vpk", [ShardVideo("ok", 16, 16, 2, [good.getvalue()] * 2),
                                                  ShardVideo("bad", 16, 16, 2, [good.getvalue(), b"\xff\xd8junk"])])
    entry = {"shard": "shards/00000.vpk", "frames": 2, "decoded": 2, "width": 16, "height": 16}
    (frames_dir / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "dataset": "toy", "settings": {}, "shards": ["shards/00000.vpk"],
        "videos": {"ok": entry, "bad": entry}, "failed": {}}))
    from vclr.data.index import IndexRow

    rows = [IndexRow(key, 0, "c0", "found", 2, "shards/00000.vpk", None, []) for key in ("ok", "bad")]
    trunk = load_backbone("random", "resnet_tiny", seed=0)
    with pytest.raises(VclrError, match=r"frames: videos ok, bad: undecodable JPEG"):
        extract_features(trunk, rows, PackedFrames(frames_dir), num_frames=2, crop=16)


def _subset_split(index_csv, out, keep: int):
    with open(index_csv, newline="", encoding="utf-8") as handle:
        lines = list(csv.reader(handle))
    assert lines[0] == list(COLUMNS)
    with open(out, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(lines[:1 + keep])
    return out


def _cli(argv):
    parser = argparse.ArgumentParser()
    features_module.configure_parser(parser)
    return features_module.main(parser.parse_args([str(a) for a in argv]))


def test_several_splits_in_one_process_equal_one_split_each(tiny_data, tmp_path):
    index_csv, frames_dir = tiny_data
    test_csv = _subset_split(index_csv, tmp_path / "test.csv", 3)
    common = ["--backbone", "resnet_tiny", "--checkpoint", "random", "--seed", "4", "--num-frames", "3",
              "--crop", "32", "--device", "cpu"]
    # the single form and a --split together, then each split alone (the single form still works)
    assert _cli([*common, "--index", index_csv, "--frames", frames_dir, "--out", tmp_path / "train.npz",
                 "--split", test_csv, frames_dir, tmp_path / "test.npz"]) == 0
    assert _cli([*common, "--split", index_csv, frames_dir, tmp_path / "train1.npz"]) == 0
    features_for_split("resnet_tiny", "random", test_csv, frames_dir, tmp_path / "test1.npz", num_frames=3,
                       crop=32, seed=4)
    for together, alone, videos in (("train", "train1", 8), ("test", "test1", 3)):
        a, b = load_features(tmp_path / f"{together}.npz"), load_features(tmp_path / f"{alone}.npz")
        assert len(a["video_ids"]) == videos and a["video_ids"] == b["video_ids"]
        np.testing.assert_array_equal(a["features"], b["features"])
        assert a["provenance"] == b["provenance"]
        assert a["provenance"]["crops"] == 1 and a["provenance"]["checkpoint"] == "random:seed=4"
    assert load_features(tmp_path / "test.npz")["provenance"]["index"] == str(test_csv.resolve())


def test_split_arguments_are_checked_before_any_extraction(tiny_data, tmp_path):
    index_csv, frames_dir = tiny_data
    common = ["--backbone", "resnet_tiny", "--checkpoint", "random", "--num-frames", "2", "--crop", "32",
              "--device", "cpu"]
    with pytest.raises(VclrError, match="give all three"):
        _cli([*common, "--index", index_csv, "--out", tmp_path / "a.npz"])
    with pytest.raises(VclrError, match="no split to extract"):
        _cli(common)
    with pytest.raises(VclrError, match="each split needs its own"):
        _cli([*common, "--split", index_csv, frames_dir, tmp_path / "a.npz",
              "--split", index_csv, frames_dir, tmp_path / "a.npz"])
    # the second split's frames are missing: refused before the first split is extracted
    with pytest.raises(VclrError, match="no manifest"):
        _cli([*common, "--split", index_csv, frames_dir, tmp_path / "a.npz",
              "--split", index_csv, tmp_path / "nowhere", tmp_path / "b.npz"])
    assert not list(tmp_path.glob("*.npz"))
