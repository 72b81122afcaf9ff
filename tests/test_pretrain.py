"""VCLR pretraining: dataset contract, schedule, checkpoint/resume, error cases (all tiny, CPU)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vclr import cli
from vclr.data.index import COLUMNS
from vclr.data.packed import FORMAT, PackedFrames, ShardVideo, write_shard
from vclr.data.pretrain_dataset import PretrainDataset, epoch_order, found_rows
from vclr.data.sampling import sample_video
from vclr.errors import VclrError
from vclr.models.backbones import TinyResNet
from vclr.models.vclr import BATCH_KEYS, Vclr, VclrModel
from vclr.train.checkpoint import load_checkpoint, restore_checkpoint
from vclr.train.pretrain import pretrain
from vclr.train.schedule import lr_at, scaled_lr

REPO = Path(__file__).resolve().parents[1]
NUM_VIDEOS, NUM_FRAMES, WIDTH, HEIGHT = 8, 12, 48, 40


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _video_frames(video: int) -> list[bytes]:
    """A per-video texture and colour with a bright square moving across it (frames differ in time)."""
    rng = np.random.default_rng(video)
    base = rng.integers(0, 256, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    frames = []
    for t in range(NUM_FRAMES):
        frame = base.copy()
        x = 2 + 3 * t
        frame[10:22, x:x + 12] = 255
        frames.append(_jpeg(frame))
    return frames


def write_tiny_data(root: Path) -> tuple[Path, Path]:
    """(index CSV, frames dir): 8 found videos in one shard plus one row with status 'missing'."""
    frames_dir = root / "frames"
    keys = [f"video{i}" for i in range(NUM_VIDEOS)]
    write_shard(frames_dir / "shards/00000.vpk",
                [ShardVideo(key, WIDTH, HEIGHT, NUM_FRAMES, _video_frames(i)) for i, key in enumerate(keys)])
    entry = {"shard": "shards/00000.vpk", "frames": NUM_FRAMES, "decoded": NUM_FRAMES, "width": WIDTH,
             "height": HEIGHT}
    (frames_dir / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "dataset": "toy", "settings": {}, "shards": ["shards/00000.vpk"],
        "videos": {key: entry for key in keys}, "failed": {}}))
    index_csv = root / "train.csv"
    with open(index_csv, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for i, key in enumerate(keys):
            writer.writerow([key, i % 2, f"class{i % 2}", "found", NUM_FRAMES, "shards/00000.vpk", "", ""])
        writer.writerow(["absent", 0, "class0", "missing", 0, "", "", ""])
    return index_csv, frames_dir


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_data(tmp_path_factory.mktemp("pretrain_data"))


SETTINGS = {"backbone": "resnet_tiny", "batch_size": 4, "lr": 2.0, "warmup_epochs": 1, "queue_size": 16,
            "crop": 32, "segments": 3, "temperature": 0.1, "seed": 3, "workers": 0, "checkpoint_every": 1,
            "deterministic": True, "device": "cpu"}


def _cli_args(index_csv: Path, frames_dir: Path, out: Path, epochs: int, extra: tuple[str, ...] = ()) -> list[str]:
    return ["train", "pretrain", "--index", str(index_csv), "--frames", str(frames_dir), "--out", str(out),
            "--backbone", "resnet_tiny", "--epochs", str(epochs), "--batch-size", "4", "--lr", "2.0",
            "--warmup-epochs", "1", "--queue-size", "16", "--crop", "32", "--segments", "3",
            "--temperature", "0.1", "--losses", "inter,intra,segment,order", "--seed", "3",
            "--checkpoint-every", "1", "--deterministic", "--device", "cpu", *extra]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_schedule_values():
    assert scaled_lr(0.1, 256) == pytest.approx(0.1) and scaled_lr(0.1, 32) == pytest.approx(0.0125)
    at = lambda it: lr_at(it, iters_per_epoch=10, epochs=10, base_lr=1.0, warmup_epochs=2, eta_min=1e-6)  # noqa: E731
    assert at(0) == pytest.approx(0.01)
    assert at(10) == pytest.approx(0.01 + 0.99 * 0.5)
    assert at(20) == pytest.approx(1.0)
    assert at(60) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert at(100) == pytest.approx(1e-6)
    assert at(40) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_dataset_contract_and_determinism(tiny_data):
    index_csv, frames_dir = tiny_data
    rows = found_rows(index_csv)
    assert [row.video_id for row in rows] == [f"video{i}" for i in range(NUM_VIDEOS)]
    dataset = PretrainDataset(rows, PackedFrames(frames_dir), crop_size=32, num_segments=3, seed=5)
    global_state = torch.get_rng_state()
    item = dataset[2]
    assert torch.equal(torch.get_rng_state(), global_state)  # no global RNG use or reseeding
    assert set(item) == set(BATCH_KEYS)
    assert item["xq"].shape == (3, 32, 32) and item["query_tuple"].shape == (3, 3, 32, 32)
    sample = sample_video(NUM_FRAMES, seed=5, epoch=0, index=2, num_segments=3)
    position = {segment: sample.query_order.index(segment) for segment in range(3)}
    assert torch.equal(item["xq"], item["query_tuple"][position[sample.anchor_segment]])
    assert torch.equal(item["x2"], item["query_tuple"][position[sample.other_segments[0]]])
    assert torch.equal(item["x3"], item["query_tuple"][position[sample.other_segments[1]]])
    assert not torch.equal(item["x1"], item["xq"])  # same frame, fresh augmentation
    assert int(item["order_label"]) == sample.order_label
    again = dataset[2]
    assert all(torch.equal(item[key], again[key]) for key in BATCH_KEYS)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[2]["xq"], item["xq"])
    assert epoch_order(8, seed=5, epoch=0) == epoch_order(8, seed=5, epoch=0) != epoch_order(8, seed=5, epoch=1)


def test_loss_decreases_on_a_fixed_tiny_set(tiny_data, tmp_path, monkeypatch):
    """Fixed samples (set_epoch frozen at epoch 0): the loop must fit them within 20 steps.

    Queue-free terms (intra + order) fall from the start; the full loss is compared once the
    16-entry queues hold real keys (from step 5 on), since the random initial queue makes step 1 easy.
    """
    index_csv, frames_dir = tiny_data
    monkeypatch.setattr(PretrainDataset, "set_epoch", lambda self, epoch: None)
    pretrain({**SETTINGS, "epochs": 10, "lr": 2.0, "losses": ["intra", "order"]}, index_csv, frames_dir,
             tmp_path / "two")
    totals = [record["total"] for record in _log(tmp_path / "two")]
    assert np.mean(totals[-4:]) < np.mean(totals[:4]) - 0.5, totals
    summary = pretrain({**SETTINGS, "epochs": 10, "lr": 10.0}, index_csv, frames_dir, tmp_path / "all")
    totals = [record["total"] for record in _log(tmp_path / "all")]
    assert summary["completed"] and summary["steps"] == len(totals) == 20
    assert np.mean(totals[-4:]) < np.mean(totals[2:6]) - 0.5, totals
    backbone = torch.load(tmp_path / "all" / "backbone.pt", weights_only=True)
    TinyResNet().load_state_dict(backbone)  # what evaluations load
    assert json.loads((tmp_path / "all" / "summary.json").read_text())["steps"] == 20


def test_exact_resume_after_a_stopped_subprocess(tiny_data, tmp_path):
    """3 epochs x 2 steps: uninterrupted vs stopped at step 3 (mid-epoch) and resumed (with a worker)."""
    index_csv, frames_dir = tiny_data
    run = lambda out, extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "vclr", *_cli_args(index_csv, frames_dir, out, 3, extra)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    whole = run(tmp_path / "whole", ("--workers", "0"))
    assert whole.returncode == 0, whole.stderr
    stopped = run(tmp_path / "split", ("--workers", "0", "--max-steps", "3"))
    assert stopped.returncode == 0, stopped.stderr
    assert not (tmp_path / "split" / "backbone.pt").exists()
    checkpoint = load_checkpoint(tmp_path / "split" / "checkpoint_last.pt")
    assert (checkpoint["epoch"], checkpoint["iteration"], checkpoint["step"]) == (1, 1, 3)
    resumed = run(tmp_path / "split", ("--workers", "1"))
    assert resumed.returncode == 0, resumed.stderr
    strip = lambda records: [{k: v for k, v in r.items() if k != "videos_per_s"} for r in records]  # noqa: E731
    expected, got = strip(_log(tmp_path / "whole")), strip(_log(tmp_path / "split"))
    assert len(expected) == 6 and got == expected  # exact float equality of every loss term
    a = torch.load(tmp_path / "whole" / "backbone.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "backbone.pt", weights_only=True)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_exact_resume_after_a_killed_subprocess(tiny_data, tmp_path):
    """SIGKILL mid-run (no chance to save): the rerun resumes from the last epoch checkpoint, drops
    the log lines written after it, and reaches the uninterrupted run's per-step losses exactly."""
    index_csv, frames_dir = tiny_data
    epochs = 8
    command = lambda out: [sys.executable, "-m", "vclr", *_cli_args(index_csv, frames_dir, out, epochs)]  # noqa: E731
    whole = subprocess.run(command(tmp_path / "whole"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    victim = subprocess.Popen(command(tmp_path / "killed"), cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 5:  # inside epoch 3 of 8
            break
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "summary.json").exists()
    resumed = subprocess.run(command(tmp_path / "killed"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    strip = lambda records: [{k: v for k, v in r.items() if k != "videos_per_s"} for r in records]  # noqa: E731
    assert strip(_log(tmp_path / "killed")) == strip(_log(tmp_path / "whole"))
    a = torch.load(tmp_path / "whole" / "backbone.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "backbone.pt", weights_only=True)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_nan_loss_names_step_and_term_and_keeps_last_checkpoint(tiny_data, tmp_path, monkeypatch):
    index_csv, frames_dir = tiny_data
    calls = {"n": 0}
    original = TinyResNet.forward

    def poisoned(self, x):  # 2 backbone passes per step (query, momentum): step 3 is poisoned
        calls["n"] += 1
        out = original(self, x)
        return out * float("nan") if calls["n"] > 4 else out

    monkeypatch.setattr(TinyResNet, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(VclrError, match=r"step 3 .*'inter'.*not finite") as error:
        pretrain({**SETTINGS, "epochs": 3}, index_csv, frames_dir, out)
    assert "checkpoint_last.pt" in str(error.value)
    assert load_checkpoint(out / "checkpoint_last.pt")["step"] == 2
    assert [record["step"] for record in _log(out)] == [1, 2]


def test_checkpoint_of_another_architecture_is_refused(tiny_data, tmp_path):
    index_csv, frames_dir = tiny_data
    pretrain({**SETTINGS, "epochs": 1}, index_csv, frames_dir, tmp_path / "run")
    path = tmp_path / "run" / "checkpoint_last.pt"
    state = load_checkpoint(path)
    backbone = TinyResNet(widths=(8, 16, 32, 64))
    other = Vclr(VclrModel(backbone, backbone.feature_dim), queue_size=16)
    optimizer = torch.optim.SGD(other.model.parameters(), lr=0.1)
    with pytest.raises(VclrError, match=r"checkpoint_last.pt.*shape mismatch.*model\.backbone\.conv1\.weight"):
        restore_checkpoint(path, state, vclr=other, optimizer=optimizer)
    # Resuming the same directory with other settings is refused too, naming them.
    with pytest.raises(VclrError, match="crop"):
        pretrain({**SETTINGS, "epochs": 2, "crop": 40}, index_csv, frames_dir, tmp_path / "run")
    # ... and so is resuming it on other data (an index that lost a video).
    other_index = tmp_path / "other_train.csv"
    lines = index_csv.read_text(encoding="utf-8").splitlines(keepends=True)
    other_index.write_text("".join(lines[:-2] + lines[-1:]), encoding="utf-8")
    with pytest.raises(VclrError, match=r"other settings \(data\)"):
        pretrain({**SETTINGS, "epochs": 2}, other_index, frames_dir, tmp_path / "run")


def test_queue_not_a_multiple_of_the_batch_fails_before_training(tiny_data, tmp_path, capsys):
    index_csv, frames_dir = tiny_data
    with pytest.raises(VclrError, match="queue_size 18 is not a multiple of the global batch 4"):
        pretrain({**SETTINGS, "epochs": 1, "queue_size": 18}, index_csv, frames_dir, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    args = _cli_args(index_csv, frames_dir, tmp_path / "q", 1)
    args[args.index("--queue-size") + 1] = "18"
    assert cli.main(args) == 2
    assert "not a multiple" in capsys.readouterr().err


@pytest.mark.parametrize(("key", "value", "message"), [
    ("alpha", 1.0, r"alpha must be in \[0, 1\)"), ("temperature", 0.0, "temperature must be positive"),
    ("prefetch", -1, r"prefetch must be 0 \(off\) or a number of batches, got -1")])
def test_settings_out_of_range_fail_before_training(tiny_data, tmp_path, key, value, message):
    index_csv, frames_dir = tiny_data
    with pytest.raises(VclrError, match=message):
        pretrain({**SETTINGS, "epochs": 1, key: value}, index_csv, frames_dir, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_deterministic_switch_does_not_leak_to_the_caller(tiny_data, tmp_path):
    index_csv, frames_dir = tiny_data
    assert not torch.are_deterministic_algorithms_enabled()
    pretrain({**SETTINGS, "epochs": 1, "max_steps": 1}, index_csv, frames_dir, tmp_path / "d")
    assert not torch.are_deterministic_algorithms_enabled()
