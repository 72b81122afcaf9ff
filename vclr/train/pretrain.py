"""VCLR pretraining loop (one process or torchrun + DDP), resumable at the exact step.

Every source of randomness is either a pure function of (seed, epoch, index) — the epoch's video
order and each sample (vclr.data.pretrain_dataset) — or an RNG state saved in the checkpoint (the
shuffle-BN permutation generator, the DataLoader's worker-seed generator, the global RNGs). So a run stopped after
k steps and resumed reaches step N with the same per-step losses as an uninterrupted run (in
deterministic mode on the same machine).

With `augment: batched` the DataLoader workers only read JPEG bytes and draw each video's augmentation
parameters (a pure function of seed, epoch and index like the rest of the sample, so there is no extra
generator state to save); the training device decodes and augments whole batches.

A 3D backbone (vclr.models.video3d) changes only what one segment sample is: a clip of
`clip_frames` frames every `clip_stride` frames [3,T,H,W] instead of a frame [3,H,W] (the dataset
and the batched augmentation add the time axis; the model, losses and this loop take either).

Under torchrun (vclr.train.distributed) the model is wrapped in DistributedDataParallel; the batch
size stays the GLOBAL batch, each process loading its contiguous share of every global batch
(pretrain_dataset.rank_indices) and drawing each video's sample exactly as one process would (the
sample depends on the video index, not on the process). Keys are gathered before they are enqueued
and the momentum update follows identical averaged gradients, so the queues and the momentum
encoder are identical on every process. Shuffle-BN permutes across processes. Only rank 0 writes
(log, checkpoints, backbone, summary); the others wait at a barrier. Resuming, every process reads
rank 0's checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vclr.data.device_prefetch import DevicePrefetcher
from vclr.data.packed import PackedFrames
from vclr.data.pretrain_dataset import (
    PretrainDataset,
    PretrainJpegDataset,
    collate_jpeg_batch,
    decode_and_augment,
    epoch_loader,
    found_rows,
)
from vclr.errors import VclrError
from vclr.io_utils import atomic_open, atomic_write_json, atomic_write_text
from vclr.models.backbones import (
    ALL_BACKBONES,
    build_backbone,
    is_video_backbone,
    load_moco_v2,
)
from vclr.models.vclr import Vclr, VclrModel
from vclr.models.video3d import DEFAULT_CLIP_FRAMES, DEFAULT_CLIP_STRIDE, memory_format
from vclr.train.checkpoint import load_checkpoint, restore_checkpoint, save_checkpoint
from vclr.train.distributed import (
    barrier,
    distributed_env,
    gather_keys,
    mean_across_ranks,
    rank,
    resolve_device,
    set_determinism,
    shuffle_across_ranks,
    training_session,
    unshuffle_across_ranks,
    world_size,
)
from vclr.train.losses import LOSS_TERMS, vclr_loss
from vclr.train.schedule import lr_at, scaled_lr

DEFAULT_SETTINGS = {
    "backbone": "resnet50", "epochs": 400, "batch_size": 32, "lr": 0.1, "warmup_epochs": 5.0,
    "eta_min": 1e-6, "momentum": 0.9, "weight_decay": 1e-4, "alpha": 0.999, "queue_size": 131072,
    "crop": 224, "segments": 3, "temperature": 0.1, "losses": list(LOSS_TERMS), "seed": 0, "workers": 4,
    "checkpoint_every": 10, "init": "random", "bf16": False, "channels_last": False, "compile": False,
    "deterministic": False, "max_steps": None, "device": "auto", "augment": "cpu",
    "clip_frames": None, "clip_stride": None, "prefetch": 1,
}
# clip_frames / clip_stride: the segment clip of a 3D backbone (None there: DEFAULT_CLIP_FRAMES /
# DEFAULT_CLIP_STRIDE of vclr.models.video3d); a 2D backbone samples frames, refuses them and its
# resolved settings do not hold them.
# Where frames are decoded and augmented: "cpu" = per frame in the DataLoader workers
# (vclr.data.augment); "batched" = workers read JPEG bytes only, the training device decodes and
# augments whole batches (vclr.data.batch_augment).
AUGMENT_MODES = ("cpu", "batched")
# prefetch: batches prepared (moved to the device; decoded and augmented with augment: batched) ahead
# of the step in a background thread, on a side CUDA stream on a GPU (vclr.data.device_prefetch);
# 0 prepares each batch between steps. The batches are the same either way.
# Settings that may change between a run and its resumption (they do not change what is computed).
RESUMABLE_CHANGES = {"workers", "checkpoint_every", "max_steps", "compile", "epochs", "prefetch"}
CHECKPOINT_NAME = "checkpoint_last.pt"


def resolve_settings(settings: dict) -> dict:
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
    if unknown:
        raise VclrError(f"unknown pretraining settings: {', '.join(unknown)}")
    resolved = {**DEFAULT_SETTINGS, **settings}
    resolved["losses"] = list(resolved["losses"])
    bad = [term for term in resolved["losses"] if term not in LOSS_TERMS]
    if bad or not resolved["losses"]:
        raise VclrError(f"losses: unknown or empty {bad or resolved['losses']} (known: {', '.join(LOSS_TERMS)})")
    if resolved["backbone"] not in ALL_BACKBONES:
        raise VclrError(f"backbone: {resolved['backbone']!r} not one of {', '.join(ALL_BACKBONES)}")
    clip = resolve_clip(resolved["backbone"], resolved.pop("clip_frames"), resolved.pop("clip_stride"))
    if is_video_backbone(resolved["backbone"]):  # a 2D run's settings stay as they were before clips existed
        resolved.update(clip)
    for key in ("epochs", "batch_size", "queue_size", "crop", "checkpoint_every"):
        if int(resolved[key]) <= 0:
            raise VclrError(f"{key} must be positive, got {resolved[key]}")
    if int(resolved["prefetch"]) < 0:
        raise VclrError(f"prefetch must be 0 (off) or a number of batches, got {resolved['prefetch']}")
    if resolved["queue_size"] % resolved["batch_size"]:
        raise VclrError(f"queue_size {resolved['queue_size']} is not a multiple of the global batch "
                        f"{resolved['batch_size']} (the FIFO queue is filled one batch of keys at a time)")
    if resolved["augment"] not in AUGMENT_MODES:
        raise VclrError(f"augment: expected one of {', '.join(AUGMENT_MODES)}, got {resolved['augment']!r}")
    if not 0.0 <= resolved["alpha"] < 1.0:
        raise VclrError(f"alpha must be in [0, 1) (the key encoder's momentum), got {resolved['alpha']}")
    if resolved["temperature"] <= 0:
        raise VclrError(f"temperature must be positive, got {resolved['temperature']}")
    init = resolved["init"]
    if init != "random" and not init.startswith("moco_v2:"):
        raise VclrError(f"init: expected 'random' or 'moco_v2:PATH', got {init!r}")
    if init != "random" and is_video_backbone(resolved["backbone"]):
        raise VclrError(f"init: ImageNet MoCo v2 weights are 2D; backbone {resolved['backbone']!r} is 3D "
                        f"(use init: random)")
    return resolved


def resolve_clip(backbone: str, clip_frames: int | None, clip_stride: int | None) -> dict:
    """{clip_frames, clip_stride} of a run: the defaults for a 3D backbone, None for a 2D one (which
    refuses them: its segment samples are frames)."""
    if not is_video_backbone(backbone):
        if clip_frames is not None or clip_stride is not None:
            raise VclrError(f"clip_frames / clip_stride: backbone {backbone!r} is 2D (one frame per segment "
                            f"sample); clips need a 3D backbone")
        return {"clip_frames": None, "clip_stride": None}
    clip = {"clip_frames": DEFAULT_CLIP_FRAMES if clip_frames is None else int(clip_frames),
            "clip_stride": DEFAULT_CLIP_STRIDE if clip_stride is None else int(clip_stride)}
    for key, value in clip.items():
        if value < 1:
            raise VclrError(f"{key} must be positive, got {value}")
    return clip


def build_vclr(settings: dict, generator: torch.Generator) -> Vclr:
    """Model from settings; the momentum encoder is built after the optional MoCo v2 import."""
    backbone, feature_dim = build_backbone(settings["backbone"])
    model = VclrModel(backbone, feature_dim, num_segments=settings["segments"])
    if settings["init"].startswith("moco_v2:"):
        load_moco_v2(settings["init"].split(":", 1)[1], model)
    return Vclr(model, queue_size=settings["queue_size"], generator=generator)


def _truncate_log(log_path: Path, last_step: int) -> None:
    """Keep the log lines of steps the checkpoint holds (a killed run may have logged a few more)."""
    if not log_path.exists():
        return
    lines = [line for line in log_path.read_text(encoding="utf-8").splitlines()
             if line.strip() and json.loads(line)["step"] <= last_step]
    atomic_write_text(log_path, "".join(line + "\n" for line in lines))


def pretrain(settings: dict, index_csv: str | os.PathLike, frames_dir: str | os.PathLike,
             out_dir: str | os.PathLike, resume: bool = True) -> dict:
    """Pretrain VCLR on the found videos of `index_csv`; outputs in `out_dir` (see module docstring).

    Returns the summary (also written to OUT/summary.json when training completes). With
    settings["max_steps"] the run stops after that many global steps, as if killed, after saving
    a mid-epoch checkpoint; `completed` is then False and no backbone.pt/summary.json is written.
    A fresh run seeds the global python/numpy/torch RNGs from settings["seed"] once (model init).
    Under torchrun (WORLD_SIZE > 1) it joins the process group (left again on return).
    """
    settings = resolve_settings(settings)
    with training_session(settings["batch_size"], settings["device"]):
        return _pretrain(settings, index_csv, frames_dir, out_dir, resume)


def data_fingerprint(index_csv: str | os.PathLike, frames_dir: str | os.PathLike) -> dict:
    """sha256 of the split index and of the frames manifest (which names every packed video)."""
    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    return {"index_sha256": digest(Path(index_csv)),
            "manifest_sha256": digest(Path(frames_dir) / "manifest.json")}


def _pretrain(settings: dict, index_csv: str | os.PathLike, frames_dir: str | os.PathLike,
              out_dir: str | os.PathLike, resume: bool) -> dict:
    out_dir = Path(out_dir)
    checkpoint_path, log_path = out_dir / CHECKPOINT_NAME, out_dir / "log.jsonl"
    is_writer, processes = rank() == 0, world_size()
    device = resolve_device(settings["device"])
    if settings["bf16"] and device.type == "cpu" and is_video_backbone(settings["backbone"]):
        # torch 2.14 CPU: autocast's bf16 conv3d weight gradient comes out NaN for some shapes (e.g.
        # 96 x 57 x 2 x 6 x 6 through a 3x1x1 temporal conv of r2plus1d_tiny), so the run dies at step 2
        raise VclrError(f"bf16: a 3D backbone ({settings['backbone']}) trains in bf16 on a GPU only; on the "
                        f"CPU PyTorch's bf16 conv3d weight gradients can be NaN (drop --bf16)")
    set_determinism(settings["deterministic"], device)

    batched = settings["augment"] == "batched"
    dataset = (PretrainJpegDataset if batched else PretrainDataset)(
        found_rows(index_csv), PackedFrames(frames_dir), crop_size=settings["crop"],
        num_segments=settings["segments"], seed=settings["seed"], clip_frames=settings.get("clip_frames"),
        clip_stride=settings.get("clip_stride", 1))
    batch_size = settings["batch_size"]  # global; each process loads batch_size / processes
    iters_per_epoch = len(dataset) // batch_size
    if iters_per_epoch == 0:
        raise VclrError(f"{index_csv}: {len(dataset)} found videos, fewer than one batch of {batch_size}")
    if is_writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    epochs = settings["epochs"]
    peak_lr = scaled_lr(settings["lr"], batch_size)

    # Fresh-run seeding, once (model init, queues); a resumed run restores every state instead.
    random.seed(settings["seed"])
    np.random.seed(settings["seed"] % 2**32)
    torch.manual_seed(settings["seed"])
    loader_generator = torch.Generator()  # the DataLoader's worker base seeds
    loader_generator.manual_seed(settings["seed"])
    vclr = build_vclr(settings, torch.Generator().manual_seed(settings["seed"]))
    if settings["channels_last"]:
        vclr = vclr.to(memory_format=memory_format(is_video_backbone(settings["backbone"]), True))
    vclr = vclr.to(device)
    optimizer = torch.optim.SGD(vclr.model.parameters(), lr=peak_lr, momentum=settings["momentum"],
                                weight_decay=settings["weight_decay"])
    # Shuffle-BN permutations (drawn on rank 0): a generator of their own, saved in the checkpoint.
    shuffle_generator = torch.Generator().manual_seed(settings["seed"])
    generators = {"loader": loader_generator, "shuffle": shuffle_generator}
    # What the run trains on is part of its identity: a checkpoint never resumes on other data.
    config = dict(settings, data=data_fingerprint(index_csv, frames_dir))

    epoch, iteration, step = 0, 0, 0
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        # A setting newer than the checkpoint counts as its default there (augment: cpu).
        changed = sorted(key for key in config if key not in RESUMABLE_CHANGES
                         and state["config"].get(key, DEFAULT_SETTINGS.get(key)) != config[key])
        if changed:
            raise VclrError(f"{checkpoint_path}: saved with other settings ({', '.join(changed)}); "
                            f"use another output directory or resume with the same settings")
        restore_checkpoint(checkpoint_path, state, vclr=vclr, optimizer=optimizer, generators=generators)
        epoch, iteration, step = state["epoch"], state["iteration"], state["step"]
        if is_writer:
            _truncate_log(log_path, step)
    elif log_path.exists() and is_writer:
        log_path.unlink()
    barrier()  # every process decided fresh/resume before rank 0 writes anything new
    if settings["compile"]:
        vclr.model.backbone.compile()
        vclr.momentum.encoder.backbone.compile()
    forward, gather = vclr, None
    if processes > 1:
        # Buffers (queues, BN statistics) are synchronised from rank 0 once, at wrapping, and not
        # at every forward (the paper's "no buffer broadcast"): the queues stay equal because the
        # keys are gathered. A switched-off loss term leaves its head without gradient.
        forward = torch.nn.parallel.DistributedDataParallel(
            vclr, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
            find_unused_parameters=set(settings["losses"]) != set(LOSS_TERMS))
        gather = gather_keys
    shuffle = functools.partial(shuffle_across_ranks, generator=shuffle_generator)

    weights = {term: 1.0 for term in settings["losses"]}
    vclr.train()
    first_loss = last_loss = None
    started, steps_this_run = time.perf_counter(), 0
    stopped = False
    if batched:
        prepare = functools.partial(decode_and_augment, device=device, crop_size=settings["crop"],
                                    num_segments=settings["segments"], channels_last=settings["channels_last"],
                                    dtype=torch.bfloat16 if settings["bf16"] else torch.float32,
                                    clip_frames=settings.get("clip_frames"))
    else:
        def prepare(batch: dict) -> dict:
            return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    while epoch < epochs and not stopped:
        # This process's share of the global batches a resumed run has not consumed yet.
        loader = epoch_loader(dataset, epoch=epoch, seed=settings["seed"], batch_size=batch_size,
                              world_size=processes, rank=rank(), start_iteration=iteration,
                              workers=settings["workers"], generator=loader_generator,
                              pin_memory=device.type == "cuda", collate_fn=collate_jpeg_batch if batched else None)
        batches = DevicePrefetcher(loader, prepare, device, depth=int(settings["prefetch"]))
        progress = tqdm(batches, total=iters_per_epoch, initial=iteration, desc=f"epoch {epoch}",
                        leave=False, disable=True if not is_writer else None)
        try:
            tick = time.perf_counter()
            for batch in progress:
                lr = lr_at(epoch * iters_per_epoch + iteration, iters_per_epoch, epochs, peak_lr,
                           settings["warmup_epochs"], settings["eta_min"])
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings["bf16"]):
                    outputs = forward(batch, shuffle_fn=shuffle, unshuffle_fn=unshuffle_across_ranks)
                try:
                    total, terms = vclr_loss(outputs, weights, settings["temperature"])
                except VclrError as error:
                    raise VclrError(f"step {step + 1} (epoch {epoch}, iteration {iteration}): {error}; "
                                    f"last good checkpoint: {checkpoint_path if checkpoint_path.exists() else 'none'}"
                                    ) from None
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                vclr.momentum_update(settings["alpha"])
                vclr.enqueue(outputs, gather_fn=gather)
                # Logged: the global loss (the mean of the per-process means; equal shares per process).
                terms = {term: mean_across_ranks(value) for term, value in terms.items()}
                total = mean_across_ranks(total)
                step, iteration = step + 1, iteration + 1
                steps_this_run += 1
                logged = torch.stack([*terms.values(), total.detach()]).float().tolist()  # one host sync
                now = time.perf_counter()
                record = {"step": step, "epoch": epoch, "iteration": iteration, "lr": lr,
                          **dict(zip(terms, logged)), "total": logged[-1],
                          "videos_per_s": batch_size / max(now - tick, 1e-9)}
                tick = now
                first_loss = record["total"] if first_loss is None else first_loss
                last_loss = record["total"]
                if is_writer:
                    with open(log_path, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(record) + "\n")
                progress.set_postfix(loss=f"{record['total']:.3f}", lr=f"{lr:.2e}")
                if settings["max_steps"] is not None and step >= settings["max_steps"]:
                    stopped = True
                    break
        finally:  # also when a step fails: stop the thread and the loader's workers
            progress.close()
            batches.close()
        if iteration >= iters_per_epoch:
            epoch, iteration = epoch + 1, 0
        if (stopped or epoch % settings["checkpoint_every"] == 0 or epoch == epochs) and is_writer:
            save_checkpoint(checkpoint_path, vclr=vclr, optimizer=optimizer, epoch=epoch, iteration=iteration,
                            step=step, config=config, generators=generators)
        barrier()

    completed = epoch >= epochs
    elapsed = time.perf_counter() - started
    summary = {
        "completed": completed, "steps": step, "epochs": epoch, "iterations_per_epoch": iters_per_epoch,
        "videos": len(dataset), "first_loss_this_run": first_loss, "last_loss": last_loss,
        "videos_per_s": steps_this_run * batch_size / elapsed if steps_this_run else None,
        "settings": config, "processes": processes,
    }
    if completed and is_writer:
        backbone_state = {key: value.cpu() for key, value in vclr.model.backbone.state_dict().items()}
        with atomic_open(out_dir / "backbone.pt", "wb") as handle:
            torch.save(backbone_state, handle)
        atomic_write_json(out_dir / "summary.json", summary)
    barrier()
    return summary


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, type=Path, help="split CSV (vclr data index), e.g. INDEX/train.csv")
    parser.add_argument("--frames", required=True, type=Path, help="packed-frames directory")
    parser.add_argument("--out", required=True, type=Path, help="output directory (checkpoint, log, backbone)")
    parser.add_argument("--backbone", default="resnet50", choices=ALL_BACKBONES,
                        help="2D (frames per segment) or 3D (clips per segment): " + ", ".join(ALL_BACKBONES))
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32,
                        help="global batch (under torchrun split evenly over the processes)")
    parser.add_argument("--lr", type=float, default=0.1, help="lr for a batch of 256 (scaled linearly)")
    parser.add_argument("--warmup-epochs", type=float, default=5.0)
    parser.add_argument("--queue-size", type=int, default=131072)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--segments", type=int, default=3)
    parser.add_argument("--clip-frames", type=int, default=None,
                        help=f"3D backbones: frames per segment clip (default {DEFAULT_CLIP_FRAMES})")
    parser.add_argument("--clip-stride", type=int, default=None,
                        help=f"3D backbones: frame step inside a clip (default {DEFAULT_CLIP_STRIDE})")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--alpha", type=float, default=0.999, help="momentum of the key encoder")
    parser.add_argument("--losses", default=",".join(LOSS_TERMS), help="comma-separated subset of "
                        + ",".join(LOSS_TERMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--checkpoint-every", type=int, default=10, help="epochs between checkpoints")
    parser.add_argument("--init", default="random", help="random | moco_v2:PATH")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--augment", default="cpu", choices=AUGMENT_MODES,
                        help="cpu: per frame in the loader workers; batched: decode + augment whole batches "
                             "on the training device")
    parser.add_argument("--prefetch", type=int, default=1,
                        help="batches prepared ahead in a background thread (side CUDA stream on a GPU); 0: off")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbones")
    parser.add_argument("--deterministic", action="store_true", help="deterministic algorithms (exact resume)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many global steps, saving a checkpoint (as if killed)")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint_last.pt")


def main(args: argparse.Namespace) -> int:
    settings = {
        "backbone": args.backbone, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "warmup_epochs": args.warmup_epochs, "queue_size": args.queue_size, "crop": args.crop,
        "segments": args.segments, "temperature": args.temperature, "alpha": args.alpha,
        "losses": [term.strip() for term in args.losses.split(",") if term.strip()], "seed": args.seed,
        "workers": args.workers, "checkpoint_every": args.checkpoint_every, "init": args.init,
        "bf16": args.bf16, "channels_last": args.channels_last, "compile": args.compile,
        "deterministic": args.deterministic, "max_steps": args.max_steps, "device": args.device,
        "augment": args.augment, "clip_frames": args.clip_frames, "clip_stride": args.clip_stride,
        "prefetch": args.prefetch,
    }
    summary = pretrain(settings, args.index, args.frames, args.out, resume=not args.no_resume)
    if distributed_env()[0] != 0:  # one report per run, from the process that wrote the outputs
        return 0
    state = "completed" if summary["completed"] else "stopped (resumable)"
    print(f"{state}: {summary['steps']} steps, last loss {summary['last_loss']}, {args.out}")
    return 0
