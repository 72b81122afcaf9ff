"""3D video trunks built from pytorchvideo's model blocks: one "segment sample" is a clip [3,T,H,W].

Every trunk maps clips [N, 3, T, H, W] to a global-average-pooled feature [N, feature_dim], like the
2D trunks of vclr.models.backbones map frames [N, 3, H, W]; the VCLR heads, losses, fine-tuning
classifier and feature extraction are shared. The trunks are pytorchvideo `Net`s (`blocks.0` stem,
`blocks.1..4` residual stages, `blocks.5` pooling), initialised by pytorchvideo's ResNet-style
init (Kaiming convolutions, zero-initialised last BatchNorm of every residual branch).

  r3d_18, r2plus1d_18  18-layer basic-block ResNets (Tran et al. 2018; the layout of torchvision's
                       video models): 3x3x3 or (2+1)D convolutions, widths 64-128-256-512, stages
                       2 and 4 downsample space and time by 2. pytorchvideo has no depth-18 builder,
                       so they are assembled from its stem, residual-stage and 2+1D conv builders.
  x3d_s                pytorchvideo's create_x3d with the X3D-S factors (width 2.0, depth 2.2); its
                       head keeps the projected pooling (conv5 432 -> pool -> 2048) with adaptive
                       pooling (any clip length and crop) and no classifier. Its keys are those of
                       pytorchvideo's x3d_s, so that checkpoint loads (blocks.5.proj.* dropped).
  r2plus1d_tiny,       CPU-sized variants for the `tiny` profile and tests: R(2+1)D with widths
  x3d_tiny             16-32-64-128, one block per stage and a stem max pool (as TinyResNet); X3D
                       with stem 8 channels, one block per stage, a 128-d output.

pytorchvideo is imported only when a 3D trunk is built: the 2D path never needs it.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

VIDEO_BACKBONES = ("r2plus1d_18", "r3d_18", "x3d_s", "r2plus1d_tiny", "x3d_tiny")
# Segment clip used when a setting does not say: 8 frames, every 4th (29 frames, ~1 s at 30 fps).
DEFAULT_CLIP_FRAMES = 8
DEFAULT_CLIP_STRIDE = 4
# Per-trunk checkpoint keys that are not part of the trunk (a classifier of a pytorchvideo model).
IGNORED_KEY_PREFIXES = {"x3d_s": ("blocks.5.proj.",), "x3d_tiny": ("blocks.5.proj.",)}

_RESNET18 = {"widths": (64, 128, 256, 512), "depths": (2, 2, 2, 2), "stem_inner": 45, "stem_pool": False}
# The tiny trunk pools in the stem like vclr.models.backbones.TinyResNet (4x fewer positions in
# stage 1: a CPU training step ~3x faster) and has its widths and one block per stage.
_RESNET_TINY = {"widths": (16, 32, 64, 128), "depths": (1, 1, 1, 1), "stem_inner": 12, "stem_pool": True}


def _pytorchvideo():
    """Import pytorchvideo's model modules (silencing its torch.jit deprecation warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from pytorchvideo.layers.convolutions import create_conv_2plus1d
        from pytorchvideo.models import head, resnet, stem, x3d
    return {"conv_2plus1d": create_conv_2plus1d, "head": head, "resnet": resnet, "stem": stem,
            "x3d": x3d}


class VideoTrunk(nn.Module):
    """pytorchvideo's Net (the blocks in sequence, its ResNet-style init) ending in a pooled feature
    [N, feature_dim]; the same `blocks.<i>` state-dict keys as pytorchvideo's models."""

    def __init__(self, blocks: nn.ModuleList, feature_dim: int):
        super().__init__()
        self.blocks = blocks
        self.feature_dim = feature_dim
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from pytorchvideo.models.weight_init import init_net_weights
        init_net_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def is_video_trunk(module: nn.Module) -> bool:
    """True for a trunk made here (it takes clips [N,3,T,H,W], not frames)."""
    return isinstance(module, VideoTrunk)


