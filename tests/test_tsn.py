"""TSN / TSM models: the temporal shift against a per-channel reference, the residual placement,
segmental consensus and test averaging on hand-computed cases, initialisation and the saved model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from vclr.errors import VclrError
from vclr.models.backbones import TinyResNet
from vclr.models.tsn import (
    TSN,
    ShiftedConv2d,
    add_temporal_shift,
    build_model,
    frame_scores,
    load_finetuned,
    save_finetuned,
    temporal_shift,
    video_scores,
)
from vclr.train.checkpoint import CHECKPOINT_FORMAT


def _reference_shift(x: torch.Tensor, segments: int, fold: int) -> torch.Tensor:
    """Element by element: channel c of frame t reads frame t+1 (c < fold), t-1 (fold <= c < 2 fold)
    or t (otherwise); outside the clip it reads zero."""
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        clip, t = divmod(i, segments)
        for c in range(x.shape[1]):
            source = t + 1 if c < fold else t - 1 if c < 2 * fold else t
            out[i, c] = x[clip * segments + source, c] if 0 <= source < segments else 0
    return out


@pytest.mark.parametrize("shift_div, fold", [(8, 2), (16, 1), (4, 4)])
def test_temporal_shift_matches_the_per_channel_reference(shift_div, fold):
    x = torch.randn(2 * 4, 16, 2, 3)  # 2 clips x 4 segments, 16 channels
    shifted = temporal_shift(x, 4, shift_div)
    assert torch.equal(shifted, _reference_shift(x, 4, fold))


def test_shift_gradient_is_the_opposite_shift():
    x = torch.randn(2 * 3, 8, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: temporal_shift(t, 3, 4), (x,))
    weights = torch.randn(6, 8, 2, 2, dtype=torch.float64)
    (temporal_shift(x, 3, 4) * weights).sum().backward()
    reference = x.detach().clone().requires_grad_()
    (_reference_shift(reference, 3, 2) * weights).sum().backward()
    assert torch.equal(x.grad, reference.grad)


def test_shift_fraction_direction_and_zero_padding():
    segments, channels = 4, 16
    # value = frame number + 1 in every channel: where each channel's value comes from is visible
    x = (torch.arange(segments, dtype=torch.float32) + 1).view(segments, 1, 1, 1).expand(segments, channels, 1, 1)
    out = temporal_shift(x.contiguous(), segments, 8)[:, :, 0, 0]
    assert out[:, 0].tolist() == [2, 3, 4, 0] == out[:, 1].tolist()  # 1/8 from the next frame, zero at the end
    assert out[:, 2].tolist() == [0, 1, 2, 3] == out[:, 3].tolist()  # 1/8 from the previous frame, zero at the start
    assert all(out[:, c].tolist() == [1, 2, 3, 4] for c in range(4, channels))  # 3/4 unchanged
    with pytest.raises(VclrError, match="not a multiple of the 4 segments"):
        temporal_shift(torch.zeros(6, 16, 1, 1), 4)


def test_tsm_shifts_the_residual_branch_only():
    torch.manual_seed(0)
    trunk = TinyResNet()
    keys = list(trunk.state_dict())
    assert add_temporal_shift(trunk, n_segments=2) == 4  # one block per layer in the tiny ResNet
    assert list(trunk.state_dict()) == keys  # checkpoints load unchanged
    block = trunk.layer1[0].eval()
    assert isinstance(block.conv1, ShiftedConv2d) and block.downsample is None
    x = torch.randn(4, 16, 6, 6)
    branch = block.bn2(block.conv2(F.relu(block.bn1(F.conv2d(temporal_shift(x, 2, 8), block.conv1.weight,
                                                             padding=1)))))
    assert torch.allclose(block(x), F.relu(branch + x), atol=1e-6)  # identity: x itself, not shifted


class _MeanColour(nn.Module):
    """A trunk whose feature is the frame's mean colour [N, 3]: scores by hand."""

    def forward(self, x):
        return x.mean((2, 3))


def _colour_tsn(n_segments=None) -> TSN:
    model = TSN(_MeanColour(), 3, 3, dropout=0.5, n_segments=None)
    with torch.no_grad():
        model.fc.weight.copy_(torch.eye(3))
        model.fc.bias.zero_()
    model.n_segments = n_segments
    return model.eval()


def _clips(colours) -> torch.Tensor:
    """[B, T, 3, 2, 2] clips of constant-colour frames."""
    return torch.tensor(colours, dtype=torch.float32)[..., None, None].expand(-1, -1, -1, 2, 2)


