"""VCLR with 3D video backbones (vclr.models.video3d): trunks, clip sampling, per-clip augmentation
(CPU reference and batched), the pretraining loop with exact resume, features, fine-tuning, the
and the speed bench (all tiny, CPU); the learning check is in tests/test_pipeline.py."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from test_pretrain import (  # the same tiny packed data set
    SETTINGS,
    _log,
    write_tiny_data,
)

from vclr import cli
from vclr.data import batch_augment as ba
from vclr.data.augment import augment_clips, augment_frame, frame_transform
from vclr.data.extract import ExtractSettings, run_extract
from vclr.data.finetune_dataset import (
    FinetuneTestDataset,
    FinetuneTrainDataset,
    eval_frame_indices,
    train_frame_indices,
    video_clips,
)
from vclr.data.index import build_index, read_split
from vclr.data.packed import PackedFrames
from vclr.data.pretrain_dataset import (
    PretrainDataset,
    PretrainJpegDataset,
    collate_jpeg_batch,
    decode_and_augment,
    found_rows,
)
from vclr.data.sampling import sample_video, segment_bounds
from vclr.data.synthetic import generate_dataset
from vclr.errors import VclrError
from vclr.evaluate import features as features_module
from vclr.evaluate.feature_files import load_feature_pair
from vclr.evaluate.features import (
    center_crop,
    extract_features,
    load_backbone,
    uniform_clip_indices,
)
from vclr.models.backbones import (
    ALL_BACKBONES,
    BACKBONES,
    build_backbone,
    is_video_backbone,
)
from vclr.models.tsn import build_model, frame_scores, load_finetuned
from vclr.models.vclr import BATCH_KEYS, Vclr, VclrModel
from vclr.models.video3d import VIDEO_BACKBONES, is_video_trunk
from vclr.train import finetune
from vclr.train.checkpoint import load_checkpoint
from vclr.train.losses import vclr_loss
from vclr.train.pretrain import pretrain

T, STRIDE, CROP = 4, 1, 32
CLIP_SETTINGS = {**SETTINGS, "backbone": "r2plus1d_tiny", "clip_frames": T, "clip_stride": STRIDE}


@pytest.fixture(autouse=True)
def isolated_rng():
    """Tests seed the global RNG; keep that from leaking into other test files."""
    with torch.random.fork_rng(devices=[]):
        yield


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("video3d_data"))


# ------------------------------------------------------------------------------------------ trunks


@pytest.mark.parametrize(("name", "dim", "torchvision_name"), [
    ("r2plus1d_18", 512, "r2plus1d_18"), ("r3d_18", 512, "r3d_18"), ("x3d_s", 2048, None)])
def test_full_size_trunks_build_and_run_one_forward(name, dim, torchvision_name):
    torch.manual_seed(0)
    trunk, feature_dim = build_backbone(name)
    assert feature_dim == dim and is_video_trunk(trunk) and is_video_backbone(name)
    trunk.eval()
    with torch.no_grad():
        assert trunk(torch.randn(1, 3, 4, 32, 32)).shape == (1, dim)
    if torchvision_name:  # the layout of torchvision's video ResNets, parameter for parameter
        from torchvision.models import video

        reference = getattr(video, torchvision_name)(weights=None)
        reference.fc = torch.nn.Identity()
        count = lambda module: sum(p.numel() for p in module.parameters())
        assert count(trunk) == count(reference)


def test_x3d_s_loads_pytorchvideos_x3d_s_weights(tmp_path):
    """Our x3d_s has pytorchvideo's X3D-S keys: its state dict (classifier dropped) loads and the
    trunk then computes pytorchvideo's pooled 2048-d feature (its head before dropout/projection)."""
    from pytorchvideo.models.x3d import create_x3d

    torch.manual_seed(1)
    reference = create_x3d(input_clip_length=4, input_crop_size=64, model_num_class=7).eval()
    path = tmp_path / "x3d_s.pyth"
    torch.save({"model_state": None, "state_dict": reference.state_dict()}, path)
    trunk, _ = build_backbone("x3d_s", pretrained=path)
    trunk.eval()
    clips = torch.randn(2, 3, 4, 64, 64)
    with torch.no_grad():
        x = clips
        for block in reference.blocks[:-1]:
            x = block(x)
        expected = reference.blocks[-1].pool(x).flatten(1)  # window = the whole 4x2x2 map: global pool
        assert torch.allclose(trunk(clips), expected, atol=1e-5)


