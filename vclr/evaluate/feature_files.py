"""Feature files (.npz with provenance): written by vclr.evaluate.features, read by retrieval, the
linear probe, the report and localisation. numpy only: the evaluations that only read features do
not pay for importing torch/torchvision's model code (a pipeline job's start-up, docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vclr.errors import VclrError
from vclr.io_utils import atomic_open

FEATURES_FORMAT = "vclr-features/1"


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def save_features(path: str | os.PathLike, features: np.ndarray, video_ids: Sequence[str], labels: np.ndarray,
                  provenance: dict) -> None:
    """One .npz: features [N,D] float32, video_ids [N] str, labels [N] int64, provenance (JSON string)."""
    with atomic_open(path, "wb") as handle:
        np.savez(handle, features=np.asarray(features, dtype=np.float32),
                 video_ids=np.asarray(list(video_ids), dtype=str), labels=np.asarray(labels, dtype=np.int64),
                 provenance=np.asarray(json.dumps({"format": FEATURES_FORMAT, **provenance})))


def load_npz_with_provenance(path: str | os.PathLike, arrays: Sequence[str], kind: str,
                             file_format: str) -> tuple[dict, dict]:
    """(arrays, provenance) of one of our .npz files: `arrays` present, a JSON provenance whose format is
    `file_format`; VclrError naming the file (and `kind`, e.g. "features file") otherwise."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            loaded = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise VclrError(f"{path}: {kind} not found") from None
    except (ValueError, OSError) as error:
        raise VclrError(f"{path}: not a readable .npz ({error})") from None
    missing = [key for key in (*arrays, "provenance") if key not in loaded]
    if missing:
        raise VclrError(f"{path}: not a {kind} (missing arrays: {', '.join(missing)})")
    try:
        provenance = json.loads(str(loaded["provenance"]))
    except ValueError:
        raise VclrError(f"{path}: key 'provenance' is not JSON") from None
    if not isinstance(provenance, dict) or provenance.get("format") != file_format:
        raise VclrError(f"{path}: key 'provenance': format {file_format!r} expected")
    return loaded, provenance


def load_features(path: str | os.PathLike) -> dict:
    """{features, video_ids, labels, provenance}; VclrError naming the file if it is not ours or its
    arrays are out of step."""
    path = Path(path)
    loaded, provenance = load_npz_with_provenance(path, ("features", "video_ids", "labels"), "features file",
                                                  FEATURES_FORMAT)
    features, video_ids, labels = loaded["features"], loaded["video_ids"], loaded["labels"]
    if features.ndim != 2 or video_ids.ndim != 1 or labels.ndim != 1 or not (
            len(features) == len(video_ids) == len(labels)):
        raise VclrError(f"{path}: arrays out of step: features {features.shape}, video_ids {video_ids.shape}, "
                        f"labels {labels.shape}")
    if len(set(video_ids.tolist())) != len(video_ids):
        raise VclrError(f"{path}: key 'video_ids' repeats a video")
    return {"features": features.astype(np.float32), "video_ids": [str(v) for v in video_ids],
            "labels": labels.astype(np.int64), "provenance": provenance}


def load_feature_pair(train_path: str | os.PathLike, test_path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(train, test, class names by label) of two feature files that must come from the same
    backbone and extraction settings (a VclrError names both files and the differing key)."""
    train, test = load_features(train_path), load_features(test_path)
    for field in ("backbone", "checkpoint_sha256", "checkpoint", "num_frames", "crop", "crops", "clip_frames",
                  "clip_stride"):
        if train["provenance"].get(field) != test["provenance"].get(field):
            raise VclrError(f"{train_path} and {test_path}: provenance key {field!r} differs "
                            f"({train['provenance'].get(field)!r} vs {test['provenance'].get(field)!r}); "
                            f"both splits must come from the same backbone and extraction")
    names = {int(k): v for source in (train, test)
             for k, v in source["provenance"].get("class_names", {}).items()}
    return train, test, names


def check_labelled_splits(train_features, train_labels, test_features, test_labels,
                          class_names: dict[int, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Both splits non-empty, labelled, features and labels in step, and every test class present
    in the train split (else no evaluation can get it right); returns the labels as arrays."""
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    for split, features, labels in (("train", train_features, train_labels),
                                    ("test", test_features, test_labels)):
        if len(features) == 0:
            raise VclrError(f"{split} split is empty: no videos to evaluate")
        if len(features) != len(labels):
            raise VclrError(f"{split}: features ({len(features)}) and labels ({len(labels)}) out of step")
        if (labels < 0).any():
            raise VclrError(f"{split}: {int((labels < 0).sum())} videos without a label (-1)")
    names = class_names or {}
    absent = sorted(set(test_labels.tolist()) - set(train_labels.tolist()))
    if absent:
        listed = ", ".join(f"{names.get(label, '?')!r} (label {label})" for label in absent)
        raise VclrError(f"test classes missing from the train split: {listed}")
    return train_labels, test_labels
