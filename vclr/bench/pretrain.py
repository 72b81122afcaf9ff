"""`vclr bench pretrain`: videos/s of one full VCLR training step, per precision/compile mode.

A step is what vclr.train.pretrain does per batch: the query encoder on xq + the query tuple, the
momentum encoder (shuffle-BN) on x1..x3 + the key tuple, the four losses, backward, SGD step,
momentum update, enqueue. The modes run on the same synthetic tensors, interleaved in rounds
(A, B, C, A, B, C, ...) so a noisy machine slows them alike; warm-up (and compilation, reported on
its own) is excluded. Then the real loop, `pretrain(...)` with data loading from packed frames, is
timed at the same shapes and reported as a fraction of the synthetic-tensor rate of its mode.
The synthetic-tensor path imports only torch (and the vclr model code), the real loop adds numpy, PIL
and tqdm (its packed frames are written with PIL, not PyAV), so both run on a GPU machine without
extra packages (a 3D backbone also needs pytorchvideo). `--loop-prefetch 0,1` runs the real loop once
per depth of vclr.data.device_prefetch (0: batches prepared between steps; 1: one ahead, beside the step).

3D backbones (vclr.models.video3d): each segment sample is a clip [3,T,crop,crop] (--clip-frames,
--clip-stride); the modes are the same, channels_last meaning channels_last_3d for clips.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vclr.data.sampling import clip_span
from vclr.errors import VclrError
from vclr.io_utils import atomic_write_json
from vclr.models.backbones import ALL_BACKBONES, build_backbone, is_video_backbone
from vclr.models.vclr import ORDER_CLASSES, Vclr, VclrModel
from vclr.models.video3d import DEFAULT_CLIP_FRAMES, DEFAULT_CLIP_STRIDE, memory_format
from vclr.train.distributed import resolve_device
from vclr.train.losses import LOSS_TERMS, vclr_loss
from vclr.train.schedule import scaled_lr

# mode -> (bf16 autocast, channels_last, torch.compile of both backbones): the --bf16,
# --channels-last and --compile switches of `vclr train pretrain`.
MODES = {
    "fp32_eager": (False, False, False),
    "bf16_channels_last": (True, True, False),
    "bf16_channels_last_compile": (True, True, True),
}
PAPER_SHAPES = {"backbone": "resnet50", "batch": 64, "crop": 224, "segments": 3, "queue_size": 131072}
CPU_PRESET = {"backbone": "resnet18", "batch": 8, "crop": 112}
# The optimiser/momentum/temperature values of vclr.train.pretrain.DEFAULT_SETTINGS (a test keeps them
# equal). Not imported: that module pulls in tqdm and the data code, which the GPU machine may lack.
STEP_SETTINGS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "alpha": 0.999, "temperature": 0.1}


def synthetic_batch(batch: int, crop: int, segments: int, device: torch.device,
                    generator: torch.Generator, clip_frames: int | None = None) -> dict[str, torch.Tensor]:
    """The batch entries of vclr.models.vclr.BATCH_KEYS, as the data loader delivers them (contiguous);
    with clip_frames each view is a clip [3, clip_frames, crop, crop]."""
    sample = (3, crop, crop) if clip_frames is None else (3, clip_frames, crop, crop)

    def images(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, *sample, generator=generator).to(device)

    return {"xq": images(batch), "x1": images(batch), "x2": images(batch), "x3": images(batch),
            "query_tuple": images(batch, segments), "key_tuple": images(batch, segments),
            "order_label": torch.randint(0, ORDER_CLASSES, (batch,), generator=generator).to(device)}


def build_mode(mode: str, shapes: dict, device: torch.device, seed: int):
    """(vclr, optimizer) set up as vclr.train.pretrain does for this mode."""
    _, channels_last, compile_backbones = MODES[mode]
    torch.manual_seed(seed)
    backbone, feature_dim = build_backbone(shapes["backbone"])
    model = VclrModel(backbone, feature_dim, num_segments=shapes["segments"])
    vclr = Vclr(model, queue_size=shapes["queue_size"], generator=torch.Generator().manual_seed(seed))
    if channels_last:
        vclr = vclr.to(memory_format=memory_format(is_video_backbone(shapes["backbone"]), True))
    vclr = vclr.to(device)
    optimizer = torch.optim.SGD(vclr.model.parameters(), lr=scaled_lr(STEP_SETTINGS["lr"], shapes["batch"]),
                                momentum=STEP_SETTINGS["momentum"], weight_decay=STEP_SETTINGS["weight_decay"])
    if compile_backbones:
        vclr.model.backbone.compile()
        vclr.momentum.encoder.backbone.compile()
    vclr.train()
    return vclr, optimizer


def train_step(vclr, optimizer, batch: dict[str, torch.Tensor], bf16: bool, device: torch.device) -> float:
    """One training step exactly as the loop of vclr.train.pretrain runs it; returns the total loss."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        outputs = vclr(batch)
    total, _ = vclr_loss(outputs, dict.fromkeys(LOSS_TERMS, 1.0), STEP_SETTINGS["temperature"])
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    vclr.momentum_update(STEP_SETTINGS["alpha"])
    vclr.enqueue(outputs)
    return total.item()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_steps(setup, batch, steps: int, device: torch.device) -> float:
    vclr, optimizer, bf16 = setup
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(vclr, optimizer, batch, bf16, device)
    _synchronize(device)
    return time.perf_counter() - start


