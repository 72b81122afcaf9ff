"""vclr.data.batch_augment against the per-frame torchvision reference chain (vclr.data.augment), and
the `augment: batched` pretraining path (tiny, CPU)."""

from __future__ import annotations

import argparse
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from test_pretrain import (  # the same tiny packed data set
    SETTINGS,
    _log,
    write_tiny_data,
)
from torchvision.io import encode_jpeg
from torchvision.transforms.v2 import functional as F

from vclr.data import batch_augment as ba
from vclr.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    blur_kernel_size,
    frame_transform,
)
from vclr.data.packed import PackedFrames, decode_jpeg_bytes
from vclr.data.pretrain_dataset import (
    PretrainJpegDataset,
    collate_jpeg_batch,
    decode_and_augment,
    found_rows,
)
from vclr.data.sampling import sample_video
from vclr.errors import VclrError
from vclr.evaluate.features import center_crop
from vclr.models.vclr import BATCH_KEYS
from vclr.train import pretrain as pretrain_module
from vclr.train.checkpoint import load_checkpoint
from vclr.train.pretrain import pretrain


def smooth_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Float [n,3,H,W] in [0,1]: upsampled noise (textured like frames, no flat regions)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, height // 6 + 2, width // 6 + 2, generator=generator)
    return TF.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)


def ks_statistic(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov distance max |F_a - F_b|."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    points = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, points, "right") / len(a)
                               - np.searchsorted(b, points, "right") / len(b))))


def ks_limit(n: int, m: int) -> float:
    return 2.3 * math.sqrt((n + m) / (n * m))  # alpha = 5e-5 per comparison (~15 in this file)


def assert_rate(flags: torch.Tensor, p: float) -> None:
    n = flags.numel()
    assert abs(flags.double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n), (flags.double().mean(), p)


def test_chain_constants_are_the_reference_chain():
    crop, jitter, gray, blur, flip, _, normalize = frame_transform(224).transforms
    assert (crop.scale, crop.ratio) == (ba.SCALE, ba.RATIO)
    strengths = jitter.transforms[0]
    assert jitter.p == ba.JITTER_P
    b, c, s, h = ba.JITTER_STRENGTH
    assert (strengths.brightness, strengths.contrast, strengths.saturation, strengths.hue) == (
        (1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s), (-h, h))
    assert gray.p == ba.GRAYSCALE_P and blur.p == ba.BLUR_P and flip.p == ba.FLIP_P
    assert tuple(blur.transforms[0].sigma) == ba.SIGMA
    assert blur.transforms[0].kernel_size == (blur_kernel_size(224),) * 2 == (23, 23)
    assert tuple(normalize.mean) == IMAGENET_MEAN and tuple(normalize.std) == IMAGENET_STD


def _reference_boxes(height: int, width: int, draws: int) -> np.ndarray:
    sampler = frame_transform(224).transforms[0]
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        boxes = [sampler.make_params([image]) for _ in range(draws)]
    return np.array([[b["top"], b["left"], b["height"], b["width"]] for b in boxes], float)


@pytest.mark.parametrize("height,width", [(256, 340), (28, 100)])
def test_crop_boxes_follow_torchvisions_rule(height, width):
    """Area fraction, aspect ratio, placement and the centre-crop fallback share the reference's
    distributions; (28, 100) makes most tries fail, so the fallback is frequent (~30%)."""
    draws = 3000
    ours = ba.draw_crop_boxes(torch.tensor([[height, width]]).expand(draws, 2),
                              torch.Generator().manual_seed(0)).numpy()
    reference = _reference_boxes(height, width, draws)
    for boxes in (ours, reference):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    stats = {
        "area": lambda b: b[:, 2] * b[:, 3] / (height * width),
        "log_aspect": lambda b: np.log(b[:, 3] / b[:, 2]),
        "top": lambda b: b[:, 0] / np.maximum(height - b[:, 2], 1),
        "left": lambda b: b[:, 1] / np.maximum(width - b[:, 3], 1),
    }
    for name, stat in stats.items():
        assert ks_statistic(stat(ours), stat(reference)) < ks_limit(draws, draws), name
    if (height, width) == (28, 100):  # fallback: full height, width round(28 * 4/3) = 37, centred
        fallback = lambda b: np.all(b == [0, 31, 28, 37], axis=1)
        rate_ours, rate_ref = fallback(ours).mean(), fallback(reference).mean()
        assert 0.2 < rate_ref < 0.4
        assert abs(rate_ours - rate_ref) < 5 * math.sqrt(2 * rate_ref * (1 - rate_ref) / draws)


