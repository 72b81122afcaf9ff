"""`vclr eval finetune`: TSN / TSM fine-tuning and its multi-view test (spec/protocols.md, "Fine-tuning").

PROTOCOLS holds the published recipes keyed by (dataset, arch); CLI flags override single values for
the tiny profile. The loop mirrors vclr.train.pretrain: one process or torchrun + DDP (gloo / NCCL),
the batch is the GLOBAL batch and each process loads its contiguous share of every global batch
(pretrain_dataset.rank_indices); samples are pure functions of (seed, epoch, clip index) and every
RNG the loop touches (dropout: the global torch RNG) is saved in the checkpoint, so a run stopped
after k steps and resumed logs the same per-step losses as an uninterrupted one. Only rank 0 writes.

When training is complete the test split is scored with the protocol's views (each process scores a
share, rank 0 gathers) and rank 0 writes OUT/model.pt (vclr.models.tsn.load_finetuned),
OUT/test_scores.npz and the metrics record (top-1, top-5, mean class accuracy). Rerunning a finished
run only redoes the test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from vclr.data.finetune_dataset import (
    AUGMENTATIONS,
    TEST_VIEWS,
    FinetuneTestDataset,
    FinetuneTrainDataset,
    read_classes,
    video_clips,
)
from vclr.data.index import read_split
from vclr.data.packed import PackedFrames
from vclr.data.pretrain_dataset import epoch_loader
from vclr.errors import VclrError
from vclr.evaluate.record import write_metrics_record
from vclr.io_utils import atomic_open, atomic_write_json, atomic_write_text
from vclr.models.backbones import ALL_BACKBONES, is_video_backbone
from vclr.models.tsn import (
    ARCHS,
    TEST_AVERAGES,
    TSN,
    build_model,
    save_finetuned,
    video_scores,
)
from vclr.models.video3d import DEFAULT_CLIP_FRAMES, DEFAULT_CLIP_STRIDE, memory_format
from vclr.train.checkpoint import restore_rng_states, rng_states
from vclr.train.distributed import (
    barrier,
    distributed_env,
    mean_across_ranks,
    rank,
    resolve_device,
    set_determinism,
    training_session,
    world_size,
)
from vclr.train.pretrain import data_fingerprint, resolve_clip

CHECKPOINT_FORMAT = "vclr-finetune-checkpoint/1"
CHECKPOINT_NAME = "checkpoint_last.pt"

# The published recipes (spec/protocols.md). lr is the rate at `batch_size` (scaled linearly when the
# batch is overridden); lr_steps are epochs where lr is multiplied by 0.1. Common to all: SGD
# momentum 0.9, short side 256, train crop 224.
_COMMON = {"short_side": 256, "crop": 224, "momentum": 0.9, "shift_div": 8, "init_std": 0.01,
           "augmentation": "resized_crop", "flip": True, "test_average": "score", "fc_lr5": False,
           "trimmed": False, "train_split": "train", "test_split": "test"}
PROTOCOLS: dict[tuple[str, str], dict] = {
    ("ucf101", "tsn"): {**_COMMON, "segments": 3, "epochs": 300, "lr": 0.01, "weight_decay": 5e-4,
                        "batch_size": 256, "clip_grad": 40.0, "lr_steps": [120, 240], "dropout": 0.4,
                        "test_frames": 25, "test_views": "centre", "test_crop": 256, "published_top1": 85.6},
    ("hmdb51", "tsn"): {**_COMMON, "segments": 8, "epochs": 50, "lr": 0.025, "weight_decay": 1e-4,
                        "batch_size": 256, "clip_grad": 40.0, "lr_steps": [20, 40], "dropout": 0.4,
                        "test_frames": 8, "test_views": "centre", "test_crop": 256, "published_top1": 54.1},
    ("ssv2", "tsn"): {**_COMMON, "segments": 8, "epochs": 50, "lr": 0.02, "weight_decay": 1e-4,
                      "batch_size": 128, "clip_grad": 40.0, "lr_steps": [20, 40], "dropout": 0.5,
                      "test_frames": 8, "test_views": "ten", "test_crop": 224, "augmentation": "multi_scale",
                      "flip": False, "test_split": "val", "published_top1": 33.3},
    ("ssv2", "tsm"): {**_COMMON, "segments": 8, "epochs": 50, "lr": 0.0075, "weight_decay": 5e-4,
                      "batch_size": 48, "clip_grad": 20.0, "lr_steps": [20, 40], "dropout": 0.5,
                      "test_frames": 8, "test_views": "centre", "test_crop": 224, "augmentation": "multi_scale",
                      "flip": False, "test_average": "prob", "fc_lr5": True, "init_std": 0.001,
                      "test_split": "val", "published_top1": 52.0},
    ("anet", "tsn"): {**_COMMON, "segments": 8, "epochs": 50, "lr": 0.01, "weight_decay": 1e-4,
                      "batch_size": 64, "clip_grad": 40.0, "lr_steps": [20, 40], "dropout": 0.8,
                      "test_frames": 25, "test_views": "three", "test_crop": 256, "trimmed": True,
                      "test_split": "val", "published_top1": 71.9},
}
# Run settings (not part of a protocol).
RUN_DEFAULTS = {"backbone": "resnet50", "init": "random", "seed": 0, "workers": 4, "checkpoint_every": 1,
                "device": "auto", "bf16": True, "channels_last": False, "deterministic": False,
                "max_steps": None, "test_batch_size": 8, "clip_frames": None, "clip_stride": None}
# clip_frames / clip_stride: a 3D backbone's clip per segment (default DEFAULT_CLIP_FRAMES /
# DEFAULT_CLIP_STRIDE of vclr.models.video3d); kept in the settings of 3D runs only (a 2D run refuses them).
CLIP_KEYS = ("clip_frames", "clip_stride")
OVERRIDABLE = ("segments", "epochs", "batch_size", "lr", "lr_steps", "short_side", "crop", "test_frames",
               "test_views", "test_crop", "dropout", "weight_decay", "clip_grad")
# Settings that may change between a run and its resumption (they do not change what is computed).
RESUMABLE_CHANGES = {"workers", "checkpoint_every", "max_steps", "test_batch_size"}


def resolve_settings(dataset: str, arch: str, overrides: dict | None = None, run: dict | None = None) -> dict:
    """The protocol of (dataset, arch) with `overrides` (keys of OVERRIDABLE, None = keep) and run
    settings. With a batch other than the protocol's, lr scales linearly (`lr` is then the rate at
    the protocol's batch, `lr_scaled` the one used); with fewer/more epochs and no explicit lr_steps,
    the steps scale to the same fractions of training."""
    if (dataset, arch) not in PROTOCOLS:
        known = ", ".join(f"{d}/{a}" for d, a in PROTOCOLS)
        raise VclrError(f"no fine-tuning protocol for dataset {dataset!r} with arch {arch!r} (known: {known})")
    protocol = PROTOCOLS[(dataset, arch)]
    overrides = {key: value for key, value in (overrides or {}).items() if value is not None}
    unknown = sorted(set(overrides) - set(OVERRIDABLE)) + sorted(set(run or {}) - set(RUN_DEFAULTS))
    if unknown:
        raise VclrError(f"unknown fine-tuning settings: {', '.join(unknown)}")
    settings = {"dataset": dataset, "arch": arch, **protocol, **RUN_DEFAULTS, **(run or {}), **overrides,
                "protocol_batch_size": protocol["batch_size"], "overridden": sorted(overrides)}
    if "epochs" in overrides and "lr_steps" not in overrides:
        settings["lr_steps"] = sorted({max(1, round(step * settings["epochs"] / protocol["epochs"]))
                                       for step in protocol["lr_steps"]})
    settings["lr_steps"] = [int(step) for step in settings["lr_steps"]]
    settings["lr_scaled"] = settings["lr"] * settings["batch_size"] / protocol["batch_size"]
    for key in ("segments", "epochs", "batch_size", "short_side", "crop", "test_frames", "test_crop",
                "checkpoint_every", "test_batch_size"):
        if int(settings[key]) <= 0:
            raise VclrError(f"{key} must be positive, got {settings[key]}")
    for key in ("lr", "clip_grad"):
        if not settings[key] > 0:
            raise VclrError(f"{key} must be positive, got {settings[key]}")
    if settings["backbone"] not in ALL_BACKBONES:
        raise VclrError(f"backbone: {settings['backbone']!r} not one of {', '.join(ALL_BACKBONES)}")
    clip = resolve_clip(settings["backbone"], settings["clip_frames"], settings["clip_stride"])
    if is_video_backbone(settings["backbone"]):
        settings.update(clip)
        if arch == "tsm":
            raise VclrError(f"a TSM shifts a 2D trunk; backbone {settings['backbone']!r} is 3D (use arch tsn)")
    else:  # a 2D run's settings (and records) stay as they were before clips existed
        for key in CLIP_KEYS:
            del settings[key]
    if settings["test_views"] not in TEST_VIEWS:
        raise VclrError(f"test_views: {settings['test_views']!r} not one of {', '.join(TEST_VIEWS)}")
    if settings["test_crop"] > settings["short_side"]:
        raise VclrError(f"test_crop {settings['test_crop']} is larger than short_side {settings['short_side']}")
    if arch == "tsm" and settings["test_frames"] != settings["segments"]:
        raise VclrError(f"a TSM tests clips of its {settings['segments']} segments; test_frames is "
                        f"{settings['test_frames']}")
    assert settings["augmentation"] in AUGMENTATIONS and settings["test_average"] in TEST_AVERAGES
    return settings


def step_lr(epoch: int, base_lr: float, steps, gamma: float = 0.1) -> float:
    """mmaction2's 'step' policy: base_lr * gamma ** (number of steps <= epoch)."""
    return base_lr * gamma ** sum(epoch >= step for step in steps)