def bench_synthetic(modes: list[str], shapes: dict, device: torch.device, rounds: int, steps: int,
                    warmup: int, seed: int = 0, log=print):
    """({mode: {videos_per_s (median over rounds), per round, first step s, ...}}, remeasure).

    remeasure(mode) -> videos/s of one more round of that mode (the models stay built), to bracket
    the real-loop run in time: the shared machine's load drifts between minutes.
    """
    batch = synthetic_batch(shapes["batch"], shapes["crop"], shapes["segments"], device,
                            torch.Generator().manual_seed(seed), shapes.get("clip_frames"))
    setups, results = {}, {}
    for mode in modes:
        vclr, optimizer = build_mode(mode, shapes, device, seed)
        setups[mode] = (vclr, optimizer, MODES[mode][0])
        # The first step holds compilation (compile mode) and cudnn autotuning: timed on its own.
        first_step_s = _timed_steps(setups[mode], batch, 1, device)
        warmup_s = _timed_steps(setups[mode], batch, warmup, device) if warmup else 0.0
        results[mode] = {"first_step_s": first_step_s, "warmup_steps": warmup, "warmup_s": warmup_s,
                         "rounds": []}
        log(f"  {mode}: first step {first_step_s:.1f} s, {warmup} warm-up steps {warmup_s:.1f} s")
    for round_index in range(rounds):
        for mode in modes:  # interleaved: A, B, C, A, B, C, ...
            elapsed = _timed_steps(setups[mode], batch, steps, device)
            results[mode]["rounds"].append(steps * shapes["batch"] / elapsed)
        log(f"  round {round_index + 1}/{rounds}: "
            + ", ".join(f"{mode} {results[mode]['rounds'][-1]:.1f}" for mode in modes) + " videos/s")
    for mode in modes:
        rates = results[mode]["rounds"]
        results[mode]["videos_per_s"] = statistics.median(rates)
        results[mode]["steps_per_round"] = steps
    baseline = results.get("fp32_eager", {}).get("videos_per_s")
    for mode in modes:
        results[mode]["ratio_to_fp32_eager"] = results[mode]["videos_per_s"] / baseline if baseline else None
        if baseline:  # round by round: the two sides of a ratio ran seconds apart
            results[mode]["ratio_to_fp32_eager_per_round"] = [
                rate / base for rate, base in zip(results[mode]["rounds"], results["fp32_eager"]["rounds"])]
        if MODES[mode][2]:
            # Compile time: the first step's excess over a warm step.
            results[mode]["compile_s"] = max(
                0.0, results[mode]["first_step_s"] - shapes["batch"] / results[mode]["videos_per_s"])

    def remeasure(mode: str) -> float:
        return steps * shapes["batch"] / _timed_steps(setups[mode], batch, steps, device)

    return results, remeasure