def test_crop_fallback_boxes_by_hand():
    generator = torch.Generator().manual_seed(0)
    wide = ba.draw_crop_boxes(torch.tensor([[10, 100]]).expand(50, 2), generator)  # never fits: h >= 12.2
    assert (wide == torch.tensor([0.0, 43, 10, 13], dtype=torch.float64)).all()  # w = round(10 * 4/3)
    tall = ba.draw_crop_boxes(torch.tensor([[100, 10]]).expand(50, 2), generator)
    assert (tall == torch.tensor([43.0, 0, 13, 10], dtype=torch.float64)).all()  # h = round(10 / (3/4))


def test_parameter_rates_and_ranges_match_the_reference():
    draws = 40000
    params = ba.draw_params(torch.tensor([[256, 340]]).expand(draws, 2), torch.Generator().manual_seed(0))
    assert_rate(params.jitter, ba.JITTER_P)
    assert_rate(params.grayscale, ba.GRAYSCALE_P)
    assert_rate(params.blur, ba.BLUR_P)
    assert_rate(params.flip, ba.FLIP_P)
    # Independent coins: e.g. grayscale among the jittered frames at the same rate.
    assert_rate(params.grayscale[params.jitter], ba.GRAYSCALE_P)
    # Factors and sigma against the reference transforms' own samplers.
    _, jitter, _, blur, *_ = frame_transform(224).transforms
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        reference = [jitter.transforms[0].make_params([]) for _ in range(2000)]
        sigmas = [blur.transforms[0].make_params([])["sigma"][0] for _ in range(2000)]
    names = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
    for column, name in enumerate(names):
        ours = params.factors[:, column].numpy()
        theirs = np.array([entry[name] for entry in reference])
        low, high = (-0.1, 0.1) if column == 3 else (0.6, 1.4)
        assert low <= ours.min() and ours.max() <= high and ours.min() < low + 0.01 and ours.max() > high - 0.01
        assert ks_statistic(ours, theirs) < ks_limit(len(ours), len(theirs)), name
    assert ks_statistic(params.sigma.numpy(), sigmas) < ks_limit(draws, len(sigmas))
    assert 0.1 <= params.sigma.min() and params.sigma.max() <= 2.0
    # The op order: a permutation per frame, the 24 equally often (as torch.randperm(4)).
    assert (params.order.sort(1).values == torch.arange(4)).all()
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for row in params.order.tolist():
        counts[tuple(row)] += 1
    expected = draws / 24
    chi2 = sum((count - expected) ** 2 / expected for count in counts.values())
    assert chi2 < 49.7, chi2  # chi-square, 23 degrees of freedom, p = 0.001
    first = [entry["fn_idx"].tolist() for entry in reference]
    assert len({tuple(row) for row in first}) == 24  # the reference also draws all 24 orders


def _params(sizes, **fields) -> ba.AugmentParams:
    params = ba.identity_params(sizes)
    for name, value in fields.items():
        setattr(params, name, torch.as_tensor(value, dtype=getattr(params, name).dtype))
    return params


def test_fixed_parameters_give_torchvisions_pixels():
    image = smooth_images(1, 40, 60)
    # crop + resize: enlarging (antialias has no effect) and shrinking (bilinear, without antialias)
    for box, antialias in (((5, 7, 20, 30), True), ((3, 2, 37, 50), False), ((0, 0, 40, 60), False)):
        ours = ba.resized_crop(image, torch.tensor([box], dtype=torch.float64), 32)
        assert torch.allclose(ours, F.resized_crop(image, *box, size=[32, 32], antialias=antialias), atol=1e-5)
    shrunk = ba.resized_crop(image, torch.tensor([[0, 0, 40, 60]], dtype=torch.float64), 32)
    difference = (shrunk - F.resized_crop(image, 0, 0, 40, 60, size=[32, 32], antialias=True)).abs()
    assert 0 < difference.mean() < 0.01  # the documented difference: no antialias filter when shrinking
    flipped = ba.resized_crop(image, torch.tensor([[5, 7, 20, 30]], dtype=torch.float64), 32,
                              flip=torch.tensor([True]))
    assert torch.allclose(flipped, F.horizontal_flip(F.resized_crop(image, 5, 7, 20, 30, size=[32, 32])), atol=1e-5)

    frames = smooth_images(3, 32, 32, seed=1)
    frames[2, :, :8] = 0.5  # grey pixels (hue undefined)
    frames[2, 1, 8:16] = frames[2, 0, 8:16]  # ties between max channels
    for ours, reference, values in (
            (ba.adjust_brightness, F.adjust_brightness, (0.6, 1.0, 1.4)),
            (ba.adjust_contrast, F.adjust_contrast, (0.6, 1.0, 1.37)),
            (ba.adjust_saturation, F.adjust_saturation, (0.6, 1.2, 1.4)),
            (ba.adjust_hue, F.adjust_hue, (-0.1, 0.03, 0.1))):
        expected = torch.stack([reference(frames[i], value) for i, value in enumerate(values)])
        assert torch.allclose(ours(frames, values), expected, atol=1e-5), ours.__name__
    assert torch.allclose(ba.grayscale(frames).expand_as(frames), F.rgb_to_grayscale(frames, 3), atol=1e-6)
    sigmas = (0.1, 0.9, 2.0)
    expected = torch.stack([F.gaussian_blur(frames[i], [23, 23], [s, s]) for i, s in enumerate(sigmas)])
    assert torch.allclose(ba.gaussian_blur(frames, sigmas, 23), expected, atol=1e-5)
    assert torch.allclose(ba.normalize(frames), F.normalize(frames, IMAGENET_MEAN, IMAGENET_STD), atol=1e-6)