def optimizer_groups(model: TSN, weight_decay: float, fc_lr5: bool) -> list[dict]:
    """SGD parameter groups with an `lr_mult` each. Without fc_lr5 (TSN): one group, every
    parameter with weight decay (mmaction2's default constructor). With fc_lr5 (TSM, mmaction2's
    TSMOptimizerConstructor): weights x1 with decay, BatchNorm parameters x1 without, fc weight x5
    with decay, fc bias x10 without (the trunk's convolutions have no bias)."""
    if not fc_lr5:
        return [{"params": list(model.parameters()), "lr_mult": 1.0, "weight_decay": weight_decay}]
    fc = {id(p) for p in model.fc.parameters()}
    norms = [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()]
    in_norm = {id(p) for p in norms}
    biases = [p for name, p in model.named_parameters()
              if name.endswith("bias") and id(p) not in fc and id(p) not in in_norm]
    weights = [p for p in model.parameters() if id(p) not in fc | in_norm | {id(b) for b in biases}]
    groups = [{"params": weights, "lr_mult": 1.0, "weight_decay": weight_decay},
              {"params": biases, "lr_mult": 2.0, "weight_decay": 0.0},
              {"params": norms, "lr_mult": 1.0, "weight_decay": 0.0},
              {"params": [model.fc.weight], "lr_mult": 5.0, "weight_decay": weight_decay},
              {"params": [model.fc.bias], "lr_mult": 10.0, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def classification_metrics(scores: np.ndarray, labels: np.ndarray, class_names: list[str]) -> tuple[dict, dict]:
    """({top1, top5, mean_class} as fractions, {class name: top-1}) of video scores [N, C]."""
    from vclr.evaluate.linear_probe import (  # imports scikit-learn: only here
        mean_class_accuracy,
        topk_accuracy,
    )

    classes = np.arange(scores.shape[1])
    predicted = np.argmax(scores, axis=1)
    per_class = {class_names[c]: float((predicted[labels == c] == c).mean()) for c in np.unique(labels)}
    return {**topk_accuracy(scores, classes, labels, (1, 5)),
            "mean_class": mean_class_accuracy(predicted, labels)}, per_class


def save_state(path: Path, *, model: TSN, optimizer, epoch: int, iteration: int, step: int, config: dict,
               generators: dict) -> None:
    """Atomic: (epoch, iteration) is the NEXT batch to consume, `step` the steps done."""
    state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "epoch": epoch, "iteration": iteration, "step": step, "config": config,
             "rng": rng_states(generators)}
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)