def make_packed_dataset(work: Path, videos: int, crop: int, seed: int = 0, frames: int = 32) -> tuple[Path, Path]:
    """(index CSV, frames dir) of `videos` videos of packed JPEG frames (vclr.bench.features'
    write_packed_videos: torch, torchvision, numpy and PIL only, so it runs on a GPU machine without
    PyAV), `frames` frames each at the size the paper's frames have relative to the crop (short
    side 256 for 224, 340x256), so JPEG decoding and cropping cost what they will.
    """
    from vclr.bench.features import write_packed_videos
    from vclr.data.index import write_split

    short_side = 2 * math.ceil(crop * 256 / 224 / 2)
    size = (short_side, 2 * math.ceil(short_side * 340 / 256 / 2))
    frames_dir, index_csv = work / "frames", work / "train.csv"
    write_split(index_csv, write_packed_videos(frames_dir, videos, frames, size, seed=seed))
    return index_csv, frames_dir


def bench_loop(mode: str, shapes: dict, device: torch.device, index_csv: Path, frames_dir: Path, out_dir: Path,
               steps: int, warmup: int, workers: int, seed: int = 0, augment: str = "cpu", prefetch: int = 1) -> dict:
    """videos/s of `pretrain(...)` over `steps` steps after `warmup`, from its per-step log.

    The first step of every epoch (DataLoader and worker start-up) and the first `warmup` steps
    (compilation, autotuning) are excluded; a step's time runs from the end of the previous step.
    """
    from vclr.data.pretrain_dataset import found_rows
    from vclr.train.pretrain import pretrain

    bf16, channels_last, compile_backbones = MODES[mode]
    videos = len(found_rows(index_csv))
    iterations_per_epoch = videos // shapes["batch"]
    if iterations_per_epoch < 2:
        raise VclrError(f"{index_csv}: {videos} found videos give {iterations_per_epoch} steps per epoch at "
                        f"batch {shapes['batch']}; need at least 2 (the first of each epoch is not timed)")
    total_steps, timed = 0, 0
    while timed < steps:  # steps to run so that `steps` of them are timed
        total_steps += 1
        timed += total_steps > warmup and (total_steps - 1) % iterations_per_epoch > 0
    epochs = math.ceil(total_steps / iterations_per_epoch)
    settings = {"backbone": shapes["backbone"], "batch_size": shapes["batch"], "crop": shapes["crop"],
                "segments": shapes["segments"], "queue_size": shapes["queue_size"], "epochs": epochs,
                "workers": workers, "checkpoint_every": epochs, "bf16": bf16, "channels_last": channels_last,
                "compile": compile_backbones, "device": device.type, "seed": seed,
                "max_steps": total_steps, "augment": augment, "prefetch": prefetch,
                **{key: shapes[key] for key in ("clip_frames", "clip_stride") if key in shapes}}
    started = time.perf_counter()
    summary = pretrain(settings, index_csv, frames_dir, out_dir, resume=False)
    wall_s = time.perf_counter() - started
    log = [json.loads(line) for line in (out_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    kept = [record for number, record in enumerate(log)
            if number >= warmup and record["iteration"] > 1]
    if not kept:
        raise VclrError(f"{out_dir / 'log.jsonl'}: no step left to time after start-up")
    seconds = sum(shapes["batch"] / record["videos_per_s"] for record in kept)
    return {"mode": mode, "augment": augment, "prefetch": prefetch, "videos": videos, "iterations_per_epoch": iterations_per_epoch,
            "workers": workers, "steps_logged": len(log), "steps_timed": len(kept),
            "videos_per_s": len(kept) * shapes["batch"] / seconds,
            "per_step_videos_per_s": [record["videos_per_s"] for record in kept],
            "wall_s_including_startup": wall_s, "last_loss": summary["last_loss"]}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--preset", choices=("paper", "cpu"),
                        help="shapes: paper = resnet50, batch 64, crop 224 (default on cuda); cpu = resnet18, "
                             "batch 8, crop 112 (default on cpu); explicit flags override it")
    parser.add_argument("--backbone", choices=ALL_BACKBONES, help="2D (frames) or 3D (clips): "
                        + ", ".join(ALL_BACKBONES))
    parser.add_argument("--clip-frames", type=int,
                        help=f"3D backbones: frames per segment clip (default {DEFAULT_CLIP_FRAMES})")
    parser.add_argument("--clip-stride", type=int,
                        help=f"3D backbones: frame step inside a clip (default {DEFAULT_CLIP_STRIDE})")
    parser.add_argument("--batch", type=int, help="videos per step")
    parser.add_argument("--crop", type=int)
    parser.add_argument("--segments", type=int, default=PAPER_SHAPES["segments"], help="K")
    parser.add_argument("--queue-size", type=int, default=PAPER_SHAPES["queue_size"])
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the modes")
    parser.add_argument("--steps", type=int, help="timed steps per mode per round (default: 10 cuda, 3 cpu)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode after the first")
    parser.add_argument("--loop-mode", default="best",
                        help="mode of the real-loop run: a mode name, 'best' (fastest synthetic), or 'none'")
    parser.add_argument("--loop-steps", type=int, help="timed steps of the real loop (default: 20 cuda, 4 cpu)")
    parser.add_argument("--loop-workers", type=int, help="DataLoader workers (default: cores, at most 16)")
    parser.add_argument("--loop-augment", default="cpu", choices=("cpu", "batched"),
                        help="real loop's augmentation: per frame in the workers, or batched on the device")
    parser.add_argument("--loop-prefetch", default="1",
                        help="comma-separated prefetch depths, one real-loop run each in this order (0: prepare "
                             "batches between steps; N: N batches ahead on a side stream), e.g. 0,1,0,1")
    parser.add_argument("--frames", type=Path, help="packed-frames directory for the real loop (default: generate)")
    parser.add_argument("--index", type=Path, help="split CSV for the real loop (with --frames)")
    parser.add_argument("--out-json", type=Path, help="write the results here")


def resolve_shapes(args: argparse.Namespace, device: torch.device) -> dict:
    preset = args.preset or ("paper" if device.type == "cuda" else "cpu")
    shapes = dict(PAPER_SHAPES)
    if preset == "cpu":
        shapes.update(CPU_PRESET)
    for name in ("backbone", "batch", "crop"):
        if getattr(args, name) is not None:
            shapes[name] = getattr(args, name)
    shapes.update(segments=args.segments, queue_size=args.queue_size, preset=preset)
    if is_video_backbone(shapes["backbone"]):  # 2D shapes carry no clip keys
        shapes.update(clip_frames=DEFAULT_CLIP_FRAMES if args.clip_frames is None else args.clip_frames,
                      clip_stride=DEFAULT_CLIP_STRIDE if args.clip_stride is None else args.clip_stride)
    elif args.clip_frames is not None or args.clip_stride is not None:
        raise VclrError(f"--clip-frames / --clip-stride: backbone {shapes['backbone']!r} is 2D (frames); "
                        f"clips need a 3D backbone")
    for name in ("batch", "crop", "segments", "queue_size", "clip_frames", "clip_stride"):
        if name not in shapes:
            continue
        if shapes[name] <= 0:
            raise VclrError(f"--{name.replace('_', '-')} must be positive, got {shapes[name]}")
    if shapes["queue_size"] % shapes["batch"]:
        raise VclrError(f"--queue-size {shapes['queue_size']} is not a multiple of --batch {shapes['batch']}")
    return shapes


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    shapes = resolve_shapes(args, device)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise VclrError(f"--modes: unknown or empty {unknown or modes} (known: {', '.join(MODES)})")
    if (args.frames is None) != (args.index is None):
        raise VclrError("--frames and --index: give both or neither")
    if args.loop_mode not in ("best", "none", *modes):
        raise VclrError(f"--loop-mode {args.loop_mode!r}: expected best, none or one of --modes ({', '.join(modes)})")
    try:
        prefetch_depths = [int(depth) for depth in args.loop_prefetch.split(",") if depth.strip()]
    except ValueError:
        raise VclrError(f"--loop-prefetch {args.loop_prefetch!r}: expected comma-separated integers") from None
    if not prefetch_depths or min(prefetch_depths) < 0:
        raise VclrError(f"--loop-prefetch {args.loop_prefetch!r}: expected depths >= 0")
    on_cuda = device.type == "cuda"
    steps = args.steps or (10 if on_cuda else 3)
    loop_steps = args.loop_steps or (20 if on_cuda else 4)
    workers = args.loop_workers if args.loop_workers is not None else min(16, os.cpu_count() or 1)
    if on_cuda:
        torch.backends.cudnn.benchmark = True  # as the training loop sets it
    where = torch.cuda.get_device_name(device) if on_cuda else f"cpu, {torch.get_num_threads()} threads"
    clip = (f", clips of {shapes['clip_frames']} frames every {shapes['clip_stride']}"
            if "clip_frames" in shapes else "")
    print(f"device {device} ({where}), torch {torch.__version__}; {shapes['backbone']}, batch {shapes['batch']}, "
          f"crop {shapes['crop']}, K={shapes['segments']}, queue {shapes['queue_size']}{clip}")
    print(f"synthetic tensors: {args.rounds} rounds x {steps} steps per mode (after 1 + {args.warmup} warm-up)")
    synthetic, remeasure = bench_synthetic(modes, shapes, device, args.rounds, steps, args.warmup)
    result = {
        "date": time.strftime("%Y-%m-%d"), "device": str(device), "device_name": where,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "processor": platform.processor(), "shapes": shapes,
        "rounds": args.rounds, "steps_per_round": steps, "synthetic": synthetic, "loops": [],
    }
    for mode in modes:
        entry = synthetic[mode]
        ratio = (f"{entry['ratio_to_fp32_eager']:.2f}x fp32 eager (per round "
                 f"{', '.join(f'{r:.2f}' for r in entry['ratio_to_fp32_eager_per_round'])})"
                 if entry["ratio_to_fp32_eager"] else "")
        extra = f", compile {entry['compile_s']:.1f} s" if "compile_s" in entry else ""
        print(f"{mode:28s} {entry['videos_per_s']:9.1f} videos/s (median; rounds "
              f"{', '.join(f'{rate:.1f}' for rate in entry['rounds'])}) {ratio}{extra}")
    if args.loop_mode != "none":
        loop_mode = (max(modes, key=lambda mode: synthetic[mode]["videos_per_s"]) if args.loop_mode == "best"
                     else args.loop_mode)
        with tempfile.TemporaryDirectory(prefix="vclr-bench-pretrain-") as tmp:
            work = Path(tmp)
            if args.frames is None:
                videos = shapes["batch"] * 4
                print(f"real loop: writing {videos} videos of packed JPEG frames ...")
                started = time.perf_counter()
                span = clip_span(shapes.get("clip_frames", 1), shapes.get("clip_stride", 1))
                index_csv, frames_dir = make_packed_dataset(work, videos, shapes["crop"],
                                                            frames=max(32, shapes["segments"] * span))
                print(f"  data made in {time.perf_counter() - started:.1f} s")
            else:
                index_csv, frames_dir = args.index, args.frames
            for depth in prefetch_depths:
                print(f"real loop ({loop_mode}, augment {args.loop_augment}, {workers} workers, prefetch {depth}): "
                      f"{args.warmup} warm-up + {loop_steps} timed steps")
                loop = bench_loop(loop_mode, shapes, device, index_csv, frames_dir, work / f"run{len(result['loops'])}",
                                  loop_steps, args.warmup, workers, augment=args.loop_augment, prefetch=depth)
                # each run against the synthetic median and against a synthetic round right after it
                loop["synthetic_videos_per_s_after"] = remeasure(loop_mode)
                loop["fraction_of_synthetic"] = loop["videos_per_s"] / synthetic[loop_mode]["videos_per_s"]
                loop["fraction_of_synthetic_after"] = loop["videos_per_s"] / loop["synthetic_videos_per_s_after"]
                result["loops"].append(loop)
                print(f"real loop {loop_mode}, prefetch {depth}: {loop['videos_per_s']:.1f} videos/s over "
                      f"{loop['steps_timed']} steps = {loop['fraction_of_synthetic']:.2f} of the synthetic-tensor "
                      f"median, {loop['fraction_of_synthetic_after']:.2f} of a synthetic round run right after "
                      f"({loop['synthetic_videos_per_s_after']:.1f} videos/s)")
    if args.out_json:
        atomic_write_json(args.out_json, result)
    return 0