class GlobalPool(nn.Module):
    """[N, C, T, H, W] -> [N, C]: the global average pool of the ResNet trunks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3, 4))


def _conv3d(*, in_channels: int, out_channels: int, kernel_size, stride, padding, bias: bool = False,
            inner_channels: int | None = None) -> nn.Module:
    """A full t x k x k convolution (`inner_channels`, the (2+1)D width, does not apply)."""
    return nn.Conv3d(in_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=padding, bias=bias)


def _conv2plus1d(*, in_channels: int, out_channels: int, kernel_size, stride, padding, bias: bool = False,
                 inner_channels: int | None = None) -> nn.Module:
    """(2+1)D factorisation of a t x k x k convolution: spatial 1 x k x k to M channels, BN, ReLU,
    temporal t x 1 x 1; M keeps the parameter count of the full 3D kernel (Tran et al. 2018)."""
    t, k = kernel_size[0], kernel_size[1]
    if inner_channels is None:
        inner_channels = (in_channels * out_channels * t * k * k) // (in_channels * k * k + t * out_channels)
    return _pytorchvideo()["conv_2plus1d"](
        in_channels=in_channels, out_channels=out_channels, inner_channels=inner_channels, conv_xy_first=True,
        kernel_size=kernel_size, stride=stride, padding=padding, bias=bias)


def _basic_block(*, dim_in: int, dim_inner: int, dim_out: int, conv_a_kernel_size, conv_a_stride, conv_a_padding,
                 conv_a, conv_b_kernel_size, conv_b_stride, conv_b_padding, conv_b, norm, norm_eps, norm_momentum,
                 activation, **_unused) -> nn.Module:
    """The residual branch of a basic block (conv, BN, ReLU, conv, BN) as pytorchvideo's
    BottleneckBlock with an identity third convolution; the stride sits in the first convolution.
    `dim_inner` is unused (a basic block has no bottleneck); the builder signature of
    pytorchvideo.models.resnet.create_res_block's `bottleneck` argument."""
    from pytorchvideo.models.resnet import BottleneckBlock

    # torchvision's R(2+1)D block: both (2+1)D convolutions use the width that keeps the parameter
    # count of a 3x3x3 convolution from dim_in to dim_out.
    inner = (dim_in * dim_out * 27) // (dim_in * 9 + 3 * dim_out)
    norm_b = norm(num_features=dim_out, eps=norm_eps, momentum=norm_momentum)
    norm_b.block_final_bn = True  # zero-initialised by pytorchvideo's init, as its bottlenecks' last BN
    return BottleneckBlock(
        conv_a=conv_a(in_channels=dim_in, out_channels=dim_out, kernel_size=conv_a_kernel_size,
                      stride=conv_a_stride, padding=conv_a_padding, bias=False, inner_channels=inner),
        norm_a=norm(num_features=dim_out, eps=norm_eps, momentum=norm_momentum),
        act_a=activation(),
        conv_b=conv_b(in_channels=dim_out, out_channels=dim_out, kernel_size=conv_b_kernel_size,
                      stride=conv_b_stride, padding=conv_b_padding, bias=False, inner_channels=inner),
        norm_b=norm_b, act_b=None, conv_c=nn.Identity(), norm_c=None)