def _reference_chain(image: torch.Tensor, params: ba.AugmentParams, i: int, size: int, kernel: int) -> torch.Tensor:
    """torchvision's functional ops in the order of frame_transform, with frame i's parameters."""
    top, left, h, w = (int(v) for v in params.boxes[i])
    out = F.resized_crop(image, top, left, h, w, size=[size, size], antialias=True)
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    if params.jitter[i]:
        for op in params.order[i].tolist():
            out = ops[op](out, float(params.factors[i, op]))
    if params.grayscale[i]:
        out = F.rgb_to_grayscale(out, 3)
    if params.blur[i]:
        out = F.gaussian_blur(out, [kernel, kernel], [float(params.sigma[i])] * 2)
    if params.flip[i]:
        out = F.horizontal_flip(out)
    if not out.is_floating_point():
        out = F.to_dtype(out, torch.float32, scale=True)
    return F.normalize(out, IMAGENET_MEAN, IMAGENET_STD)


def test_whole_chain_with_drawn_parameters_matches_the_functional_reference():
    """Every op on (crops that enlarge, so antialias plays no role): float input to 1e-4; uint8
    input, where the reference rounds after every op, to a few grey levels on average."""
    n, size = 24, 48
    frames = smooth_images(n, 40, 44, seed=4)
    params = ba.draw_params(torch.tensor([[40, 44]]).expand(n, 2), torch.Generator().manual_seed(5))
    # every jitter order position exercised, each op present
    assert params.jitter.sum() > 12 and params.grayscale.any() and params.blur.any() and params.flip.any()
    ours = ba.apply_params(frames, params, crop_size=size, kernel_size=5, channels_last=False)
    expected = torch.stack([_reference_chain(frames[i], params, i, size, 5) for i in range(n)])
    assert torch.allclose(ours, expected, atol=1e-4)
    pixels = (frames * 255).round().to(torch.uint8)
    ours = ba.apply_params(pixels, params, crop_size=size, kernel_size=5)
    expected = torch.stack([_reference_chain(pixels[i], params, i, size, 5) for i in range(n)])
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert ((ours - expected) * std).abs().mean() < 2.5 / 255


