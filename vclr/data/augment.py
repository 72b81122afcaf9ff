"""The paper's per-frame augmentation (MoCo v2 chain) on uint8 frames: the CPU reference.

torchvision.transforms.v2 draws from the global torch RNG; `augment_frame` runs it inside
torch.random.fork_rng seeded from a caller's torch.Generator, so results are reproducible and the
global RNG state is left exactly as it was.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def blur_kernel_size(crop_size: int) -> int:
    """About 10% of the crop, odd, at least 3 (224 -> 23)."""
    size = max(3, int(0.1 * crop_size))
    return size if size % 2 else size + 1


def frame_transform(crop_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """uint8 [3,H,W] -> normalised float32 [3,crop,crop]; every call draws fresh parameters."""
    return v2.Compose([
        v2.RandomResizedCrop(crop_size, scale=(0.2, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(blur_kernel_size(crop_size), sigma=(0.1, 2.0))], p=0.5),
        v2.RandomHorizontalFlip(p=0.5),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])


def augment_frame(frame: torch.Tensor, transform: v2.Compose, generator: torch.Generator) -> torch.Tensor:
    """One independent augmentation draw of `frame` (uint8 [3,H,W]), seeded from `generator`."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would reseed CUDA too
        return transform(frame)


def augment_frames(frames: Sequence[torch.Tensor] | torch.Tensor, transform: v2.Compose,
                   generator: torch.Generator) -> torch.Tensor:
    """Each frame its own draw: [N,3,H,W] uint8 (or a list of [3,H,W]) -> [N,3,crop,crop] float32."""
    return torch.stack([augment_frame(frame, transform, generator) for frame in frames])


def augment_clips(clips: Sequence[torch.Tensor], transform: v2.Compose, generator: torch.Generator) -> torch.Tensor:
    """Each clip (uint8 [T,3,H,W]) one draw, applied to all its T frames (video augmentation: the
    same crop, flip, colour jitter, grayscale and blur for every frame; torchvision.transforms.v2
    draws one parameter set per call and its image kernels treat leading dimensions as a batch)
    -> [N,3,T,crop,crop] float32, the layout of a 3D backbone's input."""
    return torch.stack([augment_frame(clip, transform, generator).transpose(0, 1) for clip in clips])