def test_tiny_trunks_names_and_random_init_are_seeded():
    assert set(ALL_BACKBONES) == set(BACKBONES) | set(VIDEO_BACKBONES)
    assert not any(is_video_backbone(name) for name in BACKBONES)
    for name in ("r2plus1d_tiny", "x3d_tiny"):
        trunk = load_backbone("random", name, seed=3)
        again = load_backbone("random", name, seed=3)
        other = load_backbone("random", name, seed=4)
        assert all(torch.equal(a, b) for a, b in zip(trunk.state_dict().values(), again.state_dict().values()))
        assert not all(torch.equal(a, b) for a, b in zip(trunk.state_dict().values(), other.state_dict().values()))
        assert trunk(torch.randn(2, 3, T, CROP, CROP)).shape == (2, 128)
    with pytest.raises(VclrError, match="unknown backbone 'c3d'.*x3d_tiny"):
        build_backbone("c3d")


# -------------------------------------------------------------------------------------- sampling


def test_clip_sampling_hand_computed_and_inside_segments():
    sample = sample_video(30, seed=0, epoch=0, index=1, clip_frames=4, clip_stride=2)
    assert sample.segment_stops == (10, 20, 30)
    for starts, clips in ((sample.query_frames, sample.query_clips), (sample.key_frames, sample.key_clips)):
        assert [clip[0] for clip in clips] == list(starts)
        assert all(list(clip) == [start + 2 * j for j in range(4)] for start, clip in zip(starts, clips))
    for seed in range(200):
        sample = sample_video(30, seed=seed, epoch=1, index=7, clip_frames=4, clip_stride=2)
        for k, (start, stop) in enumerate(segment_bounds(30, 3)):
            query, key = sample.query_clips[k], sample.key_clips[k]
            assert start <= query[0] <= stop - 7 and start <= key[0] <= stop - 7  # the whole clip inside
            assert query[0] != key[0]  # 2 distinct starts: the first draw is the key
    # A segment shorter than the clip: 2 starts, the clip repeats the segment's last frame.
    short = sample_video(12, seed=0, epoch=0, index=1, clip_frames=4, clip_stride=2)
    assert all(clip[0] in (start, start + 1) and max(clip) == stop - 1
               for clip, (start, stop) in zip(short.query_clips, segment_bounds(12, 3)))


def test_clip_sampler_is_the_frame_sampler_for_one_frame_and_deterministic():
    for seed in range(30):
        frames = sample_video(300, seed=seed, epoch=2, index=5, rank=1)
        clips = sample_video(300, seed=seed, epoch=2, index=5, rank=1, clip_frames=1, clip_stride=1)
        assert (clips.key_frames, clips.query_frames, clips.query_order, clips.key_order, clips.order_label,
                clips.anchor_segment) == (frames.key_frames, frames.query_frames, frames.query_order,
                                          frames.key_order, frames.order_label, frames.anchor_segment)
    state = torch.get_rng_state(), np.random.get_state()[1].copy()
    draw = lambda **kw: sample_video(300, clip_frames=8, clip_stride=4, **kw)
    assert draw(seed=1, epoch=2, index=3, rank=0) == draw(seed=1, epoch=2, index=3, rank=0)
    variants = {draw(seed=1, epoch=2, index=3, rank=0), draw(seed=2, epoch=2, index=3, rank=0),
                draw(seed=1, epoch=3, index=3, rank=0), draw(seed=1, epoch=2, index=4, rank=0),
                draw(seed=1, epoch=2, index=3, rank=1)}
    assert len(variants) == 5
    assert torch.equal(torch.get_rng_state(), state[0]) and np.array_equal(np.random.get_state()[1], state[1])
    with pytest.raises(VclrError, match="clip_frames and clip_stride must be >= 1"):
        sample_video(30, seed=0, epoch=0, index=0, clip_frames=4, clip_stride=0)


# --------------------------------------------------------------------------------- augmentation