def build_resnet3d(factorised: bool, widths=_RESNET18["widths"], depths=_RESNET18["depths"],
                   stem_inner: int = _RESNET18["stem_inner"], stem_pool: bool = False) -> nn.Module:
    """Basic-block 3D ResNet (R3D, or R(2+1)D when `factorised`) from pytorchvideo's blocks.

    Stem: 3x7x7 conv stride (1,2,2) (R(2+1)D: 1x7x7 to `stem_inner` channels, BN, ReLU, 3x1x1), BN,
    ReLU, no pooling (`stem_pool`: a 1x3x3 max pool, stride (1,2,2)). Stage i: depths[i] basic blocks of widths[i] channels, 3x3x3 kernels; stages 2-4
    stride 2 in time and space (1x1x1 strided projection shortcut). Then the global average pool.
    """
    pv = _pytorchvideo()
    conv = _conv2plus1d if factorised else _conv3d
    stem_conv = (lambda **kw: _conv2plus1d(inner_channels=stem_inner, **kw)) if factorised else _conv3d
    blocks = [pv["stem"].create_res_basic_stem(
        in_channels=3, out_channels=widths[0], conv_kernel_size=(3, 7, 7), conv_stride=(1, 2, 2),
        conv_padding=(1, 3, 3), conv=stem_conv, pool=nn.MaxPool3d if stem_pool else None)]
    dim_in = widths[0]
    for index, (width, depth) in enumerate(zip(widths, depths)):
        stride = 1 if index == 0 else 2
        blocks.append(pv["resnet"].create_res_stage(
            depth=depth, dim_in=dim_in, dim_inner=width, dim_out=width, bottleneck=_basic_block,
            conv_a_kernel_size=(3, 3, 3), conv_a_stride=(stride,) * 3, conv_a_padding=(1, 1, 1), conv_a=conv,
            conv_b_kernel_size=(3, 3, 3), conv_b_stride=(1, 1, 1), conv_b_padding=(1, 1, 1), conv_b=conv))
        dim_in = width
    blocks.append(GlobalPool())
    return VideoTrunk(nn.ModuleList(blocks), dim_in)


def build_x3d(width_factor: float = 2.0, depth_factor: float = 2.2, stem_dim_in: int = 12,
              head_dim_out: int = 2048) -> nn.Module:
    """X3D (pytorchvideo create_x3d) without its classifier: the head's projected pooling with
    adaptive average pooling -> [N, head_dim_out]. Defaults: X3D-S (its clip length 13 and crop 160
    only sized the fixed pooling window, which adaptive pooling replaces)."""
    pv = _pytorchvideo()
    full = pv["x3d"].create_x3d(width_factor=width_factor, depth_factor=depth_factor, stem_dim_in=stem_dim_in,
                                head_dim_out=head_dim_out, input_clip_length=1, input_crop_size=32,
                                model_num_class=1, dropout_rate=0.0, head_activation=None,
                                inner_act=nn.SiLU)  # = pytorchvideo's Swish (x * sigmoid(x)), a built-in op
    old = full.blocks[-1].pool
    head = pv["x3d"].create_x3d_head(
        dim_in=old.pre_conv.in_channels, dim_inner=old.pre_conv.out_channels, dim_out=head_dim_out,
        num_classes=1, pool_kernel_size=None, dropout_rate=0.0, activation=None)
    head.proj = nn.Identity()  # the trunk ends at the pooled feature ([N, D, 1, 1, 1] -> output_pool -> [N, D])
    return VideoTrunk(nn.ModuleList([*full.blocks[:-1], head]), head_dim_out)


def build_video_backbone(name: str) -> tuple[nn.Module, int]:
    """(trunk, feature_dim) of a name in VIDEO_BACKBONES, randomly initialised (global torch RNG)."""
    if name == "r2plus1d_18":
        trunk = build_resnet3d(True)
    elif name == "r3d_18":
        trunk = build_resnet3d(False)
    elif name == "r2plus1d_tiny":
        trunk = build_resnet3d(True, **_RESNET_TINY)
    elif name == "x3d_s":
        trunk = build_x3d()
    elif name == "x3d_tiny":
        trunk = build_x3d(width_factor=1.0, depth_factor=0.2, stem_dim_in=8, head_dim_out=128)
    else:
        raise ValueError(f"not a video backbone: {name!r}")
    return trunk, trunk.feature_dim


def memory_format(clips: bool, channels_last: bool) -> torch.memory_format:
    """The memory format the `channels_last` switch means for frames (4-D) or clips (5-D)."""
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if clips else torch.channels_last
