"""`vclr bench retrieval` (UCF101-sized retrieval) and the linear-probe cost on Kinetics-sized features.

Retrieval: 3,783 test queries against 9,537 train videos of 2048-d features (UCF101 split 1), ours
(vclr.evaluate.retrieval: torch matmul on L2-normalised features, chunked, top-50 per query) against
a plain scikit-learn baseline doing the same job (sklearn.metrics.pairwise.cosine_distances, then a
stable argsort per query), the two alternating round by round in one process; both must return the
same top-k lists. Linear probe: LinearSVC(dual=False) fit time on n x 2048 features of 400 classes
for a few growing n, extrapolated (power law fitted on the measured points) to Kinetics-400's
~240k training videos.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from vclr.evaluate.retrieval import KS, nearest_gallery
from vclr.io_utils import atomic_write_json


def sklearn_top_k(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    from sklearn.metrics.pairwise import cosine_distances

    distances = cosine_distances(queries, gallery)
    return np.argsort(distances, axis=1, kind="stable")[:, :k]


def clustered_features(rng: np.random.Generator, n: int, dim: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Features with class structure (centre + noise), like a trained backbone's, not pure noise."""
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, size=n)
    return (centres[labels] + 2.0 * rng.normal(size=(n, dim)).astype(np.float32)), labels


def bench_retrieval(queries: int, gallery: int, dim: int, rounds: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    train, _ = clustered_features(rng, gallery, dim, 101)
    test, _ = clustered_features(rng, queries, dim, 101)
    k = max(KS)
    times: dict[str, list[float]] = {"ours": [], "sklearn": []}
    ours = theirs = None
    for round_index in range(rounds):
        order = ("ours", "sklearn") if round_index % 2 == 0 else ("sklearn", "ours")
        for side in order:
            started = time.perf_counter()
            if side == "ours":
                ours = nearest_gallery(test, train, k)
            else:
                theirs = sklearn_top_k(test, train, k)
            times[side].append(time.perf_counter() - started)
    agree = float((ours == theirs).mean())
    median = {side: statistics.median(values) for side, values in times.items()}
    return {"queries": queries, "gallery": gallery, "dim": dim, "k": k, "rounds": rounds,
            "seconds": times, "median_seconds": median,
            "speedup": median["sklearn"] / median["ours"], "top_k_agreement": agree}


def bench_linear_probe(sizes: list[int], dim: int, classes: int, target: int, seed: int,
                       timed_classes: int = 4) -> dict:
    """Fit time of the paper's probe (LinearSVC(dual=False): liblinear's primal L2-loss SVM, one
    binary problem per class, one vs rest) on n x dim features of `classes` clustered classes,
    extrapolated to n = `target`. liblinear solves the classes one after another, each on all n
    rows, so the fit time is `classes` x the time of one binary problem: `timed_classes` of them are
    timed per size (their mean, times `classes`), which keeps the scaled runs minutes, not hours."""
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(seed)
    measured = []
    for n in sizes:
        features, labels = clustered_features(rng, n, dim, classes)
        per_class = []
        for label in np.unique(labels)[:timed_classes]:  # classes with samples (small n may miss some)
            started = time.perf_counter()
            LinearSVC(C=1.0, dual=False).fit(features, labels == label)
            per_class.append(time.perf_counter() - started)
        measured.append((n, statistics.mean(per_class) * classes))
    # fit seconds ~ a * n^b on the measured points (log-log least squares), then extrapolate
    logs = np.log(np.array(measured))
    slope, intercept = np.polyfit(logs[:, 0], logs[:, 1], 1)
    estimate = float(np.exp(intercept) * target ** slope)
    return {"dim": dim, "classes": classes, "timed_classes": min(timed_classes, classes),
            "measured": [{"n": n, "seconds_all_classes": s} for n, s in measured],
            "exponent": float(slope), "target_n": target, "estimated_seconds": estimate}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queries", type=int, default=3783, help="test videos (UCF101 split 1: 3,783)")
    parser.add_argument("--gallery", type=int, default=9537, help="train videos (UCF101 split 1: 9,537)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--probe-sizes", default="",
                        help="train sizes of the scaled linear-probe runs, comma-separated, e.g. "
                             "2000,4000,8000,16000 (default: skipped)")
    parser.add_argument("--probe-timed-classes", type=int, default=4,
                        help="binary one-vs-rest problems timed per size (the fit time is classes x their mean)")
    parser.add_argument("--probe-target", type=int, default=240000, help="Kinetics-400 train videos")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", type=Path)


def main(args: argparse.Namespace) -> int:
    results = {"machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
               "retrieval": bench_retrieval(args.queries, args.gallery, args.dim, args.rounds, args.seed)}
    r = results["retrieval"]
    print(f"retrieval {r['queries']} x {r['gallery']} x {r['dim']}: ours {r['median_seconds']['ours']:.2f} s, "
          f"scikit-learn {r['median_seconds']['sklearn']:.2f} s (median of {r['rounds']}), "
          f"speed-up {r['speedup']:.1f}x, identical top-{r['k']} lists: {100 * r['top_k_agreement']:.2f}%")
    sizes = [int(n) for n in args.probe_sizes.split(",") if n.strip()]
    if sizes:
        results["linear_probe"] = p = bench_linear_probe(sizes, args.dim, 400, args.probe_target, args.seed,
                                                           args.probe_timed_classes)
        points = ", ".join(f"{m['n']}: {m['seconds_all_classes']:.0f} s" for m in p["measured"])
        print(f"linear probe LinearSVC(dual=False), {args.dim}-d, 400 classes: {points}; "
              f"time ~ n^{p['exponent']:.2f} -> ~{p['estimated_seconds'] / 3600:.1f} h for n = {p['target_n']}")
    if args.out_json:
        atomic_write_json(args.out_json, results)
    return 0
