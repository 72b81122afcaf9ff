"""The training-video sampler and the per-frame augmentation (pure, reproducible, RNG-isolated)."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from vclr.data.augment import augment_frame, augment_frames, blur_kernel_size, frame_transform
from vclr.data.sampling import derive_seed, sample_video, segment_bounds, shuffled_order
from vclr.errors import VclrError


def draws(num_frames: int = 10, count: int = 400, num_segments: int = 3, **kwargs):
    return [sample_video(num_frames, seed=7, epoch=0, index=i, num_segments=num_segments, **kwargs)
            for i in range(count)]


def test_segment_bounds_cover_all_frames_remainder_in_last():
    assert segment_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert segment_bounds(300, 3) == [(0, 100), (100, 200), (200, 300)]
    assert segment_bounds(11, 4) == [(0, 2), (2, 4), (4, 6), (6, 11)]


def test_two_distinct_frames_per_segment_covering_each_segment():
    bounds = segment_bounds(10, 3)
    seen = [set() for _ in bounds]
    for sample in draws():
        for k, (start, stop) in enumerate(bounds):
            key, query = sample.key_frames[k], sample.query_frames[k]
            assert start <= key < stop and start <= query < stop and key != query
            seen[k].update((key, query))
    assert seen == [set(range(0, 3)), set(range(3, 6)), set(range(6, 10))]  # frame 9 (remainder) drawn


def test_key_frame_is_the_first_draw():
    sample = sample_video(300, seed=3, epoch=2, index=17, rank=1)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([3, 2, 17, 1])))
    for k, (start, stop) in enumerate(segment_bounds(300, 3)):
        first, second = rng.choice(stop - start, size=2, replace=False)
        assert (sample.key_frames[k], sample.query_frames[k]) == (start + first, start + second)


def test_shuffles_are_never_forward_or_reversed_and_labels_map():
    labels = Counter()
    shuffles = Counter()
    for sample in draws(count=600):
        query_shuffled = sample.query_order != (0, 1, 2)
        key_shuffled = sample.key_order != (0, 1, 2)
        for order in (sample.query_order, sample.key_order):
            assert sorted(order) == [0, 1, 2] and order != (2, 1, 0)
            if order != (0, 1, 2):
                shuffles[order] += 1
        assert sample.order_label == {(False, False): 0, (True, False): 1, (False, True): 2, (True, True): 3}[
            (query_shuffled, key_shuffled)]
        assert sample.query_tuple == tuple(sample.query_frames[p] for p in sample.query_order)
        assert sample.key_tuple == tuple(sample.key_frames[p] for p in sample.key_order)
        labels[sample.order_label] += 1
    assert set(shuffles) == {(0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1)}
    assert all(100 < labels[label] < 200 for label in range(4)), labels  # p = 1/4 each


def test_shuffled_order_longer_tuples():
    rng = np.random.default_rng(0)
    orders = {shuffled_order(rng, 4) for _ in range(500)}
    assert len(orders) == 24 - 2 and (0, 1, 2, 3) not in orders and (3, 2, 1, 0) not in orders


def test_frame_views_anchor_and_other_segments():
    anchors = Counter()
    for sample in draws():
        anchors[sample.anchor_segment] += 1
        assert set(sample.other_segments) == {0, 1, 2} - {sample.anchor_segment}
        assert sample.xq_frame == sample.query_frames[sample.anchor_segment]
        assert {sample.x2_frame, sample.x3_frame} == set(sample.query_frames) - {sample.xq_frame}
    assert set(anchors) == {0, 2} and 150 < anchors[0] < 250
    five = sample_video(50, seed=0, epoch=0, index=0, num_segments=5)
    assert five.anchor_segment in (0, 4) and set(five.other_segments) == {0, 2, 4} - {five.anchor_segment}


def test_determinism_and_variation():
    def samples(seed=1, epoch=4, rank=0, first_index=9):
        return [sample_video(300, seed=seed, epoch=epoch, index=first_index + i, rank=rank) for i in range(3)]

    assert samples() == samples()
    for changed in (dict(epoch=5), dict(rank=1), dict(first_index=12), dict(seed=2)):
        assert samples(**changed) != samples(), changed
    assert derive_seed(1, 4, 9) == derive_seed(1, 4, 9) != derive_seed(1, 5, 9)
    assert 0 <= derive_seed(1, 4, 9) < 2**63


def test_global_rngs_untouched():
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    draws(count=20)
    augment_frames(torch.zeros(2, 3, 20, 24, dtype=torch.uint8), frame_transform(16),
                   torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1]) and after[2:] == numpy_state[2:]


def test_too_short_video_and_too_few_segments():
    with pytest.raises(VclrError, match=r"video 'v_Short_g01_c01' has 5 frames; .* at least 6"):
        sample_video(5, seed=0, epoch=0, index=0, video="v_Short_g01_c01")
    sample = sample_video(6, seed=0, epoch=0, index=0)
    assert [set(pair) for pair in zip(sample.key_frames, sample.query_frames)] == [{0, 1}, {2, 3}, {4, 5}]
    with pytest.raises(VclrError, match="num_segments"):
        sample_video(300, seed=0, epoch=0, index=0, num_segments=2)


def test_augmentation_shapes_reproducibility_and_independent_draws():
    assert blur_kernel_size(224) == 23 and blur_kernel_size(112) == 11 and blur_kernel_size(16) == 3
    frame = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    transform = frame_transform(24)
    out = augment_frame(frame, transform, torch.Generator().manual_seed(5))
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert out.min() < -0.5 and out.max() > 0.5  # normalised, not [0, 1]
    again = augment_frame(frame, transform, torch.Generator().manual_seed(5))
    assert torch.equal(out, again)
    batch = augment_frames(frame.expand(4, -1, -1, -1), transform, torch.Generator().manual_seed(5))
    assert batch.shape == (4, 3, 24, 24)
    assert torch.equal(batch[0], out)
    for i in range(1, 4):  # every frame its own draw
        assert not torch.equal(batch[i], batch[0])
