"""2D ResNet trunks (torchvision layout, fc removed), the 3D video trunks of vclr.models.video3d,
and the import of ImageNet MoCo v2 weights.

Every 2D trunk keeps torchvision's attribute names (conv1, bn1, layer1..4), so torchvision and MoCo
checkpoints map onto it key for key; `fc` is an Identity, so `trunk(x)` is the global-average-pooled
feature [N, feature_dim] of frames [N, 3, H, W]. A 3D trunk (VIDEO_BACKBONES) maps clips
[N, 3, T, H, W] to [N, feature_dim] the same way; everything downstream takes either.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock, conv1x1

from vclr.errors import VclrError
from vclr.models.video3d import (
    IGNORED_KEY_PREFIXES,
    VIDEO_BACKBONES,
    build_video_backbone,
)

BACKBONES = ("resnet50", "resnet18", "resnet_tiny")  # 2D: one frame per segment sample
ALL_BACKBONES = BACKBONES + VIDEO_BACKBONES  # + 3D: one clip per segment sample
TINY_WIDTHS = (16, 32, 64, 128)

# The MoCo v2 checkpoint prefixes (the query encoder, saved from a DataParallel/DDP-wrapped model).
MOCO_TRUNK_PREFIX = "module.encoder_q."
MOCO_MLP_KEYS = {"0.weight": "fc.0.weight", "0.bias": "fc.0.bias", "2.weight": "fc.2.weight", "2.bias": "fc.2.bias"}


class TinyResNet(nn.Module):
    """ResNet with BasicBlock layers [1,1,1,1] and widths 16-32-64-128 for the CPU `tiny` profile.

    Same stem, layer names and forward as torchvision's ResNet, so the checkpoint code is shared.
    """

    def __init__(self, widths: tuple[int, ...] = TINY_WIDTHS, blocks: tuple[int, ...] = (1, 1, 1, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = widths[0]
        for number, (planes, count) in enumerate(zip(widths, blocks), start=1):
            stride = 1 if number == 1 else 2
            layers = []
            for block in range(count):
                downsample = None
                if block == 0 and (stride != 1 or in_planes != planes):
                    downsample = nn.Sequential(conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes))
                layers.append(BasicBlock(in_planes, planes, stride if block == 0 else 1, downsample))
                in_planes = planes
            setattr(self, f"layer{number}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.feature_dim = in_planes
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def is_video_backbone(name: str) -> bool:
    """True for the 3D trunks, whose segment samples are clips [3, T, H, W] instead of frames."""
    return name in VIDEO_BACKBONES


def build_backbone(name: str, pretrained: str | os.PathLike | None = None) -> tuple[nn.Module, int]:
    """(trunk, feature_dim) for `name` in ALL_BACKBONES, randomly initialised (no download ever).

    `pretrained`: optional path to a state_dict in the trunk's layout (a file of `{key: tensor}`, or a
    dict holding it under `state_dict`); classifier entries (`fc.*`; a pytorchvideo X3D's
    `blocks.5.proj.*`) are ignored, every trunk key must match.
    """
    ignored = ("fc.",)
    if is_video_backbone(name):
        trunk, feature_dim = build_video_backbone(name)
        ignored += IGNORED_KEY_PREFIXES.get(name, ())
    elif name == "resnet50":
        trunk, feature_dim = resnet50(weights=None), 2048
    elif name == "resnet18":
        trunk, feature_dim = resnet18(weights=None), 512
    elif name == "resnet_tiny":
        trunk = TinyResNet()
        feature_dim = trunk.feature_dim
    else:
        raise VclrError(f"unknown backbone {name!r}; expected one of {', '.join(ALL_BACKBONES)}")
    if not is_video_backbone(name):
        trunk.fc = nn.Identity()
    if pretrained is not None:
        state = _load_state_dict(pretrained)
        state = {key: value for key, value in state.items() if not key.startswith(ignored)}
        copy_checked(trunk, state, f"{pretrained} (backbone {name})")
    return trunk, feature_dim


def read_checkpoint_file(path: str | os.PathLike) -> object:
    """torch.load on the CPU, tensors and plain containers only; VclrError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise VclrError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle/zip errors come in many types
        raise VclrError(f"{path}: not a readable PyTorch checkpoint ({error})") from None


def _load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    checkpoint = read_checkpoint_file(path)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise VclrError(f"{path}: expected a state_dict of tensors (or a dict with key 'state_dict')")
    return checkpoint


def copy_checked(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> int:
    """Copy `state` into `module` after checking it is the same architecture; VclrError otherwise.

    BatchNorm's `num_batches_tracked` may be absent (older checkpoints); nothing else may be.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own if k in state and state[k].shape != own[k].shape
    ]
    problems = [("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)]
    if any(keys for _, keys in problems):
        details = "; ".join(
            f"{label} ({len(keys)}): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
            for label, keys in problems if keys
        )
        raise VclrError(f"{where}: checkpoint does not fit this architecture: {details}")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)
    return len(state)


def load_moco_v2(path: str | os.PathLike, model: nn.Module) -> dict[str, int]:
    """Initialise a VCLR model from an ImageNet MoCo v2 checkpoint (`moco_v2_200ep_pretrain.pth.tar`).

    The checkpoint's `state_dict` holds `module.encoder_q.<trunk key>` and the MoCo MLP
    `module.encoder_q.fc.0/fc.2`; the trunk goes to `model.backbone` and the MLP to EACH of
    `model.heads` (which must be Sequential(Linear, ReLU, Linear) of the same shapes). The key
    encoder and queue of MoCo are not used. Build the momentum encoder after this call, so it
    starts as a copy of the imported weights. Returns the number of tensors copied per part.
    """
    state = _load_state_dict(path)
    query = {k[len(MOCO_TRUNK_PREFIX):]: v for k, v in state.items() if k.startswith(MOCO_TRUNK_PREFIX)}
    if not query:
        sample = ", ".join(list(state)[:4])
        raise VclrError(f"{path}: no '{MOCO_TRUNK_PREFIX}*' keys, not a MoCo checkpoint (keys: {sample}, ...)")
    trunk = {k: v for k, v in query.items() if not k.startswith("fc.")}
    mlp = {k: v for k, v in query.items() if k.startswith("fc.")}
    copied = {"backbone": copy_checked(model.backbone, trunk, f"{path} (backbone)")}
    for name, head in model.heads.items():
        missing = [MOCO_TRUNK_PREFIX + v for v in MOCO_MLP_KEYS.values() if v not in mlp]
        if missing:
            raise VclrError(f"{path}: MoCo v2 MLP head keys missing: {', '.join(missing)}")
        head_state = {own_key: mlp[moco_key] for own_key, moco_key in MOCO_MLP_KEYS.items()}
        copied[name] = copy_checked(head, head_state, f"{path} (MLP -> head {name!r})")
    return copied
