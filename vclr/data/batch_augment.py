"""The paper's augmentation chain (vclr.data.augment) as batched tensor code on any device.

The per-frame torchvision chain costs tens of milliseconds a frame on one CPU core and is
launch-bound on a GPU (spec/performance.md); here every op runs once over all frames of a batch,
each frame with its own random parameters:

    random resized crop + horizontal flip  one grid_sample over the batch (bilinear, per-frame grid)
    colour jitter (p=0.8)                  per-frame random order of the four ops: at each of the 4
                                           positions one blend over all frames does brightness,
                                           contrast or saturation (neutral factors for the others),
                                           then hue on the frames whose op it is
    grayscale (p=0.2), blur (p=0.5)        on the frames that get them; blur separable, per-frame
                                           sigma, reflect padding (two grouped convolutions)
    normalise                              ImageNet mean/std, then the output dtype, channels_last

On a GPU the whole batch goes through at once; on a CPU in chunks of CPU_CHUNK views, whose
intermediates stay in cache (vclr bench input measures both against the reference).

Parameters are drawn separately (`draw_params`, on the CPU from a torch.Generator: the same seed
gives the same parameters whatever device applies them) and applied by `apply_params`, so a fixed
parameter set can be checked against torchvision's functional ops. The flip is folded into the crop's
sampling grid: every later op commutes with it (pointwise colour ops, a per-frame mean, a symmetric
kernel with symmetric padding). Differences from the reference: it computes in float32 where the
reference rounds to uint8 after each op, and the crop is bilinear without torchvision's antialias
filter when a crop is shrunk (only crops larger than the output; at most ~1.5x for 340x256 frames).

Clips (3D backbones): one parameter set is drawn per clip and broadcast over its T frames
(`apply_clip_params`), so every frame of a clip gets the same crop, flip, jitter, grayscale and blur,
as video augmentation requires; the frames then run through the same per-frame chain.

Imports only torch, torchvision and vclr modules that need nothing else (vclr.bench.input runs on a
GPU machine without the project's extras).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from vclr.data.augment import IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size
from vclr.errors import VclrError

# The chain of vclr.data.augment.frame_transform (a test checks the two agree).
SCALE = (0.2, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10
JITTER_P = 0.8
JITTER_STRENGTH = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
GRAYSCALE_P = 0.2
BLUR_P = 0.5
SIGMA = (0.1, 2.0)
FLIP_P = 0.5
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # jitter op ids, torchvision's fn_idx numbering
CPU_CHUNK = 8  # views per pass on a CPU (1 thread, 64 views: 8 ~1.1x faster than 16, 1.6x than 64)
# Clips: the same pixels per pass as CPU_CHUNK views of 224 x 224 (at small crops a pass over 8 views
# is all per-op overhead: 896 views of 48 x 48 took ~15x longer in chunks of 8 than in one pass).
CPU_CHUNK_PIXELS = CPU_CHUNK * 224 * 224


@dataclass
class AugmentParams:
    """One augmentation draw per frame (n frames), CPU tensors.

    boxes: float64 [n,4] crop (top, left, height, width) in source pixels; flip: bool [n];
    jitter: bool [n]; factors: float64 [n,4] brightness, contrast, saturation, hue; order: int64 [n,4]
    (order[:, p] = the op applied p-th); grayscale, blur: bool [n]; sigma: float64 [n].
    """

    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def to_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {prefix + field.name: getattr(self, field.name) for field in fields(self)}

    @classmethod
    def from_dict(cls, values: dict, prefix: str = "") -> AugmentParams:
        return cls(**{field.name: values[prefix + field.name].cpu() for field in fields(cls)})

    def select(self, index) -> AugmentParams:
        return AugmentParams(**{field.name: getattr(self, field.name)[index] for field in fields(self)})


def cat_params(params: Sequence[AugmentParams]) -> AugmentParams:
    return AugmentParams(**{field.name: torch.cat([getattr(p, field.name) for p in params])
                            for field in fields(AugmentParams)})


def identity_params(sizes) -> AugmentParams:
    """Whole-frame box and no colour/blur/flip: a base for hand-built parameter sets in tests."""
    sizes = torch.as_tensor(sizes, dtype=torch.float64).reshape(-1, 2)
    n = sizes.shape[0]
    false = torch.zeros(n, dtype=torch.bool)
    return AugmentParams(
        boxes=torch.cat([torch.zeros(n, 2, dtype=torch.float64), sizes], 1), flip=false.clone(),
        jitter=false.clone(), factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64).repeat(n, 1),
        order=torch.arange(4).repeat(n, 1), grayscale=false.clone(), blur=false.clone(),
        sigma=torch.ones(n, dtype=torch.float64))


def _uniform(generator: torch.Generator, shape, low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low


def draw_crop_boxes(sizes, generator: torch.Generator, scale=SCALE, ratio=RATIO) -> torch.Tensor:
    """RandomResizedCrop's rule for each frame of size (height, width): up to 10 tries of an area
    fraction ~ U(scale) and a log-uniform aspect ratio, the first that fits wins and is placed
    uniformly; if none fits, the centre crop clamped to the ratio range. -> float64 [n,4] boxes."""
    sizes = torch.as_tensor(sizes, dtype=torch.float64).reshape(-1, 2)
    n = sizes.shape[0]
    height, width = sizes[:, :1], sizes[:, 1:]
    target_area = height * width * _uniform(generator, (n, CROP_TRIES), *scale)
    aspect = torch.exp(_uniform(generator, (n, CROP_TRIES), math.log(ratio[0]), math.log(ratio[1])))
    w = torch.round(torch.sqrt(target_area * aspect))  # half to even, like Python's round
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.int8).argmax(1, keepdim=True)  # the first try that fits (0 if none)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    height, width = height[:, 0], width[:, 0]
    place = torch.rand((n, 2), generator=generator, dtype=torch.float64)
    top = torch.floor(place[:, 0] * (height - h + 1)).clamp_max(height - h)
    left = torch.floor(place[:, 1] * (width - w + 1)).clamp_max(width - w)
    # Fallback: the whole frame, cut to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    fallback_w = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fallback_h = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    none = ~fits.any(1)
    h, w = torch.where(none, fallback_h, h), torch.where(none, fallback_w, w)
    top = torch.where(none, torch.div(height - h, 2, rounding_mode="floor"), top)
    left = torch.where(none, torch.div(width - w, 2, rounding_mode="floor"), left)
    return torch.stack([top, left, h, w], 1)


def draw_params(sizes, generator: torch.Generator) -> AugmentParams:
    """Independent draws of the paper's chain for frames of the given (height, width) sizes [n,2]."""
    sizes = torch.as_tensor(sizes, dtype=torch.float64).reshape(-1, 2)
    n = sizes.shape[0]
    boxes = draw_crop_boxes(sizes, generator)
    coins = torch.rand((n, 4), generator=generator, dtype=torch.float64)
    b, c, s, hue = JITTER_STRENGTH
    factors = torch.stack([_uniform(generator, n, 1 - b, 1 + b), _uniform(generator, n, 1 - c, 1 + c),
                           _uniform(generator, n, 1 - s, 1 + s), _uniform(generator, n, -hue, hue)], 1)
    order = torch.rand((n, 4), generator=generator).argsort(1)  # a uniform permutation per frame
    sigma = _uniform(generator, n, *SIGMA)
    return AugmentParams(boxes=boxes, flip=coins[:, 3] < FLIP_P, jitter=coins[:, 0] < JITTER_P, factors=factors,
                         order=order, grayscale=coins[:, 1] < GRAYSCALE_P, blur=coins[:, 2] < BLUR_P, sigma=sigma)


