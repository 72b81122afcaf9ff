"""Collect the metrics records of the evaluation jobs into one tidy frame (one row per number).

Each row keeps what makes the number citable (DESIGN.md, "Records that make a number citable"): the
metrics file (relative to the checkout), git commit, DVC md5 of the checkpoint and of the data
index, config hash and hardware. Values are in percent: records store retrieval recalls and
accuracies as fractions, localisation AR/AUC already in percent. A missing record gives "not run"
rows (the report still builds); a record of another profile or config is refused, never mixed in.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import pandas as pd

from vclr.errors import VclrError
from vclr.evaluate.record import read_metrics_record

# The numbers each evaluation task reports, in table order. Finetune's mean_class is optional.
TASK_METRICS = {
    "retrieval": ("R@1", "R@5", "R@10", "R@20", "R@50"),
    "linear_probe": ("top1", "top5"),
    "finetune": ("top1", "top5", "mean_class"),
    "localize": ("AR@1", "AR@5", "AR@10", "AR@100", "AUC"),
}
EVALUATION_STAGES = tuple(TASK_METRICS)
META_KEYS = ("task", "dataset", "arch", "backbone", "run", "seed", "pretrain_dataset", "pretrain_epochs",
             "ablation", "reference")
COLUMNS = ("job", "task", "dataset", "arch", "backbone", "run", "seed", "pretrain_dataset", "pretrain_epochs",
           "ablation_axis", "ablation_label", "reference", "protocol", "split", "metric", "value",
           "metrics_file", "commit", "dirty", "checkpoint_md5", "index_md5", "config_hash", "hardware",
           "status")


def record_values(record: dict, path: Path) -> dict[str, float]:
    """{metric: value in percent} of a record, in TASK_METRICS order (only the metrics it has)."""
    task, metrics = record["task"], record["metrics"]
    if task == "retrieval":
        holder, scale = metrics.get("recall"), 100.0
    elif task == "linear_probe":
        holder, scale = metrics.get("accuracy"), 100.0
    elif task == "finetune":
        holder, scale = metrics, 100.0
    elif task == "localize":
        holder, scale = metrics, 1.0  # localization.py writes AR@N and AUC in percent
    else:
        raise VclrError(f"{path}: task {task!r} is not an evaluation task ({', '.join(TASK_METRICS)})")
    if not isinstance(holder, dict):
        raise VclrError(f"{path}: the {task} record has no metric values where they belong")
    values = {}
    for name in TASK_METRICS[task]:
        if name not in holder:
            continue
        value = holder[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise VclrError(f"{path}: metric {name!r} is not a finite number: {value!r}")
        values[name] = float(value) * scale
    if not values:
        raise VclrError(f"{path}: the {task} record holds none of the metrics {', '.join(TASK_METRICS[task])}")
    return values


def hardware_summary(hardware: dict) -> str:
    """A short hardware string: the GPUs ("2x NVIDIA H100 80GB HBM3") or else the CPU model."""
    gpus = hardware.get("gpus") or []
    if gpus:
        return ", ".join(f"{count}x {name}" for name, count in sorted(Counter(gpus).items()))
    return str(hardware.get("cpu_model") or "unknown CPU")


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _meta(job) -> dict:
    meta = getattr(job, "meta", None)
    if not isinstance(meta, dict):
        raise VclrError(f"job {job.name}: no meta mapping (the report needs task, dataset, run, seed, ...)")
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise VclrError(f"job {job.name}: meta lacks {', '.join(missing)}")
    if meta["task"] not in TASK_METRICS:
        raise VclrError(f"job {job.name}: meta task {meta['task']!r} is not one of {', '.join(TASK_METRICS)}")
    if len(job.metrics_files) != 1:
        raise VclrError(f"job {job.name}: an evaluation job writes one metrics file, got {len(job.metrics_files)}")
    return meta


def collect_results(jobs, root: str | os.PathLike, profile: str, config_hash: str | None) -> pd.DataFrame:
    """One row per (evaluation job, metric) with COLUMNS, in job order.

    `jobs`: anything with name, stage, metrics_files and meta (vclr.matrix.Job); jobs of other stages
    are skipped. metrics_files are relative to `root` (the checkout). A record whose profile or config
    hash differs from `profile` / `config_hash`, or whose task or dataset is not its job's, is an
    error naming the file; a missing record gives rows with status "not run" and NaN values.
    """
    root = Path(root)
    rows = []
    for job in jobs:
        if job.stage not in EVALUATION_STAGES:
            continue
        meta = _meta(job)
        path = root / job.metrics_files[0]
        ablation = meta["ablation"] or {}
        base = {
            "job": job.name, **{key: meta[key] for key in META_KEYS if key not in ("ablation", "reference")},
            "ablation_axis": ablation.get("axis"), "ablation_label": ablation.get("label"),
            "reference": bool(meta["reference"]), "metrics_file": _relative(path, root),
        }
        if not path.is_file():
            rows.extend({**base, "metric": name, "value": math.nan, "status": "not run"}
                        for name in TASK_METRICS[meta["task"]] if name != "mean_class")
            continue
        record = read_metrics_record(path)
        if record["profile"] != profile:
            raise VclrError(f"{path}: profile {record['profile']!r}, but this report is for profile "
                            f"{profile!r} (records of two profiles are never mixed)")
        if record["config"]["hash"] != config_hash:
            raise VclrError(f"{path}: config hash {record['config']['hash']!r}, but this report's config hash "
                            f"is {config_hash!r} (rerun the evaluation with this config)")
        for key in ("task", "dataset"):
            if record[key] != meta[key]:
                raise VclrError(f"{path}: {key} {record[key]!r}, but job {job.name} is {key} {meta[key]!r}")
        provenance = {
            "protocol": record["protocol"], "split": record["split"], "commit": record["code"]["commit"],
            "dirty": record["code"]["dirty"], "checkpoint_md5": record["checkpoint"]["dvc_md5"],
            "index_md5": record["data_index"]["dvc_md5"], "config_hash": record["config"]["hash"],
            "hardware": hardware_summary(record["hardware"]), "status": "ok",
        }
        rows.extend({**base, **provenance, "metric": name, "value": value}
                    for name, value in record_values(record, path).items())
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame.astype({"value": float, "reference": bool})
