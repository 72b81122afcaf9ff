"""Fine-tuning: sampling, augmentation and test views, the protocol presets, and real tiny runs on
synthetic UCF101 (complete + metrics record, exact resume, 2-process gloo DDP)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vclr.data.extract import ExtractSettings, run_extract
from vclr.data.finetune_dataset import (
    Clip,
    FinetuneTestDataset,
    FinetuneTrainDataset,
    check_clip_lengths,
    eval_frame_indices,
    eval_views,
    item_rng,
    multi_scale_box,
    random_resized_box,
    read_classes,
    train_frame_indices,
    train_views,
    video_clips,
    view_boxes,
)
from vclr.data.index import IndexRow, build_index, read_split
from vclr.data.packed import PackedFrames
from vclr.data.synthetic import generate_dataset
from vclr.errors import VclrError
from vclr.evaluate.record import read_metrics_record
from vclr.models.tsn import build_model, load_finetuned
from vclr.train import finetune
from vclr.train.finetune import (
    PROTOCOLS,
    classification_metrics,
    optimizer_groups,
    resolve_settings,
    step_lr,
)

REPO = Path(__file__).resolve().parents[1]
FRAMES_PER_VIDEO = 12


@pytest.fixture(scope="module")
def ucf(tmp_path_factory) -> tuple[Path, Path]:
    """(index dir, frames dir) of a synthetic UCF101: 4 classes, 12 train / 8 test videos of 12 frames."""
    root = tmp_path_factory.mktemp("finetune_data")
    generate_dataset("ucf101", root / "raw", seed=1, classes=4, train_per_class=3, test_per_class=2, width=64,
                     height=48, frames=FRAMES_PER_VIDEO)
    settings = ExtractSettings(fps=None, short_side=48, size=None, num_frames=None, quality=90, shards=1)
    run_extract("ucf101", root / "raw" / "videos", root / "frames", settings, progress=False)
    build_index("ucf101", root / "raw" / "annotations", root / "frames", 1, root / "index")
    return root / "index", root / "frames"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    finetune.configure_parser(parser)
    return parser


def _argv(index_dir: Path, frames_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "ucf101", "--backbone", "resnet_tiny", "--index-dir", str(index_dir), "--frames",
            str(frames_dir), "--out", str(out), "--metrics", str(out / "metrics.json"), "--epochs", "2",
            "--batch-size", "4", "--lr", "1.0", "--segments", "3", "--short-side", "40", "--crop", "32",
            "--test-crop", "40", "--test-frames", "5", "--workers", "0", "--device", "cpu", "--deterministic",
            "--seed", "2", "--profile", "tiny", *extra]


def _log(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "videos_per_s"}
            for line in (out / "log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ sampling and views


def test_test_frames_are_segment_centres():
    assert eval_frame_indices(10, 4) == [1, 3, 6, 8]  # interval 2.5: int(1.25), int(3.75), ...
    assert eval_frame_indices(25, 25) == list(range(25))
    assert eval_frame_indices(3, 5) == [0, 0, 1, 2, 2]  # shorter than the test frames: repeats


def test_train_frames_one_per_segment_deterministic_per_item():
    draws = [train_frame_indices(10, 3, item_rng(4, epoch, 7)) for epoch in range(30)]
    assert draws[0] == train_frame_indices(10, 3, item_rng(4, 0, 7))
    for frames in draws:  # segments [0,3) [3,6) [6,10) (the last takes the remainder)
        assert 0 <= frames[0] < 3 <= frames[1] < 6 <= frames[2] < 10
    assert {tuple(frames) for frames in draws} != {tuple(draws[0])}  # epochs differ
    assert {frames[2] for frames in draws} == {6, 7, 8, 9}  # every frame of a segment can be drawn
    with pytest.raises(VclrError, match="cannot give 3 segments"):
        train_frame_indices(2, 3, item_rng(0, 0, 0))


def test_three_and_ten_crop_boxes_on_the_protocol_frame():
    three = view_boxes(256, 340, 256, "three")  # ActivityNet: short side 256, three-crop 256
    assert three == [((0, 0, 256, 256), False), ((0, 84, 256, 256), False), ((0, 42, 256, 256), False)]
    assert [box[:2] for box, _ in view_boxes(340, 256, 256, "three")] == [(0, 0), (84, 0), (42, 0)]
    ten = view_boxes(256, 340, 224, "ten")  # SSv2 TSN: ten-crop 224; steps (340-224)//4=29, (256-224)//4=8
    corners = [(0, 0), (0, 116), (32, 0), (32, 116), (16, 58)]
    assert [box[:2] for box, _ in ten] == corners + corners
    assert [flip for _, flip in ten] == [False] * 5 + [True] * 5
    assert view_boxes(256, 340, 224, "centre") == [((16, 58, 224, 224), False)]
    with pytest.raises(VclrError, match="larger than the 340x200 frame"):
        view_boxes(200, 340, 224, "centre")


def test_test_views_shapes_contents_and_flips():
    frames = torch.arange(2 * 3 * 6 * 8, dtype=torch.float32).remainder(256).to(torch.uint8).view(2, 3, 6, 8)
    plain = (frames.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(3, 1, 1)
    ten = eval_views(frames, short_side=6, crop=4, views="ten")
    assert ten.shape == (10, 2, 3, 4, 4)
    for view, ((top, left, h, w), flip) in zip(ten, view_boxes(6, 8, 4, "ten")):
        expected = plain[..., top:top + h, left:left + w]
        assert torch.allclose(view, expected.flip(-1) if flip else expected, atol=1e-5)
    assert torch.allclose(ten[5], ten[0].flip(-1))  # flipped corner = mirrored corner
    assert eval_views(frames, short_side=6, crop=6, views="three").shape == (3, 2, 3, 6, 6)
    assert eval_views(frames, short_side=12, crop=10, views="centre").shape == (1, 2, 3, 10, 10)  # resized


def test_train_views_one_box_for_the_clip_and_no_flip_when_switched_off():
    frame = torch.randint(0, 256, (3, 30, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    clip = frame.expand(3, -1, -1, -1)
    flips = 0
    for seed in range(12):
        out = train_views(clip, item_rng(seed, 0, 0), short_side=30, crop=16, augmentation="resized_crop", flip=True)
        assert out.shape == (3, 3, 16, 16) and torch.equal(out[0], out[2])  # the same box and flip per frame
        rng = item_rng(seed, 0, 0)  # replay the draws: the box, then the flip coin
        box = random_resized_box(30, 40, rng)
        flipped = rng.random() < 0.5
        unflipped = train_views(clip, item_rng(seed, 0, 0), short_side=30, crop=16, augmentation="resized_crop",
                                flip=False)
        assert torch.equal(out, unflipped.flip(-1) if flipped else unflipped)
        flips += flipped
        assert box[0] + box[2] <= 30 and box[1] + box[3] <= 40
    assert 0 < flips < 12


def test_multi_scale_crop_sizes_and_fixed_offsets():
    height, width = 256, 340
    sizes = [int(256 * s) for s in (1, 0.875, 0.75, 0.66)]  # 256, 224, 192, 168
    seen = set()
    for seed in range(200):
        top, left, h, w = multi_scale_box(height, width, item_rng(seed, 0, 0))
        i, j = sizes.index(h), sizes.index(w)
        assert abs(i - j) <= 1  # max_wh_scale_gap 1
        ws, hs = (width - w) // 4, (height - h) // 4
        assert left in {0, ws, 2 * ws, 3 * ws, 4 * ws} and top in {0, hs, 2 * hs, 3 * hs, 4 * hs}
        seen.add((h, w))
    assert len(seen) == 10  # 4 equal pairs + 2 x 3 neighbours


def test_datasets_are_deterministic_and_leave_the_global_rng_alone(ucf):
    index_dir, frames_dir = ucf
    frames = PackedFrames(frames_dir)
    clips = video_clips(read_split(index_dir / "train.csv"), frames, index_dir / "train.csv")
    assert len(clips) == 12 and all(clip.length == FRAMES_PER_VIDEO for clip in clips)
    dataset = FinetuneTrainDataset(clips, frames, index_dir / "train.csv", num_segments=3, short_side=40, crop=32,
                                   augmentation="multi_scale", flip=False, seed=5)
    state = torch.get_rng_state()
    first, label = dataset[3]
    assert torch.equal(torch.get_rng_state(), state)
    assert first.shape == (3, 3, 32, 32) and label == clips[3].label
    assert torch.equal(dataset[3][0], first)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[3][0], first)
    test_set = FinetuneTestDataset(clips, frames, "x.csv", num_frames=5, short_side=40, crop=40, views="three")
    views, label, index = test_set[2]
    assert views.shape == (3, 5, 3, 40, 40) and index == 2


def test_video_shorter_than_the_segments_names_video_and_index(ucf, tmp_path):
    index_dir, frames_dir = ucf
    with pytest.raises(VclrError, match=r"train\.csv: 12 video\(s\) shorter than the 16 training segments: "
                                        r"'v_\w+' \(12 frames\)"):
        finetune.main(_parser().parse_args(_argv(index_dir, frames_dir, tmp_path / "short", "--segments", "16")))
    assert not (tmp_path / "short").exists()
    with pytest.raises(VclrError, match=r"list\.csv: 1 video\(s\) shorter than the 3 training segments: 'b' \(2"):
        check_clip_lengths([Clip("a", 0, 0, 3), Clip("b", 0, 5, 7)], 3, "list.csv", "training segments")


def test_trimmed_clips_cover_the_annotated_segments(ucf):
    index_dir, frames_dir = ucf
    frames = PackedFrames(frames_dir)
    video = read_split(index_dir / "train.csv")[0].video_id  # 12 frames, said to last 2.0 s
    row = IndexRow(video, 1, "x", "found", 12, "", 2.0, [(0.5, 1.0, 1), (1.9, 2.5, 0)])
    assert video_clips([row], frames, "val.csv", trimmed=True) == [Clip(video, 1, 3, 6), Clip(video, 0, 11, 12)]
    with pytest.raises(VclrError, match="val.csv: video .* need a duration"):
        video_clips([IndexRow(video, 1, "x", "found", 12, "", None, [])], frames, "val.csv", trimmed=True)
    with pytest.raises(VclrError, match="val.csv: video .* has no label"):
        video_clips([IndexRow(video, -1, "", "found", 12, "", None, [])], frames, "val.csv")
    names, rows = read_classes(index_dir), read_split(index_dir / "train.csv")
    assert len(names) == 4 and all(names[row.label] == row.label_name for row in rows)
    (index_dir.parent / "bad_index").mkdir()
    (index_dir.parent / "bad_index" / "classes.csv").write_text("index,name\n0,a\n2,b\n")
    with pytest.raises(VclrError, match=r"bad_index/classes.csv:3: expected '1,<name>'"):
        read_classes(index_dir.parent / "bad_index")


# ------------------------------------------------------------------------------ protocol and optimiser


def test_presets_are_the_published_protocols():
    keys = ("segments", "epochs", "lr", "weight_decay", "batch_size", "clip_grad", "lr_steps", "dropout",
            "test_frames", "test_views", "test_crop", "flip", "fc_lr5")
    published = {  # spec/protocols.md, "Fine-tuning", in the order of `keys`
        ("ucf101", "tsn"): (3, 300, 0.01, 5e-4, 256, 40, [120, 240], 0.4, 25, "centre", 256, True, False),
        ("hmdb51", "tsn"): (8, 50, 0.025, 1e-4, 256, 40, [20, 40], 0.4, 8, "centre", 256, True, False),
        ("ssv2", "tsn"): (8, 50, 0.02, 1e-4, 128, 40, [20, 40], 0.5, 8, "ten", 224, False, False),
        ("ssv2", "tsm"): (8, 50, 0.0075, 5e-4, 48, 20, [20, 40], 0.5, 8, "centre", 224, False, True),
        ("anet", "tsn"): (8, 50, 0.01, 1e-4, 64, 40, [20, 40], 0.8, 25, "three", 256, True, False),
    }
    assert set(PROTOCOLS) == set(published)
    for key, values in published.items():
        assert {k: PROTOCOLS[key][k] for k in keys} == dict(zip(keys, values)), key
    assert PROTOCOLS[("ssv2", "tsm")]["test_average"] == "prob" and PROTOCOLS[("anet", "tsn")]["trimmed"]
    assert {p["augmentation"] for (d, _), p in PROTOCOLS.items() if d == "ssv2"} == {"multi_scale"}
    settings = resolve_settings("ucf101", "tsn")
    assert settings["lr_scaled"] == 0.01 and settings["lr_steps"] == [120, 240] and settings["overridden"] == []
    tiny = resolve_settings("ucf101", "tsn", {"epochs": 10, "batch_size": 64, "crop": 32, "test_frames": None})
    assert tiny["lr_scaled"] == pytest.approx(0.0025) and tiny["lr_steps"] == [4, 8] and tiny["test_frames"] == 25
    assert resolve_settings("ucf101", "tsn", {"epochs": 10, "lr_steps": [3]})["lr_steps"] == [3]
    with pytest.raises(VclrError, match="TSM tests clips of its 8 segments"):
        resolve_settings("ssv2", "tsm", {"test_frames": 16})
    with pytest.raises(VclrError, match="no fine-tuning protocol for dataset 'k400'"):
        resolve_settings("k400", "tsn")


def test_step_schedule():
    assert [step_lr(e, 1.0, [2, 4]) for e in range(6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_tsm_parameter_groups_follow_fc_lr5():
    model = build_model("tsm", "resnet_tiny", 3, dropout=0.5, n_segments=2)
    groups = optimizer_groups(model, 5e-4, fc_lr5=True)
    by_mult = {(g["lr_mult"], g["weight_decay"]): g["params"] for g in groups}
    assert by_mult[(5.0, 5e-4)] == [model.fc.weight] and by_mult[(10.0, 0.0)] == [model.fc.bias]
    norms = [p for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()]
    assert len(by_mult[(1.0, 0.0)]) == len(norms)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert len(optimizer_groups(model, 5e-4, fc_lr5=False)) == 1


def test_classification_metrics_hand_computed():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.4, 0.1], [0.3, 0.3, 0.4], [0.9, 0.0, 0.1]])
    labels = np.array([1, 1, 0, 0])  # right, wrong (2nd), wrong (2nd by tie order), right
    metrics, per_class = classification_metrics(scores, labels, ["a", "b", "c"])
    assert metrics == {"top1": 0.5, "top5": 1.0, "mean_class": 0.5}
    assert per_class == {"a": 0.5, "b": 0.5}


# ------------------------------------------------------------------------------ real tiny runs


def test_tiny_run_completes_writes_metrics_and_resumes_exactly(ucf, tmp_path):
    """12 clips, batch 4: 3 steps per epoch, 2 epochs. Stopped after step 4 (mid-epoch 1), resumed
    with a worker process: the same per-step losses, weights and test scores as the whole run."""
    index_dir, frames_dir = ucf
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert finetune.main(_parser().parse_args(_argv(index_dir, frames_dir, whole))) == 0
    assert finetune.main(_parser().parse_args(_argv(index_dir, frames_dir, split, "--max-steps", "4"))) == 0
    assert not (split / "metrics.json").exists() and not (split / "model.pt").exists()
    state = finetune.load_state(split / "checkpoint_last.pt")
    assert (state["epoch"], state["iteration"], state["step"]) == (1, 1, 4)
    assert finetune.main(_parser().parse_args(_argv(index_dir, frames_dir, split, "--workers", "1"))) == 0
    expected = _log(whole)
    assert [r["step"] for r in expected] == [1, 2, 3, 4, 5, 6] and _log(split) == expected
    assert [r["lr"] for r in expected] == pytest.approx([1 / 64] * 3 + [1 / 640] * 3)  # 1.0 * 4/256, step at 1
    a, _ = load_finetuned(whole / "model.pt")
    b, meta = load_finetuned(split / "model.pt")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert meta["class_names"] == read_classes(index_dir) and meta["arch"] == "tsn"

    record = read_metrics_record(whole / "metrics.json")
    assert (record["task"], record["dataset"], record["split"], record["protocol"]) == (
        "finetune", "ucf101", "test", "tsn_ucf101")
    assert record["checkpoint"]["path"] == "random:seed=2" and record["profile"] == "tiny"
    assert record["extra"]["counts"] == {"train_clips": 12, "test_clips": 8, "classes": 4}
    saved = np.load(whole / "test_scores.npz")
    assert saved["scores"].shape == (8, 4) and len(set(saved["video_ids"].tolist())) == 8
    recomputed, _ = classification_metrics(saved["scores"].astype(np.float64), saved["labels"], meta["class_names"])
    assert record["metrics"] == pytest.approx(recomputed)
    assert record["metrics"] == read_metrics_record(split / "metrics.json")["metrics"]
    assert np.array_equal(np.load(split / "test_scores.npz")["scores"], saved["scores"])

    # Resuming with another protocol value is refused, naming it.
    with pytest.raises(VclrError, match=r"other settings \(.*dropout"):
        finetune.main(_parser().parse_args(_argv(index_dir, frames_dir, split, "--dropout", "0.1")))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_process_gloo_run_scores_every_test_clip_once(ucf, tmp_path):
    """torchrun x 2 (gloo): each process loads 2 of the 4 clips per step; rank 0 alone writes; the
    sharded test (clips 0,2,4,6 and 1,3,5,7) equals one process scoring the saved model."""
    index_dir, frames_dir = ucf
    out = tmp_path / "ddp"
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), "-m", "vclr.train.finetune",
         *_argv(index_dir, frames_dir, out, "--epochs", "1")],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("top1 ") == 1
    assert [r["step"] for r in _log(out)] == [1, 2, 3]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint_last.pt", "log.jsonl", "metrics.json", "model.pt",
                                                     "summary.json", "test_scores.npz"]
    record = read_metrics_record(out / "metrics.json")
    assert record["extra"]["processes"] == 2 and record["extra"]["counts"]["test_clips"] == 8
    model, _ = load_finetuned(out / "model.pt")
    settings = resolve_settings("ucf101", "tsn", {"short_side": 40, "test_crop": 40, "test_frames": 5},
                                {"workers": 0})
    frames = PackedFrames(frames_dir)
    clips = video_clips(read_split(index_dir / "test.csv"), frames, "test.csv")
    test_set = FinetuneTestDataset(clips, frames, "test.csv", num_frames=5, short_side=40, crop=40, views="centre")
    scores, labels = finetune.evaluate(model, test_set, settings, torch.device("cpu"), bf16=False)
    saved = np.load(out / "test_scores.npz")
    assert np.allclose(saved["scores"], scores, atol=1e-5) and np.array_equal(saved["labels"], labels)