def test_reproducible_chunking_dtype_layout_and_mixed_sizes():
    frames = (smooth_images(6, 36, 50, seed=6) * 255).to(torch.uint8)
    run = lambda seed, **kw: ba.augment_batch(frames, torch.Generator().manual_seed(seed), crop_size=32, **kw)
    first = run(7)
    assert torch.equal(first, run(7)) and not torch.equal(first, run(8))
    assert first.shape == (6, 3, 32, 32) and first.dtype == torch.float32
    assert first.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(run(7, chunk=1), first, atol=1e-6) and torch.allclose(run(7, chunk=6), first, atol=1e-6)
    half = run(7, dtype=torch.bfloat16, channels_last=False)
    assert half.dtype == torch.bfloat16 and half.is_contiguous()
    assert torch.allclose(half.float(), first, atol=0.05)
    # Frames of different sizes in one list: each as if alone.
    other = (smooth_images(2, 44, 30, seed=7) * 255).to(torch.uint8)
    mixed = [frames[0], other[0], frames[1], other[1]]
    sizes = torch.tensor([tuple(frame.shape[-2:]) for frame in mixed])
    params = ba.draw_params(sizes, torch.Generator().manual_seed(9))
    together = ba.apply_params(mixed, params, crop_size=32)
    for i, frame in enumerate(mixed):
        alone = ba.apply_params(frame[None], params.select(slice(i, i + 1)), crop_size=32)
        assert torch.allclose(together[i], alone[0], atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_is_reproducible_and_matches_the_cpu_path():
    """On a GPU (make gpu-bench runs it): a seeded draw gives the same views on rerun, the CPU path's
    views within float tolerance, bf16 channels_last as the step wants; nvjpeg decodes close to libjpeg."""
    frames = (smooth_images(8, 36, 50, seed=11) * 255).to(torch.uint8)

    def run(device: str, **kwargs) -> torch.Tensor:
        return ba.augment_batch(frames.to(device), torch.Generator().manual_seed(5), crop_size=32, **kwargs)

    on_gpu = run("cuda")
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu, run("cuda"))
    assert torch.allclose(on_gpu.cpu(), run("cpu"), atol=1e-3)
    half = run("cuda", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.is_contiguous(memory_format=torch.channels_last)
    jpegs = encode_jpeg(list(frames), quality=90)
    on_cpu, decoded = ba.decode_jpegs(jpegs), ba.decode_jpegs(jpegs, "cuda")
    difference = torch.stack([(a.float() - b.cpu().float()).abs().mean() for a, b in zip(on_cpu, decoded)])
    assert all(d.device.type == "cuda" for d in decoded) and float(difference.max()) < 6  # grey levels


def test_jpeg_decode_and_evaluation_crops():
    pixels = (smooth_images(3, 30, 50, seed=8) * 255).to(torch.uint8)
    jpegs = encode_jpeg(list(pixels), quality=90)
    decoded = ba.decode_jpegs(jpegs)
    assert all(torch.equal(d, decode_jpeg_bytes(j.numpy().tobytes(), "x")) for d, j in zip(decoded, jpegs))
    with pytest.raises(VclrError, match="undecodable JPEG"):
        ba.decode_jpegs([jpegs[0][:40]])
    frames = torch.stack(decoded)
    for crop in (24, 40):  # no resize; short side resized up first
        expected = F.normalize(center_crop(frames, crop), IMAGENET_MEAN, IMAGENET_STD)
        assert torch.allclose(ba.eval_crops(frames, crop), expected, atol=1e-5)
    boxes = ba.eval_crop_boxes([[30, 50], [50, 30]], 24, crops=3)
    assert boxes.tolist() == [[3, 0, 24, 24], [3, 13, 24, 24], [3, 26, 24, 24],
                              [0, 3, 24, 24], [13, 3, 24, 24], [26, 3, 24, 24]]
    three = ba.eval_crops(frames, 24, crops=3)
    assert three.shape == (9, 3, 24, 24)
    left = F.normalize(frames[1:2, :, 3:27, 0:24].float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(three[3:4], left, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("batched_data"))


def test_batched_dataset_contract(tiny_data):
    index_csv, frames_dir = tiny_data
    dataset = PretrainJpegDataset(found_rows(index_csv), PackedFrames(frames_dir), crop_size=32, num_segments=3,
                                  seed=5)
    state = torch.get_rng_state()
    items = [dataset[i] for i in (2, 5)]
    assert torch.equal(torch.get_rng_state(), state)  # no global RNG use
    batch = collate_jpeg_batch(items)
    out = decode_and_augment(batch, torch.device("cpu"), crop_size=32, num_segments=3)
    assert set(out) == set(BATCH_KEYS)
    assert out["xq"].shape == (2, 3, 32, 32) and out["query_tuple"].shape == (2, 3, 3, 32, 32)
    for row, index in enumerate((2, 5)):
        sample = sample_video(12, seed=5, epoch=0, index=index, num_segments=3)
        position = {segment: sample.query_order.index(segment) for segment in range(3)}
        assert torch.equal(out["xq"][row], out["query_tuple"][row, position[sample.anchor_segment]])
        assert torch.equal(out["x2"][row], out["query_tuple"][row, position[sample.other_segments[0]]])
        assert torch.equal(out["x3"][row], out["query_tuple"][row, position[sample.other_segments[1]]])
        assert not torch.equal(out["x1"][row], out["xq"][row])  # same frame, fresh augmentation
        assert int(out["order_label"][row]) == sample.order_label
        assert not any(torch.equal(out["key_tuple"][row, 0], out["query_tuple"][row, j]) for j in range(3))
    again = decode_and_augment(collate_jpeg_batch([dataset[2], dataset[5]]), torch.device("cpu"), crop_size=32,
                               num_segments=3)
    assert all(torch.equal(out[key], again[key]) for key in BATCH_KEYS)
    # x1 is xq's frame: with the augmentation switched off the two views are the same pixels.
    plain = collate_jpeg_batch(items)
    for name in ("jitter", "grayscale", "blur", "flip"):
        plain[f"aug_{name}"] = torch.zeros_like(plain[f"aug_{name}"])
    views = 7
    plain["aug_boxes"] = plain["aug_boxes"].clone()
    for row in range(2):  # the whole frame for xq's view and x1's view
        anchor = int(plain["layout"][row, 0])
        plain["aug_boxes"][anchor] = plain["aug_boxes"][row * views + 3] = torch.tensor([0.0, 0, 40, 48])
    flat = decode_and_augment(plain, torch.device("cpu"), crop_size=32, num_segments=3)
    assert torch.equal(flat["xq"], flat["x1"])
    plain["aug_boxes"][9] = torch.tensor([0.0, 0, 41, 48])  # as if the manifest said 41 rows: refused
    with pytest.raises(VclrError, match=r"video 'video5'.*decodes to \(40, 48\)"):
        decode_and_augment(plain, torch.device("cpu"), crop_size=32, num_segments=3)
    dataset.set_epoch(1)
    assert not torch.equal(decode_and_augment(collate_jpeg_batch([dataset[2]]), torch.device("cpu"), crop_size=32,
                                              num_segments=3)["xq"][0], out["xq"][0])


def test_batched_pretraining_runs_and_resumes_exactly(tiny_data, tmp_path):
    """2 epochs x 2 steps with `augment: batched`: uninterrupted (batches prepared one ahead in the
    prefetch thread, the default) vs stopped at step 3 without prefetching and resumed through the
    CLI (--augment batched, a loader worker, 3 batches ahead): the same losses, bit for bit."""
    index_csv, frames_dir = tiny_data
    settings = {**SETTINGS, "epochs": 2, "augment": "batched"}
    summary = pretrain(settings, index_csv, frames_dir, tmp_path / "whole")
    assert summary["completed"] and summary["steps"] == 4 and summary["settings"]["prefetch"] == 1
    pretrain({**settings, "max_steps": 3, "prefetch": 0}, index_csv, frames_dir, tmp_path / "split")
    checkpoint = load_checkpoint(tmp_path / "split" / "checkpoint_last.pt")
    assert (checkpoint["epoch"], checkpoint["iteration"], checkpoint["step"]) == (1, 1, 3)
    assert checkpoint["config"]["augment"] == "batched"
    parser = argparse.ArgumentParser()
    pretrain_module.configure_parser(parser)
    args = parser.parse_args([
        "--index", str(index_csv), "--frames", str(frames_dir), "--out", str(tmp_path / "split"),
        "--backbone", "resnet_tiny", "--epochs", "2", "--batch-size", "4", "--lr", "2.0", "--warmup-epochs", "1",
        "--queue-size", "16", "--crop", "32", "--segments", "3", "--temperature", "0.1", "--seed", "3",
        "--checkpoint-every", "1", "--deterministic", "--device", "cpu", "--workers", "1", "--augment", "batched",
        "--prefetch", "3"])
    assert pretrain_module.main(args) == 0
    strip = lambda records: [{k: v for k, v in r.items() if k != "videos_per_s"} for r in records]
    expected, got = strip(_log(tmp_path / "whole")), strip(_log(tmp_path / "split"))
    assert len(expected) == 4 and got == expected
    a = torch.load(tmp_path / "whole" / "backbone.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "backbone.pt", weights_only=True)
    assert all(torch.equal(a[key], b[key]) for key in a)
    # The augmentation path is part of a run's identity; a checkpoint older than the setting
    # counts as `cpu`.
    with pytest.raises(VclrError, match=r"other settings \(augment\)"):
        pretrain({**settings, "augment": "cpu", "epochs": 3}, index_csv, frames_dir, tmp_path / "split")
    state = load_checkpoint(tmp_path / "whole" / "checkpoint_last.pt")
    del state["config"]["augment"]
    (tmp_path / "old").mkdir()
    torch.save(state, tmp_path / "old" / "checkpoint_last.pt")
    with pytest.raises(VclrError, match=r"other settings \(augment\)"):
        pretrain(settings, index_csv, frames_dir, tmp_path / "old")
    assert pretrain({**settings, "augment": "cpu"}, index_csv, frames_dir, tmp_path / "old")["completed"]
    with pytest.raises(VclrError, match="augment: expected one of cpu, batched"):
        pretrain({**settings, "augment": "gpu"}, index_csv, frames_dir, tmp_path / "bad")
