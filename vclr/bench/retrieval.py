"""`vclr bench retrieval` (UCF101-sized retrieval) and the linear-probe cost on Kinetics-sized features.

Retrieval: 3,783 test queries against 9,537 train videos of 2048-d features (UCF101 split 1), ours
(vclr.evaluate.retrieval: torch matmul on L2-normalised features, chunked, top-50 per query) against
a plain scikit-learn baseline doing the same job (sklearn.metrics.pairwise.cosine_distances, then a
stable argsort per query), the two alternating round by round in one process; both must return the
same top-k lists. Linear probe: LinearSVC(dual=False) fit time on Kinetics-400-shaped problems
scaled down (see bench_linear_probe), extrapolated to 240k x 2048 features of 400 classes.
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


def bench_linear_probe(widths: list[int], dim: int, classes: int, target: int, seed: int,
                       timed_classes: int = 4) -> dict:
    """Fit time of the paper's probe (LinearSVC(dual=False): liblinear's primal L2-loss SVM, one
    binary problem per class, one vs rest) on `target` x `dim` features of `classes` clustered
    classes, estimated from scaled runs.

    The scaled runs keep Kinetics-400's SHAPE: d in `widths` features and n = target * d / dim rows
    (117 rows per feature for 240k x 2048). Fewer rows at full width would not do: liblinear's Newton
    solver then stops at its iteration cap (measured: n 500 to 16,000 at d 2,048 all ran 1,000
    iterations), timing the cap rather than a problem shaped like the real one.
    A Newton step is a few passes over the n x d data, so the time per class is fitted as a power law
    in n * d and extrapolated to target * dim; liblinear solves the classes one after another, so the
    fit is `classes` x the mean of `timed_classes` timed problems. Iterations are reported per point
    (they should not grow with the scale for the extrapolation to hold)."""
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(seed)
    measured = []
    for width in widths:
        n = round(target * width / dim)
        features, labels = clustered_features(rng, n, width, classes)
        seconds, iterations = [], []
        for label in np.unique(labels)[:timed_classes]:
            started = time.perf_counter()
            iterations.append(int(LinearSVC(C=1.0, dual=False).fit(features, labels == label).n_iter_))
            seconds.append(time.perf_counter() - started)
        measured.append({"d": width, "n": n, "seconds_per_class": statistics.mean(seconds),
                         "seconds_all_classes": statistics.mean(seconds) * classes, "iterations": iterations})
    size = np.log([m["n"] * m["d"] for m in measured])
    slope, intercept = np.polyfit(size, np.log([m["seconds_all_classes"] for m in measured]), 1)
    estimate = float(np.exp(intercept) * (target * dim) ** slope)
    return {"dim": dim, "classes": classes, "timed_classes": min(timed_classes, classes), "measured": measured,
            "exponent_in_nd": float(slope), "target_n": target, "estimated_seconds": estimate}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queries", type=int, default=3783, help="test videos (UCF101 split 1: 3,783)")
    parser.add_argument("--gallery", type=int, default=9537, help="train videos (UCF101 split 1: 9,537)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--probe-widths", default="",
                        help="feature widths of the scaled linear-probe runs (each with Kinetics' rows per "
                             "feature), comma-separated, e.g. 64,128,256,512 (default: skipped)")
    parser.add_argument("--probe-timed-classes", type=int, default=4,
                        help="binary one-vs-rest problems timed per run (the fit time is classes x their mean)")
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
    widths = [int(d) for d in args.probe_widths.split(",") if d.strip()]
    if widths:
        results["linear_probe"] = p = bench_linear_probe(widths, args.dim, 400, args.probe_target, args.seed,
                                                           args.probe_timed_classes)
        points = ", ".join(f"{m['n']} x {m['d']}: {m['seconds_all_classes']:.0f} s ({m['iterations']} iterations)"
                           for m in p["measured"])
        print(f"linear probe LinearSVC(dual=False), 400 classes, one class after another: {points}; "
              f"time ~ (n d)^{p['exponent_in_nd']:.2f} -> ~{p['estimated_seconds'] / 3600:.1f} h for "
              f"{p['target_n']} x {p['dim']}")
    if args.out_json:
        atomic_write_json(args.out_json, results)
    return 0