# ---------------------------------------------------------------------------------------------- ops
def stack_frames(frames: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """[F,3,H,W] as is; a list of [3,Hi,Wi] of different sizes zero-padded to the largest (the crop
    grids are clamped inside each frame, so the padding only ever gets a zero interpolation weight)."""
    if isinstance(frames, torch.Tensor):
        return frames
    if len({tuple(frame.shape) for frame in frames}) == 1:
        return torch.stack(list(frames))
    height = max(frame.shape[-2] for frame in frames)
    width = max(frame.shape[-1] for frame in frames)
    out = frames[0].new_zeros((len(frames), frames[0].shape[0], height, width))
    for i, frame in enumerate(frames):
        out[i, :, :frame.shape[-2], :frame.shape[-1]] = frame
    return out


def _axis_coords(start: torch.Tensor, length: torch.Tensor, out: int, clamp_low: torch.Tensor,
                 clamp_high: torch.Tensor) -> torch.Tensor:
    """Source pixel coordinates [n,out] of output pixel centres: bilinear, align_corners=False,
    clamped to [low, high] (torch.nn.functional.interpolate clamps to the edge pixels likewise)."""
    centres = (torch.arange(out, dtype=torch.float64, device=start.device) + 0.5) / out
    coords = start[:, None] + centres[None] * length[:, None] - 0.5
    return torch.minimum(torch.maximum(coords, clamp_low[:, None]), clamp_high[:, None])


def resized_crop(frames, boxes: torch.Tensor, size: int, *, flip: torch.Tensor | None = None,
                 source: torch.Tensor | None = None, sizes: torch.Tensor | None = None,
                 clamp_to_box: bool = True, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Crop boxes[i] (top, left, height, width) of frame source[i] and resize it to size x size,
    mirrored where flip[i], as ONE grid_sample. -> float32 [n,C,size,size] (input's value range).

    clamp_to_box=True samples as if the crop were cut out first (torchvision's resized_crop);
    False as if the whole frame were resized and then cropped (evaluation centre crops).
    `sizes` [F,2] are the frames' true (height, width) when they were padded by stack_frames.
    `scratch`: a float32 buffer for the uint8 -> float conversion, reused by apply_params's chunks
    (a fresh buffer per chunk costs a page fault per 4 KiB on a CPU: ~8x the conversion itself).
    """
    batch = stack_frames(frames)
    device = batch.device
    n = boxes.shape[0]
    gather = None if source is None else torch.as_tensor(source).cpu()
    source = torch.arange(n) if gather is None else gather
    if sizes is None:
        sizes = torch.tensor([batch.shape[-2:]], dtype=torch.float64).expand(batch.shape[0], 2)
    sizes = torch.as_tensor(sizes, dtype=torch.float64)[source]
    boxes = boxes.to(torch.float64).cpu()
    top, left, height, width = boxes.unbind(1)
    if clamp_to_box:
        low_y, high_y, low_x, high_x = top, top + height - 1, left, left + width - 1
    else:
        zero = torch.zeros(n, dtype=torch.float64)
        low_y, high_y, low_x, high_x = zero, sizes[:, 0] - 1, zero, sizes[:, 1] - 1
    ys = _axis_coords(top, height, size, low_y, high_y)
    xs = _axis_coords(left, width, size, low_x, high_x)
    if flip is not None:
        xs = torch.where(flip.cpu()[:, None], xs.flip(1), xs)
    # grid_sample's normalised coordinates (align_corners=False) in the (padded) batch's frame
    ys = ((2 * ys + 1) / batch.shape[-2] - 1).to(device=device, dtype=torch.float32)
    xs = ((2 * xs + 1) / batch.shape[-1] - 1).to(device=device, dtype=torch.float32)
    grid = torch.stack([xs[:, None, :].expand(n, size, size), ys[:, :, None].expand(n, size, size)], -1)
    if batch.is_floating_point():
        images = batch if gather is None else batch.index_select(0, gather.to(device))
    else:  # only the frames used, converted into a buffer the caller may reuse across calls
        index = torch.arange(batch.shape[0]) if gather is None else gather
        if scratch is None or scratch.shape[0] < n or scratch.shape[1:] != batch.shape[1:]:
            scratch = torch.empty((n, *batch.shape[1:]), dtype=torch.float32, device=device)
        images = scratch[:n]
        images.copy_(batch.index_select(0, index.to(device)))
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="border",
                         align_corners=False)


def _per_frame(values, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=x.dtype).to(x.device).view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[n,3,H,W] -> luma [n,1,H,W] with torchvision's weights."""
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def _linear_op(x: torch.Tensor, factor, scale, gray_weight, mean_weight) -> torch.Tensor:
    factor = torch.as_tensor(factor, dtype=torch.float64).reshape(-1)
    out = x.clone()
    _linear_jitter_(out, scale(factor), gray_weight(factor), mean_weight(factor))
    return out


def adjust_brightness(x: torch.Tensor, factor) -> torch.Tensor:
    """x * f, clamped (factor: one per frame); the op apply_params runs, on a copy."""
    return _linear_op(x, factor, lambda f: f, torch.zeros_like, torch.zeros_like)


def adjust_contrast(x: torch.Tensor, factor) -> torch.Tensor:
    """Blend with the frame's mean grey level."""
    return _linear_op(x, factor, lambda f: f, torch.zeros_like, lambda f: 1 - f)


def adjust_saturation(x: torch.Tensor, factor) -> torch.Tensor:
    """Blend with the frame's grey version."""
    return _linear_op(x, factor, lambda f: f, lambda f: 1 - f, torch.zeros_like)


def adjust_hue(x: torch.Tensor, shift) -> torch.Tensor:
    """Rotate the hue of each frame by shift[i] turns (torchvision's RGB -> HSV -> RGB, in closed form).

    With V = max, C = max - min (chroma) and H the hue in sixths of a turn,
    channel = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + H) mod 6, n = 5, 3, 1 for R, G, B
    (the saturation cancels: V * S = C); a grey pixel (C = 0) stays V whatever its hue.
    Blends instead of torch.where and in-place steps: several times faster on a CPU.
    """
    r, g, b = x.unbind(1)
    maxc = torch.maximum(r, g)
    torch.maximum(maxc, b, out=maxc)
    chroma = torch.minimum(r, g)
    torch.minimum(chroma, b, out=chroma)
    torch.sub(maxc, chroma, out=chroma)
    # H * C by the max channel, red winning ties, then green (torchvision's order)
    hue = torch.sub(r, g).add_(chroma, alpha=4)
    hue.lerp_(torch.sub(b, r).add_(chroma, alpha=2), (maxc == g).to(x.dtype))
    hue.lerp_(torch.sub(g, b), (maxc == r).to(x.dtype))
    hue.div_(chroma.clamp(min=torch.finfo(x.dtype).tiny)).add_(_per_frame(shift, x)[:, 0].mul(6))
    k = hue.unsqueeze(1) + torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k.sub_(k.div(6).floor_().mul_(6))  # mod 6
    ramp = k.sub_(2).abs_().neg_().add_(2).clamp_(0, 1)  # = clamp(min(k, 4 - k), 0, 1)
    return ramp.mul_(chroma.unsqueeze(1)).neg_().add_(maxc.unsqueeze(1)).clamp_(0, 1)


def _linear_jitter_(x: torch.Tensor, scale: torch.Tensor, gray_weight: torch.Tensor,
                    mean_weight: torch.Tensor) -> None:
    """In place, every frame at once: x = clamp(a*x + s*gray(x) + c*mean(gray(x)), 0, 1).

    Brightness f is (a, s, c) = (f, 0, 0), contrast (f, 0, 1-f), saturation (f, 1-f, 0) and a frame
    whose op at this position is another one (1, 0, 0), which leaves it exactly as it is."""
    plane = None
    if bool((gray_weight != 0).any() or (mean_weight != 0).any()):
        plane = grayscale(x)
        mean = plane.mean((1, 2, 3), keepdim=True)
        plane.mul_(_per_frame(gray_weight, x)).add_(mean.mul_(_per_frame(mean_weight, x)))
    x.mul_(_per_frame(scale, x))
    if plane is not None:
        x.add_(plane)
    x.clamp_(0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_kernels(sigma, kernel_size: int, dtype=torch.float32) -> torch.Tensor:
    """[n,k] normalised 1-D Gaussian kernels (torchvision's GaussianBlur kernel)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
    offsets = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    return torch.softmax(-0.5 * (offsets[None] / sigma) ** 2, 1).to(dtype)


def gaussian_blur(x: torch.Tensor, sigma, kernel_size: int) -> torch.Tensor:
    """Per-frame sigma, separable (two grouped convolutions), reflect padding like torchvision."""
    n, channels, height, width = x.shape
    pad = kernel_size // 2
    weights = gaussian_kernels(sigma, kernel_size, x.dtype).to(x.device).repeat_interleave(channels, 0)
    y = F.pad(x, (0, 0, pad, pad), mode="reflect").reshape(1, n * channels, height + 2 * pad, width)
    y = F.conv2d(y, weights.view(n * channels, 1, kernel_size, 1), groups=n * channels)
    y = F.pad(y.view(n, channels, height, width), (pad, pad, 0, 0), mode="reflect")
    y = F.conv2d(y.reshape(1, n * channels, height, width + 2 * pad),
                 weights.view(n * channels, 1, 1, kernel_size), groups=n * channels)
    return y.view(n, channels, height, width)


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD, inplace: bool = False) -> torch.Tensor:
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std) if inplace else (x - mean) / std


def _apply_to(x: torch.Tensor, mask: torch.Tensor, op, *values) -> None:
    """x[mask] = op(x[mask], values[mask]...) in place; the mask is a CPU tensor, so no device sync."""
    index = mask.nonzero()[:, 0]
    if index.numel() == 0:
        return
    if index.numel() == x.shape[0]:
        x.copy_(op(x, *values))
        return
    device_index = index.to(x.device, non_blocking=True)
    x[device_index] = op(x.index_select(0, device_index), *(value[index] for value in values))


def apply_params(frames, params: AugmentParams, *, crop_size: int, source=None, sizes=None,
                 kernel_size: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 dtype: torch.dtype = torch.float32, channels_last: bool = True,
                 chunk: int | None = None) -> torch.Tensor:
    """Apply one parameter set: frames (uint8 0..255 or float 0..1, [F,3,H,W] or a list of
    [3,Hi,Wi]) -> normalised [n,3,crop,crop] of `dtype` on the frames' device. View i is cut from
    frame source[i] (default i); params are for the n views.

    `chunk` views go through the chain together: default all of them on a GPU, CPU_CHUNK on a CPU,
    where a chunk whose intermediates stay in cache beats passes over the whole batch."""
    batch, sizes = _stack_with_sizes(frames, sizes)
    n = len(params)
    source = torch.arange(n) if source is None else torch.as_tensor(source).cpu()
    if chunk is None:
        chunk = CPU_CHUNK if batch.device.type == "cpu" else max(n, 1)
    kernel_size = blur_kernel_size(crop_size) if kernel_size is None else kernel_size
    out = torch.empty((n, batch.shape[1], crop_size, crop_size), dtype=dtype, device=batch.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    scratch = None if batch.is_floating_point() else torch.empty(
        (min(chunk, n), *batch.shape[1:]), dtype=torch.float32, device=batch.device)
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        out[part] = _augment(batch, params.select(part), source[part], sizes, crop_size, kernel_size, mean, std,
                             scratch)
    return out


def _augment(batch: torch.Tensor, params: AugmentParams, source: torch.Tensor, sizes: torch.Tensor,
             crop_size: int, kernel_size: int, mean, std, scratch: torch.Tensor | None) -> torch.Tensor:
    """The chain on views of `batch`: float32 normalised [n,3,crop,crop]."""
    x = resized_crop(batch, params.boxes, crop_size, flip=params.flip, source=source, sizes=sizes,
                     scratch=scratch)
    if not batch.is_floating_point():
        x.mul_(1.0 / 255)
    views = torch.arange(len(params))
    for position in range(4):  # torchvision applies the four jitter ops in a per-frame random order
        op = params.order[:, position]
        factor = params.factors[views, op]
        linear = params.jitter & (op != HUE)
        if bool(linear.any()):
            _linear_jitter_(x, torch.where(linear, factor, 1.0),
                            torch.where(linear & (op == SATURATION), 1 - factor, 0.0),
                            torch.where(linear & (op == CONTRAST), 1 - factor, 0.0))
        _apply_to(x, params.jitter & (op == HUE), adjust_hue, params.factors[:, HUE])
    _apply_to(x, params.grayscale, lambda y: grayscale(y).expand_as(y))
    _apply_to(x, params.blur, lambda y, sigma: gaussian_blur(y, sigma, kernel_size), params.sigma)
    return normalize(x, mean, std, inplace=True)


def _stack_with_sizes(frames, sizes=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(stacked batch, true (height, width) [F,2] of each frame)."""
    if sizes is None:
        if isinstance(frames, torch.Tensor):
            sizes = torch.tensor([tuple(frames.shape[-2:])]).expand(frames.shape[0], 2)
        else:
            sizes = torch.tensor([tuple(frame.shape[-2:]) for frame in frames])
    return stack_frames(frames), torch.as_tensor(sizes)


def augment_batch(frames, generator: torch.Generator, *, crop_size: int = 224, **kwargs) -> torch.Tensor:
    """draw_params + apply_params, one independent draw per frame."""
    batch, sizes = _stack_with_sizes(frames)
    return apply_params(batch, draw_params(sizes, generator), crop_size=crop_size, sizes=sizes, **kwargs)


def broadcast_params(params: AugmentParams, count: int) -> AugmentParams:
    """Each parameter set repeated `count` times in a row (one clip's draw for each of its frames)."""
    return params.select(torch.arange(len(params)).repeat_interleave(count))


def apply_clip_params(frames, params: AugmentParams, *, clip_frames: int, crop_size: int, source=None,
                      channels_last: bool = False, **kwargs) -> torch.Tensor:
    """apply_params for n clips of T = clip_frames frames, params[i] (one per clip) applied to all
    frames of clip i: frames [F,3,H,W] (or a list), source [n,T] frame indices of each clip (default
    frames i*T .. i*T+T-1) -> normalised [n,3,T,crop,crop] (channels_last: channels_last_3d)."""
    n = len(params)
    if source is None:
        source = torch.arange(n * clip_frames).view(n, clip_frames)
    source = torch.as_tensor(source).reshape(n, clip_frames)
    device = frames.device if isinstance(frames, torch.Tensor) else frames[0].device
    if kwargs.get("chunk") is None and device.type == "cpu":
        kwargs["chunk"] = max(CPU_CHUNK, CPU_CHUNK_PIXELS // crop_size ** 2)
    views = apply_params(frames, broadcast_params(params, clip_frames), crop_size=crop_size,
                         source=source.flatten(), channels_last=channels_last, **kwargs)
    # [n*T,3,c,c] -> [n,3,T,c,c]: channels_last frames are channels_last_3d clips without a copy
    clips = views.unflatten(0, (n, clip_frames)).transpose(1, 2)
    return clips if channels_last else clips.contiguous()


# -------------------------------------------------------------------------- decoding and eval crops
def decode_jpegs(datas: Sequence[torch.Tensor], device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """JPEG byte tensors (uint8, 1-D, CPU) -> RGB uint8 [3,H,W] on `device`: nvjpeg batched on CUDA."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from vclr.data.packed import _silence_torchvision_codec_deprecation

    _silence_torchvision_codec_deprecation()
    device = torch.device(device)
    if device.type == "cuda":
        # nvJPEG's hardware decoder writes its outputs without waiting for the work queued on the
        # caller's stream, and the caching allocator may hand it blocks that queued kernels (the last
        # batch's augmentation) still read (pytorch/vision#9606, meta-pytorch/torchcodec#1634): drain
        # the stream first. With prefetching this is the side stream, so the step never waits for it.
        torch.cuda.current_stream(device).synchronize()
    try:
        return decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device)
    except RuntimeError as error:
        raise VclrError(f"undecodable JPEG in a batch of {len(datas)} ({error})") from None


def eval_crop_boxes(sizes, crop: int, crops: int = 1) -> torch.Tensor:
    """Boxes of `crops` crop x crop windows per frame, frame-major [F*crops,4]: 1 = the centre crop
    of vclr.evaluate.features.center_crop (short side resized up to `crop` only when under it);
    3 = start, centre and end of the long side (the usual 3-crop video test)."""
    if crops not in (1, 3):
        raise VclrError(f"crops must be 1 or 3, got {crops}")
    sizes = torch.as_tensor(sizes, dtype=torch.float64).reshape(-1, 2)
    height, width = sizes.unbind(1)
    short = torch.minimum(height, width)
    up = short < crop  # resized so the short side is `crop` (sizes rounded as features.center_crop does)
    scale = crop / short
    new_h = torch.where(up, torch.maximum(torch.full_like(height, crop), torch.round(height * scale)), height)
    new_w = torch.where(up, torch.maximum(torch.full_like(width, crop), torch.round(width * scale)), width)
    sy, sx = height / new_h, width / new_w  # source pixels per resized pixel
    along_h = new_h > new_w
    boxes = []
    for k in ([1] if crops == 1 else [0, 1, 2]):  # start, centre, end of the long side; k = 1: centre
        top = torch.where(along_h, torch.floor((new_h - crop) * k / 2), torch.floor((new_h - crop) / 2))
        left = torch.where(along_h, torch.floor((new_w - crop) / 2), torch.floor((new_w - crop) * k / 2))
        boxes.append(torch.stack([top * sy, left * sx, crop * sy, crop * sx], 1))
    return torch.stack(boxes, 1).reshape(-1, 4)


def eval_crops(frames, crop: int, crops: int = 1, *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
               dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """Normalised evaluation crops of uint8 frames -> [F*crops,3,crop,crop], frame-major."""
    batch, sizes = _stack_with_sizes(frames)
    boxes = eval_crop_boxes(sizes, crop, crops)
    source = None if crops == 1 else torch.arange(sizes.shape[0]).repeat_interleave(crops)
    x = resized_crop(batch, boxes, crop, source=source, sizes=sizes, clamp_to_box=False)
    if not batch.is_floating_point():
        x.mul_(1.0 / 255)
    x = normalize(x, mean, std)
    return x.to(dtype=dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def eval_crops_sliced(frames, crop: int, crops: int = 1, *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """eval_crops where no frame is resized (short sides >= crop: every box is a whole-pixel window):
    the uint8 windows are sliced out first, one copy per distinct window offset, and only they are
    converted (eval_crops converts whole frames, then resamples at pixel centres). The same values up
    to grid_sample's float32 coordinate rounding (eval_crops is off by up to ~2e-5 of the [0,1] range),
    on 2 shared CPU cores 2.5-10x faster (240 frames of 107x80, crop 48: 9.7k -> 93k frames/s; 60 of
    340x256, crop 224: 0.3k -> 0.8k); frames that need resizing go to eval_crops."""
    batch, sizes = _stack_with_sizes(frames)
    if int(sizes.min()) < crop:
        return eval_crops(frames, crop, crops, mean=mean, std=std, dtype=dtype, channels_last=channels_last)
    boxes = eval_crop_boxes(sizes, crop, crops)[:, :2].long()  # (top, left); height = width = crop
    source = torch.arange(sizes.shape[0]).repeat_interleave(crops)
    out = torch.empty((source.shape[0], batch.shape[1], crop, crop), dtype=batch.dtype, device=batch.device)
    offsets, which = torch.unique(boxes, dim=0, return_inverse=True)
    for k, (top, left) in enumerate(offsets.tolist()):
        views = (which == k).nonzero()[:, 0]
        frames_k = batch.index_select(0, source[views].to(batch.device))
        out[views.to(batch.device)] = frames_k[..., top:top + crop, left:left + crop]
    x = out.float()
    if not batch.is_floating_point():
        x.mul_(1.0 / 255)
    x = normalize(x, mean, std, inplace=True)
    return x.to(dtype=dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
