"""Linear probe: the liblinear primal SVM, top-k and mean class accuracy on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.svm import LinearSVC

from vclr import cli
from vclr.errors import VclrError
from vclr.evaluate.feature_files import file_sha256, save_features
from vclr.evaluate.linear_probe import (
    evaluate_files,
    linear_probe_metrics,
    mean_class_accuracy,
    topk_accuracy,
)
from vclr.evaluate.record import PACKAGE_DIR


def test_topk_accuracy_hand_computed_with_ties():
    classes = np.array([0, 1, 2])
    scores = np.array([[0.9, 0.5, 0.1],    # label 1: 2nd -> top1 miss, top2 hit
                       [0.2, 0.2, 0.7],    # label 1: tie with 0 at 0.2, 0 first (class order) -> 3rd
                       [0.1, 0.3, 0.2]])   # label 1: 1st
    labels = np.array([1, 1, 1])
    assert topk_accuracy(scores, classes, labels, ks=(1, 2, 3)) == {"top1": 1 / 3, "top2": 2 / 3, "top3": 1.0}
    assert topk_accuracy(scores, classes, labels, ks=(5,)) == {"top5": 1.0}  # k beyond the classes


def test_mean_class_accuracy_weighs_classes_equally():
    labels = np.array([0, 0, 0, 0, 1])
    predicted = np.array([0, 0, 0, 0, 0])  # 80% overall, but class 1 is always wrong
    assert mean_class_accuracy(predicted, labels) == pytest.approx(0.5)


def _blobs(rng, n_per_class, centres):
    features = np.concatenate([rng.normal(c, 0.3, size=(n_per_class, len(c))) for c in centres])
    labels = np.repeat(np.arange(len(centres)), n_per_class)
    return features.astype(np.float32), labels


def test_separable_classes_are_learned_with_the_liblinear_primal_solver():
    rng = np.random.default_rng(0)
    centres = np.eye(4) * 4
    train, train_labels = _blobs(rng, 20, centres)
    test, test_labels = _blobs(rng, 10, centres)
    metrics = linear_probe_metrics(train, train_labels, test, test_labels)
    assert metrics["accuracy"]["top1"] == 1.0 and metrics["accuracy"]["mean_class"] == 1.0
    assert metrics["counts"] == {"train": 80, "test": 40, "classes": 4}
    # the same predictions as scikit-learn's primal liblinear solver called directly
    reference = LinearSVC(C=1.0, dual=False).fit(train, train_labels).predict(test)
    assert (reference == test_labels).mean() == metrics["accuracy"]["top1"]
    # shuffled labels carry no signal: far from perfect
    shuffled = linear_probe_metrics(train, rng.permutation(train_labels), test, test_labels)
    assert shuffled["accuracy"]["top1"] < 0.6


def test_parallel_one_vs_rest_is_the_same_model():
    """--jobs N solves liblinear's one-vs-rest problems in parallel: the same scores, so the same metrics."""
    from sklearn.multiclass import OneVsRestClassifier

    rng = np.random.default_rng(3)
    centres = np.eye(6) * 0.3  # overlapping classes: the metrics are not trivially perfect
    train, train_labels = _blobs(rng, 30, centres)
    test, test_labels = _blobs(rng, 20, centres)
    one = LinearSVC(C=1.0, dual=False).fit(train, train_labels).decision_function(test)
    parallel = OneVsRestClassifier(LinearSVC(C=1.0, dual=False), n_jobs=2).fit(train, train_labels)
    np.testing.assert_allclose(parallel.decision_function(test), one, rtol=1e-5, atol=1e-6)
    serial, split = (linear_probe_metrics(train, train_labels, test, test_labels, jobs=jobs) for jobs in (1, 2))
    assert serial["accuracy"] == split["accuracy"] and 0.3 < serial["accuracy"]["top1"] < 1.0
    assert split["classifier"]["jobs"] == 2


def test_two_classes_and_bad_input():
    rng = np.random.default_rng(1)
    train, train_labels = _blobs(rng, 10, np.eye(2) * 4)
    metrics = linear_probe_metrics(train, train_labels, train, train_labels)
    assert metrics["accuracy"]["top1"] == 1.0 and metrics["accuracy"]["top5"] == 1.0
    with pytest.raises(VclrError, match="out of step"):
        linear_probe_metrics(train, train_labels[:-1], train, train_labels)
    with pytest.raises(VclrError, match="test classes missing from the train split: 'kick' \\(label 2\\)"):
        linear_probe_metrics(train, train_labels, train[:1], np.array([2]), class_names={2: "kick"})
    with pytest.raises(VclrError, match="train split is empty"):
        linear_probe_metrics(train[:0], train_labels[:0], train, train_labels)
    with pytest.raises(VclrError, match="at least two classes"):
        linear_probe_metrics(train[:5], np.zeros(5, dtype=int), train[:2], np.zeros(2, dtype=int))


def test_cli_writes_metrics_record(tmp_path):
    from vclr.config import config_hash, load_config
    from vclr.evaluate.record import dvc_file_md5, read_metrics_record

    rng = np.random.default_rng(2)
    train, train_labels = _blobs(rng, 10, np.eye(3) * 4)
    test, test_labels = _blobs(rng, 5, np.eye(3) * 4)
    index = tmp_path / "index"
    index.mkdir()
    (index / "summary.json").write_text('{"dataset": "k400"}')
    for split in ("train", "val"):
        (index / f"{split}.csv").write_text("video_id\n")
    checkpoint = tmp_path / "backbone.pt"
    checkpoint.write_bytes(b"weights")
    provenance = {"format": "vclr-features/1", "backbone": "resnet_tiny", "checkpoint": str(checkpoint),
                  "checkpoint_sha256": file_sha256(checkpoint), "num_frames": 30, "crop": 224}
    save_features(tmp_path / "train.npz", train, [f"a{i}" for i in range(30)], train_labels,
                  {**provenance, "index": str(index / "train.csv")})
    save_features(tmp_path / "test.npz", test, [f"b{i}" for i in range(15)], test_labels,
                  {**provenance, "index": str(index / "val.csv")})
    out = tmp_path / "probe.json"
    config = PACKAGE_DIR.parent / "config" / "config.yaml"
    argv = ["eval", "linear-probe", "--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz"),
            "--out", str(out), "--config", str(config)]
    assert cli.main(argv) == 0
    record = read_metrics_record(out)
    assert record["metrics"]["accuracy"]["top1"] == 1.0 and record["metrics"]["classifier"]["C"] == 1.0
    assert (record["task"], record["dataset"], record["split"], record["protocol"]) == (
        "linear_probe", "k400", "val", "svm_30frames")
    loaded = load_config(config)
    assert (record["seed"], record["profile"], record["config"]["hash"]) == (
        loaded["seed"], loaded["profile"], config_hash(loaded))
    assert record["checkpoint"]["dvc_md5"] == dvc_file_md5(checkpoint)
    assert record["extra"]["train"]["backbone"] == "resnet_tiny"
    assert cli.main(argv[:-2] + ["--C", "0"]) == 2
    assert cli.main(argv + ["--profile", "paper"]) == 2  # the config is the tiny profile
    checkpoint.write_bytes(b"retrained")  # the features no longer match the checkpoint
    with pytest.raises(VclrError, match="changed since these features were extracted"):
        evaluate_files(tmp_path / "train.npz", tmp_path / "test.npz", out)
