"""`vclr bench input`: frames/s of the input pipeline, JPEG bytes -> augmented 224x224 views.

Three paths over the same in-memory JPEGs (340x256 random smooth images, torchvision.io.encode_jpeg):
  cpu_reference  vclr.data.augment, frame by frame (decode, then the torchvision v2 chain), as the
                 DataLoader workers of `augment: cpu` run it; per core (torch threads = --threads)
  cpu_batched    vclr.data.batch_augment on CPU tensors: batched decode list, then one batched chain
  cuda_batched   the same on CUDA: nvjpeg batch decode + the batched chain, bf16 channels_last out
                 (what `augment: batched` runs before each training step); skipped without CUDA
Each round times every path once (A, B, C, A, B, C, ...) so a noisy machine slows them alike; the
first round is warm-up. Reported: medians of decode+augment and of augment alone, and ratios.
Imports only torch/torchvision (and vclr modules that do), so it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vclr.data.augment import augment_frame, frame_transform
from vclr.data.batch_augment import augment_batch, decode_jpegs
from vclr.data.packed import decode_jpeg_bytes
from vclr.errors import VclrError
from vclr.io_utils import atomic_write_json

PATHS = ("cpu_reference", "cpu_batched", "cuda_batched")


def make_jpegs(count: int, height: int, width: int, quality: int, seed: int) -> list[torch.Tensor]:
    """Random smooth RGB images (bicubic-upsampled noise, like natural frames in JPEG size) as JPEG bytes."""
    from torchvision.io import encode_jpeg

    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, height // 16 + 1, width // 16 + 1, generator=generator)
    images = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return encode_jpeg(list(images), quality=quality)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_reference(jpegs: list[torch.Tensor], crop: int, generator: torch.Generator) -> tuple[float, float]:
    """(decode seconds, augment seconds) of the per-frame CPU chain over `jpegs`."""
    transform = frame_transform(crop)
    decode = augment = 0.0
    for data in [jpeg.numpy().tobytes() for jpeg in jpegs]:  # as PackedFrames.read_jpeg returns them
        started = time.perf_counter()
        frame = decode_jpeg_bytes(data, "bench")
        decoded = time.perf_counter()
        augment_frame(frame, transform, generator)
        decode += decoded - started
        augment += time.perf_counter() - decoded
    return decode, augment


def time_batched(jpegs: list[torch.Tensor], crop: int, generator: torch.Generator, device: torch.device,
                 dtype: torch.dtype) -> tuple[float, float]:
    """(decode seconds, augment seconds) of one batched decode + one batched chain on `device`."""
    _synchronize(device)
    started = time.perf_counter()
    frames = decode_jpegs(jpegs, device)
    _synchronize(device)
    decoded = time.perf_counter()
    augment_batch(frames, generator, crop_size=crop, dtype=dtype, channels_last=True)
    _synchronize(device)
    return decoded - started, time.perf_counter() - decoded


def run_bench(paths: list[str], *, rounds: int, reference_frames: int, cpu_batch: int, cuda_batch: int,
              height: int, width: int, crop: int, quality: int, seed: int, log=print) -> dict:
    """Alternate the paths for 1 warm-up + `rounds` rounds; per path the median frames/s."""
    jpegs = make_jpegs(max(reference_frames, cpu_batch, cuda_batch if "cuda_batched" in paths else 0),
                       height, width, quality, seed)
    generator = torch.Generator().manual_seed(seed)
    runs = {
        "cpu_reference": lambda: time_reference(jpegs[:reference_frames], crop, generator),
        "cpu_batched": lambda: time_batched(jpegs[:cpu_batch], crop, generator, torch.device("cpu"), torch.float32),
        "cuda_batched": lambda: time_batched(jpegs[:cuda_batch], crop, generator, torch.device("cuda"),
                                             torch.bfloat16),
    }
    frames = {"cpu_reference": reference_frames, "cpu_batched": cpu_batch, "cuda_batched": cuda_batch}
    per_round = {path: {"total": [], "augment": [], "decode": []} for path in paths}
    for round_ in range(rounds + 1):
        for path in paths:
            decode, augment = runs[path]()
            if round_ == 0:
                continue  # warm-up: allocator, nvjpeg and cudnn initialisation
            per_round[path]["decode"].append(frames[path] / decode)
            per_round[path]["augment"].append(frames[path] / augment)
            per_round[path]["total"].append(frames[path] / (decode + augment))
        if round_:
            log(f"round {round_}: " + ", ".join(f"{path} {per_round[path]['total'][-1]:.1f}" for path in paths)
                + " frames/s (decode + augment)")
    results = {}
    for path in paths:
        results[path] = {"frames_per_batch": frames[path], "rounds": per_round[path],
                         **{f"{part}_frames_per_s": statistics.median(values)
                            for part, values in per_round[path].items()}}
    ratios = {}
    for part in ("total", "augment"):
        key = f"{part}_frames_per_s"
        for fast, slow in (("cpu_batched", "cpu_reference"), ("cuda_batched", "cpu_reference"),
                           ("cuda_batched", "cpu_batched")):
            if fast in results and slow in results:
                # ratio of medians, and the median of the per-round ratios (same-round pairs)
                per = [a / b for a, b in zip(per_round[fast][part], per_round[slow][part])]
                ratios[f"{fast}/{slow} ({part})"] = {"of_medians": results[fast][key] / results[slow][key],
                                                     "median_per_round": statistics.median(per)}
    return {"paths": results, "ratios": ratios}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: the CUDA path too when CUDA is available; cpu: skip it")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = per core)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--reference-frames", type=int, default=16, help="frames per round, CPU reference")
    parser.add_argument("--cpu-batch", type=int, default=64, help="frames per batch, batched CPU path")
    parser.add_argument("--cuda-batch", type=int, default=448,
                        help="frames per batch, CUDA path (448 = 64 videos x 7 views)")
    parser.add_argument("--width", type=int, default=340)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the generated frames")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", type=Path, help="write the results here")


def main(args: argparse.Namespace) -> int:
    for flag in ("threads", "rounds", "reference_frames", "cpu_batch", "cuda_batch", "width", "height", "crop"):
        if getattr(args, flag) < 1:
            raise VclrError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.crop > min(args.width, args.height) * 4:
        raise VclrError(f"--crop {args.crop} is far larger than the {args.width}x{args.height} frames")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise VclrError("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    paths = ["cpu_reference", "cpu_batched"]
    if args.device != "cpu" and torch.cuda.is_available():
        paths.append("cuda_batched")
        cuda_name = torch.cuda.get_device_name(0)
    else:
        cuda_name = None
        print("cuda_batched: skipped (" + ("--device cpu" if args.device == "cpu" else "no CUDA device") + ")")
    print(f"{args.width}x{args.height} JPEG (quality {args.quality}) -> {args.crop}x{args.crop} views; torch "
          f"{torch.__version__}, {torch.get_num_threads()} CPU thread(s)" + (f", {cuda_name}" if cuda_name else ""))
    result = run_bench(paths, rounds=args.rounds, reference_frames=args.reference_frames, cpu_batch=args.cpu_batch,
                       cuda_batch=args.cuda_batch, height=args.height, width=args.width, crop=args.crop,
                       quality=args.quality, seed=args.seed)
    for path, entry in result["paths"].items():
        print(f"{path:14s} {entry['total_frames_per_s']:9.1f} frames/s decode+augment, "
              f"{entry['augment_frames_per_s']:9.1f} augment only, {entry['decode_frames_per_s']:9.1f} decode only "
              f"(medians of {args.rounds} rounds, {entry['frames_per_batch']} frames each)")
    for name, ratio in result["ratios"].items():
        print(f"{name:42s} {ratio['of_medians']:6.2f}x (median of per-round ratios {ratio['median_per_round']:.2f}x)")
    result.update({
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
        "cuda_device": cuda_name, "skipped": [path for path in PATHS if path not in paths],
        "settings": {"width": args.width, "height": args.height, "crop": args.crop, "quality": args.quality,
                     "rounds": args.rounds, "seed": args.seed},
    })
    if args.out_json:
        atomic_write_json(args.out_json, result)
    return 0