def _moving_clip(frames: int = T, seed: int = 0) -> torch.Tensor:
    """uint8 [T,3,40,48]: a textured frame shifted 3 pixels per frame (frames differ)."""
    base = torch.randint(0, 256, (3, 40, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return torch.stack([base[:, :, 3 * t:3 * t + 48] for t in range(frames)])


def test_cpu_clip_augmentation_one_draw_for_all_frames_of_a_clip():
    transform = frame_transform(CROP)
    clip = _moving_clip()
    for seed in range(12):  # draws hit every branch (jitter, grayscale, blur, flip) several times
        out = augment_clips([clip], transform, torch.Generator().manual_seed(seed))[0]
        assert out.shape == (3, T, CROP, CROP)
        for t in range(T):  # frame t = the single-frame chain with the clip's draw
            alone = augment_frame(clip[t], transform, torch.Generator().manual_seed(seed))
            assert torch.allclose(out[:, t], alone, atol=1e-6), (seed, t)
    still = clip[:1].expand(T, -1, -1, -1)
    two = augment_clips([still, still], transform, torch.Generator().manual_seed(0))
    assert all(torch.equal(two[0][:, 0], two[0][:, t]) for t in range(T))  # a still clip stays still
    assert not torch.equal(two[0], two[1])  # two clips: two draws


def test_batched_clip_augmentation_broadcasts_one_draw_over_the_clip():
    clips = torch.stack([_moving_clip(seed=s) for s in range(6)])  # [6,T,3,40,48]
    params = ba.draw_params(torch.tensor([[40, 48]]).expand(6, 2), torch.Generator().manual_seed(0))
    out = ba.apply_clip_params(clips.flatten(0, 1), params, clip_frames=T, crop_size=CROP)
    assert out.shape == (6, 3, T, CROP, CROP) and out.is_contiguous()
    for i in range(6):
        for t in range(T):
            alone = ba.apply_params(clips[i, t:t + 1], params.select([i]), crop_size=CROP, channels_last=False)
            assert torch.allclose(out[i, :, t], alone[0], atol=1e-5), (i, t)
    layout = ba.apply_clip_params(clips.flatten(0, 1), params, clip_frames=T, crop_size=CROP, channels_last=True)
    assert layout.is_contiguous(memory_format=torch.channels_last_3d) and torch.allclose(layout, out, atol=1e-6)
    same = ba.apply_clip_params(clips[0, :1].expand(2 * T, -1, -1, -1), ba.draw_params(
        torch.tensor([[40, 48]]).expand(2, 2), torch.Generator().manual_seed(1)), clip_frames=T, crop_size=CROP)
    assert all(torch.equal(same[0, :, 0], same[0, :, t]) for t in range(T)) and not torch.equal(same[0], same[1])


def test_clip_datasets_contract_cpu_and_batched(tiny_data):
    index_csv, frames_dir = tiny_data
    rows, frames = found_rows(index_csv), PackedFrames(frames_dir)
    dataset = PretrainDataset(rows, frames, crop_size=CROP, num_segments=3, seed=5, clip_frames=T, clip_stride=2)
    global_state = torch.get_rng_state()
    item = dataset[2]
    assert torch.equal(torch.get_rng_state(), global_state)
    assert set(item) == set(BATCH_KEYS)
    assert item["xq"].shape == (3, T, CROP, CROP) and item["query_tuple"].shape == (3, 3, T, CROP, CROP)
    sample = dataset.sample(2)
    position = {segment: sample.query_order.index(segment) for segment in range(3)}
    assert torch.equal(item["xq"], item["query_tuple"][position[sample.anchor_segment]])
    assert torch.equal(item["x3"], item["query_tuple"][position[sample.other_segments[1]]])
    assert not torch.equal(item["x1"], item["xq"])
    assert all(torch.equal(item[key], dataset[2][key]) for key in BATCH_KEYS)

    jpeg = PretrainJpegDataset(rows, frames, crop_size=CROP, num_segments=3, seed=5, clip_frames=T, clip_stride=2)
    raw = jpeg[2]
    assert len(raw["jpegs"]) == 2 * 3 * T and len(raw["params"]) == 2 * 3 + 1  # one draw per clip view
    assert raw["source"].tolist() == [0, T, 2 * T, sample.anchor_segment * T, 3 * T, 4 * T, 5 * T]
    batch = collate_jpeg_batch([jpeg[0], raw])
    out = decode_and_augment(batch, torch.device("cpu"), crop_size=CROP, num_segments=3, clip_frames=T)
    assert out["xq"].shape == (2, 3, T, CROP, CROP) and out["key_tuple"].shape == (2, 3, 3, T, CROP, CROP)
    # The second video's xq: its anchor clip's frames, each with the xq view's one parameter set.
    clip = torch.stack([frames.read_frame(rows[2].video_id, i) for i in sample.query_clips[sample.anchor_segment]])
    params = ba.AugmentParams.from_dict(batch, "aug_").select([7 + sample.anchor_segment])
    for t in range(T):
        alone = ba.apply_params(clip[t:t + 1], params, crop_size=CROP, channels_last=False)[0]
        assert torch.allclose(out["xq"][1][:, t], alone, atol=1e-4), t


# --------------------------------------------------------------------------------- model and loop


def test_vclr_step_on_clips_shapes_and_gradients():
    torch.manual_seed(0)
    trunk, dim = build_backbone("x3d_tiny")
    vclr = Vclr(VclrModel(trunk, dim), queue_size=16)
    generator = torch.Generator().manual_seed(1)
    clip = lambda *shape: torch.randn(*shape, 3, T, CROP, CROP, generator=generator)
    batch = {"xq": clip(4), "x1": clip(4), "x2": clip(4), "x3": clip(4), "query_tuple": clip(4, 3),
             "key_tuple": clip(4, 3), "order_label": torch.tensor([0, 1, 2, 3])}
    seen = []

    def shuffle(x):
        seen.append(tuple(x.shape))
        return x, None

    outputs = vclr(batch, shuffle_fn=shuffle, unshuffle_fn=lambda y, state: y)
    assert seen == [(3 * 4 + 4 * 3, 3, T, CROP, CROP)]  # x1..x3 and the key tuple's clips, one pass
    assert outputs["inter_logits"].shape == (12, 17) and outputs["segment_logits"].shape == (4, 17)
    assert outputs["intra_logits"].shape == (8, 2) and outputs["order_logits"].shape == (4, 4)
    total, _ = vclr_loss(outputs)
    total.backward()
    assert vclr.model.backbone.blocks[0].conv.conv_t.weight.grad.abs().sum() > 0


def test_3d_pretraining_runs_and_resumes_exactly_in_both_augment_modes(tiny_data, tmp_path):
    """2 epochs x 2 steps; stopped after step 3 (mid-epoch) and resumed: the same per-step losses and
    weights as the uninterrupted run, with the CPU reference (r2plus1d_tiny) and batched (x3d_tiny) paths."""
    index_csv, frames_dir = tiny_data
    strip = lambda records: [{k: v for k, v in r.items() if k != "videos_per_s"} for r in records]
    for backbone, augment in (("r2plus1d_tiny", "cpu"), ("x3d_tiny", "batched")):
        settings = {**CLIP_SETTINGS, "backbone": backbone, "augment": augment, "epochs": 2, "lr": 0.5}
        whole, split = tmp_path / f"{backbone}_whole", tmp_path / f"{backbone}_split"
        summary = pretrain(settings, index_csv, frames_dir, whole)
        assert summary["completed"] and summary["settings"]["clip_frames"] == T
        assert pretrain({**settings, "max_steps": 3}, index_csv, frames_dir, split)["steps"] == 3
        assert (load_checkpoint(split / "checkpoint_last.pt")["iteration"]) == 1
        pretrain(settings, index_csv, frames_dir, split)
        assert len(_log(whole)) == 4 and strip(_log(split)) == strip(_log(whole))
        a = torch.load(whole / "backbone.pt", weights_only=True)
        b = torch.load(split / "backbone.pt", weights_only=True)
        assert all(torch.equal(a[key], b[key]) for key in a)
        assert is_video_trunk(load_backbone(whole / "backbone.pt", backbone))
    with pytest.raises(VclrError, match=r"other settings \(clip_stride\)"):
        pretrain({**settings, "clip_stride": 2}, index_csv, frames_dir, tmp_path / "x3d_tiny_whole")


def test_clip_settings_are_checked_before_training(tiny_data, tmp_path):
    index_csv, frames_dir = tiny_data
    with pytest.raises(VclrError, match="backbone 'resnet_tiny' is 2D"):
        pretrain({**SETTINGS, "epochs": 1, "clip_frames": 4}, index_csv, frames_dir, tmp_path / "a")
    with pytest.raises(VclrError, match="clip_stride must be positive"):
        pretrain({**CLIP_SETTINGS, "epochs": 1, "clip_stride": 0}, index_csv, frames_dir, tmp_path / "b")
    with pytest.raises(VclrError, match="MoCo v2 weights are 2D"):
        pretrain({**CLIP_SETTINGS, "epochs": 1, "init": "moco_v2:x.pth"}, index_csv, frames_dir, tmp_path / "c")
    with pytest.raises(VclrError, match="trains in bf16 on a GPU only"):  # PyTorch's CPU bf16 conv3d gradients
        pretrain({**CLIP_SETTINGS, "epochs": 1, "bf16": True, "device": "cpu"}, index_csv, frames_dir, tmp_path / "d")
    assert not any((tmp_path / name).exists() for name in "abcd")
    parser = argparse.ArgumentParser()
    from vclr.train import pretrain as pretrain_module

    pretrain_module.configure_parser(parser)
    args = parser.parse_args(["--index", "i", "--frames", "f", "--out", "o", "--backbone", "x3d_tiny",
                              "--clip-frames", "16", "--clip-stride", "2"])
    assert (args.backbone, args.clip_frames, args.clip_stride) == ("x3d_tiny", 16, 2)


# ----------------------------------------------------------------------------------- evaluations


def test_uniform_clip_indices_by_hand():
    assert uniform_clip_indices(20, 2, 4, 2) == [0, 2, 4, 6, 13, 15, 17, 19]  # starts 0 and 13 of 0..13
    assert uniform_clip_indices(5, 2, 4, 2) == [0, 2, 4, 4] * 2  # longer than the video: repeats its end
    assert uniform_clip_indices(12, 3, 1, 1) == [0, 6, 11]  # one-frame clips = uniform frames


def test_clip_features_equal_the_hand_computed_mean_and_record_the_clip(tiny_data, tmp_path):
    index_csv, frames_dir = tiny_data
    rows, frames = read_split(index_csv), PackedFrames(frames_dir)
    trunk = load_backbone("random", "r2plus1d_tiny", seed=1)
    features, ids, labels = extract_features(trunk, rows, frames, num_frames=2, crop=CROP, batch_size=16,
                                             clip_frames=T, clip_stride=2)
    assert features.shape == (8, 128) and ids[0] == "video0" and labels.tolist() == [0, 1] * 4
    indices = uniform_clip_indices(frames.num_frames("video3"), 2, T, 2)
    clip = torch.stack([frames.read_frame("video3", i) for i in indices])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = ((center_crop(clip, CROP) - mean) / std).view(2, T, 3, CROP, CROP).transpose(1, 2)
    with torch.no_grad():
        expected = trunk.eval()(x).mean(0)
    assert np.allclose(features[3], expected.numpy(), atol=1e-5)

    parser = argparse.ArgumentParser()
    features_module.configure_parser(parser)
    common = ["--checkpoint", "random", "--index", str(index_csv), "--frames", str(frames_dir), "--crop", "32",
              "--num-frames", "2"]
    assert features_module.main(parser.parse_args([*common, "--backbone", "r2plus1d_tiny", "--clip-frames", "4",
                                                   "--clip-stride", "2", "--out", str(tmp_path / "a.npz")])) == 0
    assert features_module.main(parser.parse_args([*common, "--backbone", "r2plus1d_tiny", "--clip-frames", "2",
                                                   "--clip-stride", "2", "--out", str(tmp_path / "b.npz")])) == 0
    train, _, _ = load_feature_pair(tmp_path / "a.npz", tmp_path / "a.npz")
    assert (train["provenance"]["clip_frames"], train["provenance"]["clip_stride"]) == (4, 2)
    with pytest.raises(VclrError, match="'clip_frames' differs"):
        load_feature_pair(tmp_path / "a.npz", tmp_path / "b.npz")
    with pytest.raises(VclrError, match="is 2D"):
        features_module.main(parser.parse_args([*common, "--backbone", "resnet_tiny", "--clip-frames", "4",
                                                "--out", str(tmp_path / "c.npz")]))


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    """(index dir, frames dir) of a synthetic UCF101: 4 classes, 12 train / 8 test videos of 16 frames."""
    root = tmp_path_factory.mktemp("video3d_finetune")
    generate_dataset("ucf101", root / "raw", seed=1, classes=4, train_per_class=3, test_per_class=2, width=64,
                     height=48, frames=16)
    settings = ExtractSettings(fps=None, short_side=48, size=None, num_frames=None, quality=90, shards=1)
    run_extract("ucf101", root / "raw" / "videos", root / "frames", settings, progress=False)
    build_index("ucf101", root / "raw" / "annotations", root / "frames", 1, root / "index")
    return root / "index", root / "frames"


def test_finetune_clip_sampling_by_hand():
    rng = np.random.default_rng(0)
    indices = train_frame_indices(30, 3, rng, clip_frames=4, clip_stride=2)
    starts = indices[::4]
    assert all(indices[4 * k:4 * k + 4] == [s + 2 * j for j in range(4)] for k, s in enumerate(starts))
    assert all(a <= s <= b - 7 for s, (a, b) in zip(starts, segment_bounds(30, 3)))
    assert eval_frame_indices(30, 3, 4, 2) == [2, 4, 6, 8, 12, 14, 16, 18, 22, 24, 26, 28]  # centres 5, 15, 25
    assert eval_frame_indices(10, 2, 4, 2) == [0, 2, 4, 6, 3, 5, 7, 9]  # centres 2 and 7, moved inside


def test_clip_classifier_fine_tunes_and_scores_test_clips(ucf, tmp_path):
    index_dir, frames_dir = ucf
    frames = PackedFrames(frames_dir)
    clips = video_clips(read_split(index_dir / "train.csv"), frames, index_dir / "train.csv")
    train_set = FinetuneTrainDataset(clips, frames, "train.csv", num_segments=2, short_side=40, crop=CROP,
                                     augmentation="resized_crop", flip=True, seed=0, clip_frames=T, clip_stride=2)
    sample, _ = train_set[0]
    assert sample.shape == (2, 3, T, CROP, CROP)
    test_set = FinetuneTestDataset(clips, frames, "train.csv", num_frames=2, short_side=40, crop=40, views="three",
                                   clip_frames=T, clip_stride=2)
    assert test_set[0][0].shape == (3, 2, 3, T, 40, 40)

    parser = argparse.ArgumentParser()
    finetune.configure_parser(parser)
    out = tmp_path / "run"
    argv = ["--dataset", "ucf101", "--backbone", "r2plus1d_tiny", "--clip-frames", str(T), "--clip-stride", "2",
            "--index-dir", str(index_dir), "--frames", str(frames_dir), "--out", str(out), "--metrics",
            str(out / "metrics.json"), "--epochs", "1", "--batch-size", "4", "--lr", "1.0", "--segments", "2",
            "--short-side", "40", "--crop", "32", "--test-crop", "40", "--test-frames", "2", "--workers", "0",
            "--device", "cpu", "--deterministic", "--seed", "2"]
    assert finetune.main(parser.parse_args(argv)) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["extra"]["counts"]["test_clips"] == 8 and 0 <= record["metrics"]["top1"] <= 1
    model, meta = load_finetuned(out / "model.pt")
    assert is_video_trunk(model.backbone) and (meta["extra"]["clip_frames"], meta["extra"]["clip_stride"]) == (T, 2)
    with pytest.raises(VclrError, match="TSM shifts a 2D trunk"):
        build_model("tsm", "x3d_tiny", 4, dropout=0.5, n_segments=4)
    with pytest.raises(VclrError, match="per-frame scores need a 2D trunk"):
        frame_scores(model, torch.zeros(4, 3, CROP, CROP))
    with pytest.raises(VclrError, match="is 2D"):
        finetune.resolve_settings("ucf101", "tsn", run={"backbone": "resnet_tiny", "clip_frames": 4})


# --------------------------------------------------------------------------------------- bench


def test_bench_pretrain_covers_3d_backbones(tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "pretrain", "--device", "cpu", "--backbone", "x3d_tiny", "--clip-frames", "4",
                     "--clip-stride", "2", "--batch", "4", "--crop", "32", "--queue-size", "16", "--rounds", "1",
                     "--steps", "1", "--warmup", "0", "--modes", "fp32_eager,bf16_channels_last",
                     "--loop-mode", "fp32_eager", "--loop-steps", "1", "--loop-workers", "0",
                     "--loop-augment", "batched", "--out-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["shapes"]["backbone"] == "x3d_tiny" and result["shapes"]["clip_frames"] == 4
    assert all(entry["videos_per_s"] > 0 for entry in result["synthetic"].values())
    (loop,) = result["loops"]
    assert loop["steps_timed"] == 1 and loop["videos_per_s"] > 0 and loop["prefetch"] == 1
    assert cli.main(["bench", "pretrain", "--device", "cpu", "--backbone", "resnet_tiny", "--clip-frames", "4",
                     "--out-json", str(out)]) == 2


# The learning check (3D-pretrained features beat random 3D inits on retrieval) runs on the tiny
# profile's own 402-step 3D run: tests/test_pipeline.py::test_3d_pretraining_beats_random_3d_inits_on_retrieval.
