"""TSN and TSM for fine-tuning (spec/protocols.md, "Fine-tuning"), in plain PyTorch.

TSN: a 2D trunk (vclr.models.backbones) applied to every sampled frame, dropout, one linear layer to
the classes, and segmental consensus = the average of the per-frame scores (mmaction2's TSNHead:
pool -> dropout -> fc -> mean over segments).

TSM: the same network with a temporal shift at the start of every residual block's branch (the input
of the block's conv1; the identity path is not shifted: mmaction2's `shift_place='blockres'`). The
frames of a clip sit next to each other in the batch ([B*T, C, H, W], clip-major), and a shift mixes
neighbouring frames of the same clip only, with zeros beyond the clip's ends.

With a 3D trunk (vclr.models.video3d) the same TSN is the clip classifier: each segment contributes a
clip [3,T,H,W] instead of a frame, the trunk scores every clip, and the consensus averages the clip
scores (one segment = the usual single-clip 3D fine-tuning). TSM's shift applies to 2D trunks only.

The shift fraction follows the authors' stack (mmaction2 ResNetTSM, `shift_div=8`; the TSM paper's
default): fold = C // shift_div channels take the NEXT frame's values and the following fold the
PREVIOUS frame's, so 1/8 of the channels move each way (1/4 in all) and the rest stay.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vclr.errors import VclrError
from vclr.evaluate.features import load_backbone
from vclr.io_utils import atomic_open
from vclr.models.backbones import (
    ALL_BACKBONES,
    build_backbone,
    copy_checked,
    is_video_backbone,
    read_checkpoint_file,
)
from vclr.models.video3d import is_video_trunk

ARCHS = ("tsn", "tsm")
FINETUNED_FORMAT = "vclr-finetuned/1"
TEST_AVERAGES = ("score", "prob")


def _shift(x: torch.Tensor, n_segments: int, fold: int, forward: bool) -> torch.Tensor:
    """One pass over x: channels [0, fold) read frame t+1, [fold, 2 fold) frame t-1 (swapped when
    not `forward`: the gradient of a shift is the opposite shift), zeros beyond the clip's ends."""
    clips = x.reshape(x.shape[0] // n_segments, n_segments, *x.shape[1:])
    out = torch.empty_like(clips)
    ahead, behind = (slice(0, fold), slice(fold, 2 * fold)) if forward else (slice(fold, 2 * fold), slice(0, fold))
    out[:, :-1, ahead] = clips[:, 1:, ahead]
    out[:, -1, ahead] = 0
    out[:, 1:, behind] = clips[:, :-1, behind]
    out[:, 0, behind] = 0
    out[:, :, 2 * fold:] = clips[:, :, 2 * fold:]
    return out.reshape(x.shape)


class _TemporalShift(torch.autograd.Function):
    """The shift with its exact backward (the opposite shift): autograd through the slice
    assignments would materialise a zero tensor of the whole activation per slice."""

    @staticmethod
    def forward(ctx, x, n_segments, fold):
        ctx.n_segments, ctx.fold = n_segments, fold
        return _shift(x, n_segments, fold, forward=True)

    @staticmethod
    def backward(ctx, grad):
        return _shift(grad, ctx.n_segments, ctx.fold, forward=False), None, None


def temporal_shift(x: torch.Tensor, n_segments: int, shift_div: int = 8) -> torch.Tensor:
    """TSM's shift of x [B*T, C, H, W] (T = n_segments frames per clip, clip-major).

    Channels [0, f) of frame t take frame t+1's values (zero at the last frame), channels [f, 2f)
    take frame t-1's (zero at the first frame), the others are unchanged; f = C // shift_div.
    """
    if x.shape[0] % n_segments:
        raise VclrError(f"temporal shift: {x.shape[0]} frames in the batch is not a multiple of the "
                        f"{n_segments} segments per clip")
    return _TemporalShift.apply(x, n_segments, x.shape[1] // shift_div)


class ShiftedConv2d(nn.Conv2d):
    """A Conv2d whose input is temporally shifted first. Same parameters and state-dict keys as the
    Conv2d it replaces, so backbone checkpoints load into a TSM unchanged."""

    n_segments: int
    shift_div: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(temporal_shift(x, self.n_segments, self.shift_div))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temporal_shift(n_segments={self.n_segments}, shift_div={self.shift_div})"


def add_temporal_shift(backbone: nn.Module, n_segments: int, shift_div: int = 8) -> int:
    """Turn a ResNet trunk into TSM's in place: shift the input of each residual block's conv1
    (layer1..layer4, BasicBlock or Bottleneck). Returns the number of shifted blocks."""
    if n_segments < 1 or shift_div < 2:
        raise VclrError(f"temporal shift needs n_segments >= 1 and shift_div >= 2, got {n_segments}, {shift_div}")
    count = 0
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        for block in getattr(backbone, layer):
            conv = block.conv1
            if type(conv) is not nn.Conv2d:
                raise VclrError(f"{layer}: block conv1 is {type(conv).__name__}, expected a plain Conv2d")
            conv.__class__ = ShiftedConv2d  # keep the very parameters (and their keys)
            conv.n_segments, conv.shift_div = n_segments, shift_div
            count += 1
    return count


class TSN(nn.Module):
    """Trunk + dropout + fc; `forward` returns the segmental consensus (mean of per-frame scores).

    `n_segments` is None for TSN and the frames per clip for TSM (whose trunk is shifted).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, *, dropout: float,
                 n_segments: int | None = None, shift_div: int = 8, init_std: float = 0.01):
        super().__init__()
        if num_classes < 1 or not 0 <= dropout < 1:
            raise VclrError(f"TSN needs num_classes >= 1 and 0 <= dropout < 1, got {num_classes}, {dropout}")
        self.backbone = backbone
        self.n_segments = n_segments
        self.shift_div = shift_div
        if n_segments is not None:
            add_temporal_shift(backbone, n_segments, shift_div)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(feature_dim, num_classes)
        nn.init.normal_(self.fc.weight, 0.0, init_std)  # mmaction2's heads: N(0, init_std), bias 0
        nn.init.zeros_(self.fc.bias)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def frame_logits(self, clips: torch.Tensor) -> torch.Tensor:
        """clips [B, T, 3, H, W] -> per-frame class scores [B, T, classes]; with a 3D trunk
        [B, K, 3, T', H, W] (K segment clips) -> per-clip scores [B, K, classes]."""
        batch, frames = clips.shape[:2]
        if self.n_segments is not None and frames != self.n_segments:
            raise VclrError(f"TSM built for {self.n_segments} segments got clips of {frames} frames")
        features = self.backbone(clips.flatten(0, 1))
        return self.fc(self.dropout(features)).view(batch, frames, -1)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """clips [B, T, 3, H, W] -> consensus scores [B, classes] (average over the T frames, in fp32
        also under autocast); a 3D trunk's [B, K, 3, T', H, W]: the average over the K clips."""
        return self.frame_logits(clips).float().mean(1)


def video_scores(model: nn.Module, views: torch.Tensor, average: str = "score") -> torch.Tensor:
    """Test-time scores of videos given as views [B, V, T, 3, H, W] (V crops, T frames each; a 3D
    trunk's [B, V, N, 3, T', H, W]: N clips each).

    average "score": mean of the raw scores over all V x T frames (mmaction2's TSN test, no softmax);
    "prob": softmax of each view's consensus, averaged over the V views (TSM's `average_clips='prob'`).
    """
    if average not in TEST_AVERAGES:
        raise VclrError(f"test average {average!r} not one of {', '.join(TEST_AVERAGES)}")
    batch, count = views.shape[:2]
    scores = model(views.flatten(0, 1)).float().view(batch, count, -1)
    return (scores.softmax(-1) if average == "prob" else scores).mean(1)


@torch.no_grad()
def frame_scores(model: TSN, frames: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Per-frame class scores [N, classes] (float32, no consensus, eval mode) of frames [N, 3, H, W],
    already normalised: what temporal localisation takes as each snippet's feature.

    For a TSN every frame is independent, so it is computed `batch_size` frames at a time. A TSM mixes
    neighbouring frames: N must be a multiple of its n_segments and consecutive groups are its clips.
    """
    if is_video_trunk(model.backbone):
        raise VclrError("frame_scores: per-frame scores need a 2D trunk; this classifier's trunk is 3D (clips)")
    was_training = model.training
    model.eval()
    try:
        group = model.n_segments or 1
        if frames.shape[0] % group:
            raise VclrError(f"frame_scores: {frames.shape[0]} frames is not a multiple of the TSM's "
                            f"{group} segments")
        step = max(group, batch_size // group * group)
        outputs = [model.frame_logits(chunk.reshape(-1, group, *frames.shape[1:])).flatten(0, 1).float()
                   for chunk in frames.split(step)]
        return torch.cat(outputs) if outputs else frames.new_zeros((0, model.num_classes))
    finally:
        model.train(was_training)


def trunk_feature_dim(backbone: nn.Module) -> int:
    """Width of a ResNet trunk's pooled feature: the channels of layer4's last BatchNorm (a 3D
    trunk states it)."""
    if is_video_trunk(backbone):
        return backbone.feature_dim
    norms = [module for module in backbone.layer4.modules() if isinstance(module, nn.BatchNorm2d)]
    return norms[-1].num_features


def build_model(arch: str, backbone_name: str, num_classes: int, *, init: str | os.PathLike = "random",
                dropout: float, n_segments: int | None = None, shift_div: int = 8, init_std: float = 0.01,
                seed: int = 0) -> TSN:
    """A TSN ('tsn') or TSM ('tsm', `n_segments` frames per clip) with the trunk from `init`: our
    backbone.pt, a pretraining checkpoint (its query backbone), any torchvision-layout state dict,
    or 'random' (drawn from `seed`). The fc is drawn from `seed` too; the caller's RNG is untouched."""
    if arch not in ARCHS:
        raise VclrError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    if backbone_name not in ALL_BACKBONES:
        raise VclrError(f"unknown backbone {backbone_name!r}; expected one of {', '.join(ALL_BACKBONES)}")
    if arch == "tsm" and not n_segments:
        raise VclrError("a TSM needs n_segments (the frames of one clip)")
    if arch == "tsm" and is_video_backbone(backbone_name):
        raise VclrError(f"a TSM shifts a 2D trunk; {backbone_name!r} is 3D (use arch tsn: a clip classifier)")
    backbone = load_backbone(init, backbone_name, seed=seed)
    feature_dim = trunk_feature_dim(backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TSN(backbone, feature_dim, num_classes, dropout=dropout,
                   n_segments=n_segments if arch == "tsm" else None, shift_div=shift_div, init_std=init_std)


def save_finetuned(path: str | os.PathLike, model: TSN, *, arch: str, backbone: str, dropout: float,
                   class_names: Sequence[str], extra: dict | None = None) -> None:
    """The fine-tuned network as one file load_finetuned rebuilds without any other input."""
    state = {
        "format": FINETUNED_FORMAT, "arch": arch, "backbone": backbone, "num_classes": model.num_classes,
        "dropout": dropout, "n_segments": model.n_segments, "shift_div": model.shift_div,
        "class_names": list(class_names), "extra": extra or {},
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
    }
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)


def load_finetuned(path: str | os.PathLike) -> tuple[TSN, dict]:
    """(model in eval mode, metadata: arch, backbone, num_classes, class_names, ...) of save_finetuned's file."""
    path = Path(path)
    state = read_checkpoint_file(path)
    if not isinstance(state, dict) or state.get("format") != FINETUNED_FORMAT:
        raise VclrError(f"{path}: not a fine-tuned model (format {FINETUNED_FORMAT!r} expected)")
    backbone, feature_dim = build_backbone(state["backbone"])
    model = TSN(backbone, feature_dim, state["num_classes"], dropout=state["dropout"],
                n_segments=state["n_segments"], shift_div=state["shift_div"])
    copy_checked(model, state["state_dict"], f"{path} ({state['arch']}, {state['backbone']})")
    meta = {key: value for key, value in state.items() if key != "state_dict"}
    return model.eval(), meta