def test_segmental_consensus_is_the_average_of_frame_scores():
    model = _colour_tsn()
    clips = _clips([[[1, 0, 0], [0, 1, 0], [0, 1, 0]], [[0, 0, 3], [0, 0, 0], [3, 0, 0]]])
    assert torch.allclose(model.frame_logits(clips)[0, 1], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(model(clips), torch.tensor([[1 / 3, 2 / 3, 0.0], [1.0, 0.0, 1.0]]))
    model.train()  # dropout (p=0.5) on the features before the fc: each score is 0 or twice its value
    torch.manual_seed(0)
    kept = model.frame_logits(clips) / model.eval().frame_logits(clips).clamp(min=1e-9)
    nonzero = model.eval().frame_logits(clips) > 0
    assert set(kept[nonzero].round().tolist()) == {0.0, 2.0}


def test_test_time_average_of_scores_and_of_probabilities():
    model = _colour_tsn()
    # one video, 2 views x 1 frame
    views = _clips([[[2, 0, 0]], [[0, 0, 0]]]).unsqueeze(0)
    assert torch.allclose(video_scores(model, views, "score"), torch.tensor([[1.0, 0.0, 0.0]]))
    e2 = torch.e ** 2
    first = torch.tensor([e2, 1, 1]) / (e2 + 2)
    expected = (first + torch.full((3,), 1 / 3)) / 2
    assert torch.allclose(video_scores(model, views, "prob"), expected.unsqueeze(0))
    with pytest.raises(VclrError, match="test average"):
        video_scores(model, views, "max")


def test_frame_scores_per_frame_and_in_tsm_groups():
    model = _colour_tsn()
    frames = _clips([[[1, 0, 0], [0, 2, 0], [0, 0, 3]]])[0]
    model.train()
    assert torch.equal(frame_scores(model, frames, batch_size=2), torch.diag(torch.tensor([1.0, 2, 3])))
    assert model.training  # restored
    model.n_segments = 2
    with pytest.raises(VclrError, match="not a multiple of the TSM's 2 segments"):
        frame_scores(model, frames)


def test_build_model_from_backbone_file_pretraining_checkpoint_and_random(tmp_path):
    torch.manual_seed(1)
    trunk = TinyResNet()
    torch.save(trunk.state_dict(), tmp_path / "backbone.pt")
    torch.save({"format": CHECKPOINT_FORMAT,
                "vclr": {f"model.backbone.{k}": v for k, v in trunk.state_dict().items()}},
               tmp_path / "checkpoint_last.pt")
    for init in ("backbone.pt", "checkpoint_last.pt"):
        model = build_model("tsn", "resnet_tiny", 5, init=tmp_path / init, dropout=0.4)
        assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in trunk.state_dict().items())
        assert model.fc.out_features == 5 and model.fc.in_features == 128
    a = build_model("tsm", "resnet_tiny", 5, dropout=0.5, n_segments=4, init_std=0.001, seed=3)
    b = build_model("tsm", "resnet_tiny", 5, dropout=0.5, n_segments=4, init_std=0.001, seed=3)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert 0 < float(a.fc.weight.detach().std()) < 0.002 and float(a.fc.bias.detach().abs().max()) == 0
    with pytest.raises(VclrError, match="needs n_segments"):
        build_model("tsm", "resnet_tiny", 5, dropout=0.5)
    with pytest.raises(VclrError, match="unknown architecture"):
        build_model("i3d", "resnet_tiny", 5, dropout=0.5)


def test_tsm_sees_frame_order_and_tsn_does_not():
    torch.manual_seed(0)
    clips = torch.randn(1, 4, 3, 32, 32)
    backwards = clips.flip(1)
    tsn = build_model("tsn", "resnet_tiny", 3, dropout=0.0).eval()
    tsm = build_model("tsm", "resnet_tiny", 3, dropout=0.0, n_segments=4).eval()
    with torch.no_grad():
        assert torch.allclose(tsn(clips), tsn(backwards), atol=1e-5)
        assert not torch.allclose(tsm(clips), tsm(backwards), atol=1e-5)
        with pytest.raises(VclrError, match="built for 4 segments"):
            tsm(clips[:, :3])


def test_saved_model_round_trip(tmp_path):
    model = build_model("tsm", "resnet_tiny", 4, dropout=0.5, n_segments=2, seed=5).eval()
    save_finetuned(tmp_path / "model.pt", model, arch="tsm", backbone="resnet_tiny", dropout=0.5,
                   class_names=["a", "b", "c", "d"])
    loaded, meta = load_finetuned(tmp_path / "model.pt")
    assert meta["class_names"] == ["a", "b", "c", "d"] and meta["n_segments"] == 2 and not loaded.training
    clips = torch.randn(2, 2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(clips), model(clips))
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(VclrError, match="bad.pt: not a fine-tuned model"):
        load_finetuned(tmp_path / "bad.pt")