def load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip/pickle errors come in many types
        raise VclrError(f"{path}: not a readable checkpoint ({error})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise VclrError(f"{path}: not a fine-tuning checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    return state


def _truncate_log(log_path: Path, last_step: int) -> None:
    """Keep the log lines of steps the checkpoint holds (a killed run may have logged a few more)."""
    if log_path.exists():
        lines = [line for line in log_path.read_text(encoding="utf-8").splitlines()
                 if line.strip() and json.loads(line)["step"] <= last_step]
        atomic_write_text(log_path, "".join(line + "\n" for line in lines))


def finetune(settings: dict, index_dir: str | os.PathLike, frames_dir: str | os.PathLike,
             out_dir: str | os.PathLike, metrics_path: str | os.PathLike | None = None, *, resume: bool = True,
             profile: str | None = None, config_path: str | os.PathLike | None = None) -> dict:
    """Fine-tune on <index_dir>/<train_split>.csv, test on <test_split>.csv; returns the summary.

    `settings` from resolve_settings. With settings["max_steps"] the run stops after that many global
    steps, as if killed, after saving a checkpoint; `completed` is then False and nothing is tested.
    Under torchrun (WORLD_SIZE > 1) it joins the process group (left again on return).
    """
    with training_session(settings["batch_size"], settings["device"]):
        return _finetune(settings, Path(index_dir), Path(frames_dir), Path(out_dir), metrics_path, resume,
                         profile, config_path)


def _finetune(settings: dict, index_dir: Path, frames_dir: Path, out_dir: Path, metrics_path, resume: bool,
              profile, config_path) -> dict:
    started = time.perf_counter()
    checkpoint_path, log_path = out_dir / CHECKPOINT_NAME, out_dir / "log.jsonl"
    is_writer, processes = rank() == 0, world_size()
    device = resolve_device(settings["device"])
    bf16 = settings["bf16"] and device.type == "cuda"
    set_determinism(settings["deterministic"], device)

    class_names = read_classes(index_dir)
    train_csv = index_dir / f"{settings['train_split']}.csv"
    test_csv = index_dir / f"{settings['test_split']}.csv"
    frames = PackedFrames(frames_dir)
    train_clips = video_clips(read_split(train_csv), frames, train_csv, trimmed=settings["trimmed"])
    test_clips = video_clips(read_split(test_csv), frames, test_csv, trimmed=settings["trimmed"])
    for csv_path, clips in ((train_csv, train_clips), (test_csv, test_clips)):
        bad = sorted({clip.label for clip in clips if not 0 <= clip.label < len(class_names)})
        if bad:
            raise VclrError(f"{csv_path}: labels {bad[:5]} outside the {len(class_names)} classes of "
                            f"{index_dir / 'classes.csv'}")
    clip = {"clip_frames": settings.get("clip_frames"), "clip_stride": settings.get("clip_stride") or 1}
    train_set = FinetuneTrainDataset(train_clips, frames, train_csv, num_segments=settings["segments"],
                                     short_side=settings["short_side"], crop=settings["crop"],
                                     augmentation=settings["augmentation"], flip=settings["flip"],
                                     seed=settings["seed"], **clip)
    test_set = FinetuneTestDataset(test_clips, frames, test_csv, num_frames=settings["test_frames"],
                                   short_side=settings["short_side"], crop=settings["test_crop"],
                                   views=settings["test_views"], **clip)
    batch_size = settings["batch_size"]
    iters_per_epoch = len(train_set) // batch_size
    if iters_per_epoch == 0:
        raise VclrError(f"{train_csv}: {len(train_set)} training clips, fewer than one batch of {batch_size}")
    if is_writer:
        out_dir.mkdir(parents=True, exist_ok=True)

    # Fresh-run seeding, once; a resumed run restores every state instead.
    random.seed(settings["seed"])
    np.random.seed(settings["seed"] % 2**32)
    torch.manual_seed(settings["seed"])
    loader_generator = torch.Generator().manual_seed(settings["seed"])  # DataLoader worker base seeds
    generators = {"loader": loader_generator}
    model = build_model(settings["arch"], settings["backbone"], len(class_names), init=settings["init"],
                        dropout=settings["dropout"], n_segments=settings["segments"],
                        shift_div=settings["shift_div"], init_std=settings["init_std"], seed=settings["seed"])
    layout = memory_format(clip["clip_frames"] is not None, settings["channels_last"])
    model = model.to(device, memory_format=layout)
    optimizer = torch.optim.SGD(optimizer_groups(model, settings["weight_decay"], settings["fc_lr5"]),
                                lr=settings["lr_scaled"], momentum=settings["momentum"])
    init = settings["init"]
    config = dict(settings, data=data_fingerprint(train_csv, frames_dir),
                  init_sha256=None if init == "random" else _sha256(init))

    epoch, iteration, step = 0, 0, 0
    if resume and checkpoint_path.exists():
        state = load_state(checkpoint_path)
        changed = sorted(key for key in set(config) | set(state["config"]) if key not in RESUMABLE_CHANGES
                         and state["config"].get(key) != config.get(key))
        if changed:
            raise VclrError(f"{checkpoint_path}: saved with other settings ({', '.join(changed)}); "
                            f"use another output directory or resume with the same settings")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_states(state["rng"], generators)
        epoch, iteration, step = state["epoch"], state["iteration"], state["step"]
        if is_writer:
            _truncate_log(log_path, step)
    elif is_writer and log_path.exists():
        log_path.unlink()
    barrier()  # every process decided fresh/resume before rank 0 writes anything new

    forward = model
    if processes > 1:
        forward = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    epochs, stopped = settings["epochs"], False
    steps_this_run, last_loss = 0, None
    train_started = time.perf_counter()
    model.train()
    while epoch < epochs and not stopped:
        lr = step_lr(epoch, settings["lr_scaled"], settings["lr_steps"])
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        loader = epoch_loader(train_set, epoch=epoch, seed=settings["seed"], batch_size=batch_size,
                              world_size=processes, rank=rank(), start_iteration=iteration,
                              workers=settings["workers"], generator=loader_generator,
                              pin_memory=device.type == "cuda")
        tick = time.perf_counter()
        for clips, labels in loader:
            clips = clips.to(device, non_blocking=True)
            if settings["channels_last"]:
                clips = clips.flatten(0, 1).contiguous(memory_format=layout).view(clips.shape)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                scores = forward(clips)
            loss = F.cross_entropy(scores.float(), labels)
            if not torch.isfinite(loss):
                raise VclrError(f"step {step + 1} (epoch {epoch}, iteration {iteration}): loss is not finite; "
                                f"last good checkpoint: {checkpoint_path if checkpoint_path.exists() else 'none'}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings["clip_grad"])
            optimizer.step()
            correct = (scores.argmax(1) == labels).float().mean()
            loss, correct = mean_across_ranks(loss), mean_across_ranks(correct)
            step, iteration, steps_this_run = step + 1, iteration + 1, steps_this_run + 1
            now = time.perf_counter()
            record = {"step": step, "epoch": epoch, "iteration": iteration, "lr": lr, "loss": loss.item(),
                      "batch_top1": correct.item(), "grad_norm": float(grad_norm),
                      "videos_per_s": batch_size / max(now - tick, 1e-9)}
            tick, last_loss = now, record["loss"]
            if is_writer:
                with open(log_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
            if settings["max_steps"] is not None and step >= settings["max_steps"]:
                stopped = True
                break
        if iteration >= iters_per_epoch:
            epoch, iteration = epoch + 1, 0
        if is_writer and (stopped or epoch % settings["checkpoint_every"] == 0 or epoch == epochs):
            save_state(checkpoint_path, model=model, optimizer=optimizer, epoch=epoch, iteration=iteration,
                       step=step, config=config, generators=generators)
        barrier()
    train_seconds = time.perf_counter() - train_started

    summary = {"completed": epoch >= epochs, "steps": step, "epochs": epoch, "iterations_per_epoch": iters_per_epoch,
               "train_clips": len(train_set), "test_clips": len(test_set), "last_loss": last_loss,
               "videos_per_s": steps_this_run * batch_size / train_seconds if steps_this_run else None,
               "processes": processes, "settings": config}
    if not summary["completed"]:
        return summary

    broadcast_buffers(model)
    scores, labels = evaluate(model, test_set, settings, device, bf16)
    if is_writer:
        summary["metrics"] = _write_outputs(summary, model, scores, labels, test_set, class_names, settings,
                                            out_dir, metrics_path, index_dir, frames_dir, profile, config_path,
                                            time.perf_counter() - started)
    barrier()
    return summary


def _sha256(path) -> str:
    from vclr.evaluate.feature_files import file_sha256

    return file_sha256(path)


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics). DDP broadcasts them before
    each training forward, but the last forward leaves each process with its own update; rank 0's
    are the ones model.pt holds, so every share of the test must use them."""
    if world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


@torch.no_grad()
def evaluate(model: TSN, test_set: FinetuneTestDataset, settings: dict, device: torch.device,
             bf16: bool) -> tuple[np.ndarray, np.ndarray]:
    """(video scores [N, C] float64, labels [N]) of every test clip, in order. Each process scores
    clips rank, rank + P, ...; rank 0 gathers them (the others get empty arrays)."""
    model.eval()
    share = list(range(rank(), len(test_set), world_size()))
    loader = DataLoader(test_set, batch_size=settings["test_batch_size"], sampler=share,
                        num_workers=settings["workers"], pin_memory=device.type == "cuda")
    found: list[tuple[int, np.ndarray, int]] = []
    for views, labels, indices in loader:
        views = views.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            scores = video_scores(model, views, settings["test_average"])
        found.extend(zip(indices.tolist(), scores.double().cpu().numpy(), labels.tolist()))
    model.train()
    if world_size() > 1:
        gathered = [None] * world_size()
        dist.all_gather_object(gathered, found)
        found = [item for part in gathered for item in part]
    if rank() != 0:
        return np.zeros((0, model.num_classes)), np.zeros(0, dtype=np.int64)
    found.sort(key=lambda item: item[0])
    if [item[0] for item in found] != list(range(len(test_set))):
        raise VclrError(f"test: scored {len(found)} clips, expected each of {len(test_set)} once")
    return np.stack([item[1] for item in found]), np.array([item[2] for item in found], dtype=np.int64)


def _write_outputs(summary, model, scores, labels, test_set, class_names, settings, out_dir, metrics_path,
                   index_dir, frames_dir, profile, config_path, wall_time_s) -> dict:
    metrics, per_class = classification_metrics(scores, labels, class_names)
    save_finetuned(out_dir / "model.pt", model, arch=settings["arch"], backbone=settings["backbone"],
                   dropout=settings["dropout"], class_names=class_names,
                   extra={"dataset": settings["dataset"], "init": settings["init"],
                          **{key: settings[key] for key in CLIP_KEYS if key in settings}})
    with atomic_open(out_dir / "test_scores.npz", "wb") as handle:
        np.savez(handle, scores=scores.astype(np.float32), labels=labels,
                 video_ids=np.asarray([clip.video_id for clip in test_set.clips], dtype=str),
                 frames=np.asarray([[clip.start, clip.stop] for clip in test_set.clips], dtype=np.int64))
    summary = {**summary, "metrics": metrics}
    atomic_write_json(out_dir / "summary.json", summary)
    if metrics_path is not None:
        init = settings["init"]
        write_metrics_record(
            metrics_path, task="finetune", dataset=settings["dataset"], split=settings["test_split"],
            protocol=f"{settings['arch']}_{settings['dataset']}", metrics=metrics, seed=settings["seed"],
            profile=profile, config_path=config_path,
            checkpoint=f"random:seed={settings['seed']}" if init == "random" else init,
            index_dir=index_dir, wall_time_s=wall_time_s,
            extra={"per_class_top1": per_class, "settings": summary["settings"], "frames_dir": str(frames_dir),
                   "counts": {"train_clips": summary["train_clips"], "test_clips": summary["test_clips"],
                              "classes": len(class_names)},
                   "steps": summary["steps"], "processes": summary["processes"],
                   "published_top1": settings["published_top1"], "model": str((out_dir / "model.pt").resolve())})
    return metrics


def configure_parser(parser: argparse.ArgumentParser) -> None:
    datasets = sorted({dataset for dataset, _ in PROTOCOLS})
    parser.add_argument("--dataset", required=True, choices=datasets)
    parser.add_argument("--arch", default="tsn", choices=ARCHS, help="tsn, or tsm (ssv2 only)")
    parser.add_argument("--backbone", default="resnet50", choices=ALL_BACKBONES,
                        help="2D trunk (a frame per segment) or 3D trunk (a clip per segment; arch tsn)")
    parser.add_argument("--clip-frames", type=int, help=f"3D backbones: frames per segment clip "
                        f"(default {DEFAULT_CLIP_FRAMES})")
    parser.add_argument("--clip-stride", type=int, help=f"3D backbones: frame step inside a clip "
                        f"(default {DEFAULT_CLIP_STRIDE})")
    parser.add_argument("--init", default="random",
                        help="backbone.pt, a pretraining checkpoint_last.pt (query backbone), a torchvision "
                             "state dict, or 'random'")
    parser.add_argument("--index-dir", required=True, type=Path,
                        help="dataset index folder: <split>.csv files and classes.csv")
    parser.add_argument("--frames", required=True, type=Path, help="packed-frames directory")
    parser.add_argument("--out", required=True, type=Path,
                        help="run folder: checkpoint_last.pt, log.jsonl, model.pt, test_scores.npz, summary.json")
    parser.add_argument("--metrics", type=Path, help="metrics record (JSON) to write when the run completes")
    over = parser.add_argument_group("protocol overrides (default: the published recipe)")
    over.add_argument("--segments", type=int, help="training segments (TSM: also its test frames)")
    over.add_argument("--epochs", type=int, help="also scales the lr steps unless --lr-steps is given")
    over.add_argument("--batch-size", type=int, help="global batch; lr scales linearly from the protocol's")
    over.add_argument("--lr", type=float, help="lr at the protocol's batch size")
    over.add_argument("--lr-steps", help="comma-separated epochs where lr is multiplied by 0.1")
    over.add_argument("--short-side", type=int, help="frames are resized to this short side (protocol 256)")
    over.add_argument("--crop", type=int, help="training crop (protocol 224)")
    over.add_argument("--test-frames", type=int)
    over.add_argument("--test-views", choices=tuple(TEST_VIEWS))
    over.add_argument("--test-crop", type=int)
    over.add_argument("--dropout", type=float)
    over.add_argument("--weight-decay", type=float)
    over.add_argument("--clip-grad", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--test-batch-size", type=int, default=8, help="videos per test batch (per process)")
    parser.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--deterministic", action="store_true", help="deterministic algorithms (exact resume)")
    parser.add_argument("--max-steps", type=int, help="stop after this many global steps, saving a checkpoint")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint_last.pt")
    parser.add_argument("--profile", help="profile name recorded in the metrics (e.g. tiny, paper)")
    parser.add_argument("--config", type=Path, help="config file recorded (hashed) in the metrics")


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise VclrError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def main(args: argparse.Namespace) -> int:
    overrides = {key: getattr(args, key) for key in OVERRIDABLE if key != "lr_steps"}
    overrides["lr_steps"] = _int_list(args.lr_steps, "--lr-steps")
    run = {"backbone": args.backbone, "init": args.init, "seed": args.seed, "workers": args.workers,
           "checkpoint_every": args.checkpoint_every, "device": args.device, "bf16": not args.fp32,
           "channels_last": args.channels_last, "deterministic": args.deterministic, "max_steps": args.max_steps,
           "test_batch_size": args.test_batch_size, "clip_frames": args.clip_frames,
           "clip_stride": args.clip_stride}
    settings = resolve_settings(args.dataset, args.arch, overrides, run)
    summary = finetune(settings, args.index_dir, args.frames, args.out, args.metrics, resume=not args.no_resume,
                       profile=args.profile, config_path=args.config)
    if distributed_env()[0] != 0:  # one report per run, from the process that wrote the outputs
        return 0
    if not summary["completed"]:
        print(f"stopped (resumable): {summary['steps']} steps, last loss {summary['last_loss']}, {args.out}")
        return 0
    metrics = summary["metrics"]
    print(f"top1 {100 * metrics['top1']:.1f}  top5 {100 * metrics['top5']:.1f}  mean class "
          f"{100 * metrics['mean_class']:.1f}  ({summary['test_clips']} test clips, {summary['steps']} steps) "
          f"-> {args.metrics or args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":  # `torchrun -m vclr.train.finetune ...` works before and after CLI registration
    _parser = argparse.ArgumentParser(prog="vclr eval finetune")
    configure_parser(_parser)
    try:
        raise SystemExit(main(_parser.parse_args()))
    except VclrError as error:
        print(f"vclr eval finetune: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
