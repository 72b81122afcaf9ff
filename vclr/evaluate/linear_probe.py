"""Linear probe: an L2-regularised L2-loss linear SVM in the primal, C = 1 (liblinear `-s 2`, the
paper's solver: scikit-learn's LinearSVC(dual=False)), trained on frozen train-split features and
scored on the test split: top-1, top-5 and mean class accuracy.

Top-k ranks the one-vs-rest decision values; equal values keep the classifier's class order (stable
sort), so the result never depends on the sort algorithm. The metrics go into a metrics record
(vclr.evaluate.record).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.svm import LinearSVC

from vclr.errors import VclrError
from vclr.evaluate.feature_files import check_labelled_splits
from vclr.evaluate.record import (
    add_provenance_arguments,
    identity_from_args,
    write_feature_evaluation,
)

TOPK = (1, 5)


def topk_accuracy(scores: np.ndarray, classes: np.ndarray, labels: np.ndarray, ks: Sequence[int] = TOPK) -> dict:
    """{"top{k}": fraction of rows whose label is among the k highest-scoring classes}."""
    ranked = classes[np.argsort(-scores, axis=1, kind="stable")]
    hits = ranked == labels[:, None]
    return {f"top{k}": float(hits[:, : min(k, ranked.shape[1])].any(axis=1).mean()) for k in ks}


def mean_class_accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy averaged over the classes present in `labels` (each class weighs the same)."""
    return float(np.mean([(predicted[labels == c] == c).mean() for c in np.unique(labels)]))


def linear_probe_metrics(train_features: np.ndarray, train_labels, test_features: np.ndarray, test_labels,
                         C: float = 1.0, class_names: dict[int, str] | None = None, jobs: int = 1) -> dict:
    """`jobs` > 1 solves the one-vs-rest problems in parallel processes: the same binary problems
    liblinear solves one after another (the same model; Kinetics-sized, ~150 CPU-hours in one
    process, docs/benchmarks.md)."""
    train_labels, test_labels = check_labelled_splits(train_features, train_labels, test_features,
                                                      test_labels, class_names)
    if len(np.unique(train_labels)) < 2:
        raise VclrError("train split: a linear classifier needs at least two classes")
    started = time.perf_counter()
    classifier = LinearSVC(C=C, dual=False)  # liblinear's primal L2-regularised L2-loss SVM
    if jobs > 1 and len(np.unique(train_labels)) > 2:
        from sklearn.multiclass import OneVsRestClassifier

        classifier = OneVsRestClassifier(classifier, n_jobs=jobs)
    classifier.fit(train_features, train_labels)
    fit_seconds = time.perf_counter() - started
    scores = classifier.decision_function(test_features)
    if scores.ndim == 1:  # two classes: one decision value, positive for classes_[1]
        scores = np.stack([-scores, scores], axis=1)
    predicted = classifier.classes_[np.argmax(scores, axis=1)]
    return {
        "accuracy": {**topk_accuracy(scores, classifier.classes_, test_labels),
                     "mean_class": mean_class_accuracy(predicted, test_labels)},
        "classifier": {"kind": "LinearSVC(dual=False)", "C": C, "solver": "liblinear -s 2",
                       "fit_seconds": fit_seconds, "jobs": jobs},
        "counts": {"train": len(train_labels), "test": len(test_labels),
                   "classes": len(classifier.classes_)},
    }


def evaluate_files(train_path: str | os.PathLike, test_path: str | os.PathLike, out: str | os.PathLike,
                   C: float = 1.0, protocol: str | None = None, jobs: int = 1, **identity) -> dict:
    """Probe metrics of two feature files, written to `out` as a metrics record (its `metrics` hold
    accuracy, classifier, counts; extra.train / extra.test the two files' provenance); returns it.
    The protocol defaults to svm_<num_frames>frames (the name in spec/reference_results.csv);
    `identity`: config_path, seed, profile, dataset, split (record.write_feature_evaluation)."""
    return write_feature_evaluation(
        train_path, test_path, out,
        lambda *splits: linear_probe_metrics(*splits[:4], C=C, class_names=splits[4], jobs=jobs), task="linear_probe",
        protocol=protocol or (lambda provenance: f"svm_{provenance.get('num_frames', 'unknown')}frames"),
        **identity)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", required=True, type=Path, help="train-split features (.npz, vclr eval features)")
    parser.add_argument("--test", required=True, type=Path, help="evaluation-split features (.npz)")
    parser.add_argument("--out", required=True, type=Path, help="metrics JSON to write")
    parser.add_argument("--C", type=float, default=1.0, help="SVM regularisation (the paper: 1.0)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes solving the one-vs-rest problems in parallel (the same model)")
    add_provenance_arguments(parser, "protocol name for the record (default svm_<num_frames>frames, "
                                     "the paper's: svm_30frames)")


def main(args: argparse.Namespace) -> int:
    if args.C <= 0:
        raise VclrError(f"--C must be positive, got {args.C}")
    if args.jobs < 1:
        raise VclrError(f"--jobs must be >= 1, got {args.jobs}")
    metrics = evaluate_files(args.train, args.test, args.out, args.C, jobs=args.jobs,
                             **identity_from_args(args))["metrics"]
    accuracy = metrics["accuracy"]
    print(f"top1 {100 * accuracy['top1']:.1f}  top5 {100 * accuracy['top5']:.1f}  "
          f"mean class {100 * accuracy['mean_class']:.1f}  ({metrics['counts']['train']} train, "
          f"{metrics['counts']['test']} test) -> {args.out}")
    return 0
