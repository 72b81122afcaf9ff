"""Nearest-neighbour video retrieval: test videos query the train videos by cosine similarity.

R@k is the fraction of queries whose k nearest gallery videos hold at least one video of the query's
class; k in (1, 5, 10, 20, 50), plus R@1 per class. Ties in similarity are broken by gallery position
(the earlier train video ranks first, a stable sort), so the result never depends on the sort
algorithm or on how the queries were chunked. A k larger than the gallery is clamped to its size
(reported as `k_effective`). The metrics go into a metrics record (vclr.evaluate.record).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vclr.errors import VclrError
from vclr.evaluate.feature_files import check_labelled_splits
from vclr.evaluate.record import (
    add_provenance_arguments,
    identity_from_args,
    write_feature_evaluation,
)

KS = (1, 5, 10, 20, 50)
PROTOCOL = "knn_cosine"  # the name in spec/reference_results.csv is knn_cosine_split<N>: pass --protocol


def nearest_gallery(queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor, k: int,
                    chunk_size: int = 1024, device: str | torch.device = "cpu") -> np.ndarray:
    """[Q, min(k, G)] gallery indices, most similar first (cosine; ties: lower gallery index first).

    Queries are processed `chunk_size` at a time, so only a [chunk_size, G] similarity block is ever
    held (UCF101: 9,537 train x 3,783 test x 2048-d fits in a few hundred MB).
    """
    queries = torch.as_tensor(queries, dtype=torch.float32, device=device)
    gallery = torch.as_tensor(gallery, dtype=torch.float32, device=device)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise VclrError(f"feature shapes do not match: queries {tuple(queries.shape)}, "
                        f"gallery {tuple(gallery.shape)}")
    k = min(k, gallery.shape[0])
    queries = torch.nn.functional.normalize(queries, dim=1)
    gallery = torch.nn.functional.normalize(gallery, dim=1)
    ranked = []
    for start in range(0, queries.shape[0], chunk_size):
        similarity = queries[start:start + chunk_size] @ gallery.T
        ranked.append(_top_k_stable(similarity, k).cpu())
    return torch.cat(ranked).numpy()


TIE_MARGIN = 64


def _top_k_stable(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """The k most similar gallery indices per row, equal similarities in gallery order.

    torch.topk is fast but makes no promise about ties, so it only picks candidates: k + TIE_MARGIN
    of them, put back in gallery order and then stably sorted by similarity. That is exact unless a
    tie crosses the candidates' boundary (the last candidate equals the k-th value); such a block
    falls back to a full stable sort.
    """
    candidates = min(similarity.shape[1], k + TIE_MARGIN)
    values, indices = torch.topk(similarity, candidates, dim=1)
    if candidates < similarity.shape[1] and bool((values[:, -1] == values[:, k - 1]).any()):
        return torch.sort(-similarity, dim=1, stable=True).indices[:, :k]
    indices = torch.sort(indices, dim=1).values  # gallery order first ...
    values = torch.gather(similarity, 1, indices)
    order = torch.sort(-values, dim=1, stable=True).indices  # ... so a stable sort keeps it in ties
    return torch.gather(indices, 1, order)[:, :k]


def retrieval_metrics(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                      test_labels: np.ndarray, ks: Sequence[int] = KS, chunk_size: int = 1024,
                      class_names: dict[int, str] | None = None, device: str | torch.device = "cpu") -> dict:
    """{"recall": {"R@k": value}, "k_effective", "per_class_r1": {name: value}, "counts"}."""
    train_labels, test_labels = check_labelled_splits(train_features, train_labels, test_features,
                                                      test_labels, class_names)
    names = class_names or {}
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise VclrError(f"k values must be positive, got {ks}")
    ranked = nearest_gallery(test_features, train_features, max(ks), chunk_size, device)
    matches = train_labels[ranked] == test_labels[:, None]  # [Q, kmax]
    hit_by = np.logical_or.accumulate(matches, axis=1)  # hit_by[q, j]: a match within the first j+1
    effective = {k: min(k, ranked.shape[1]) for k in ks}
    recall = {f"R@{k}": float(hit_by[:, effective[k] - 1].mean()) for k in ks}
    per_class = {}
    for label in sorted(set(test_labels.tolist())):
        mask = test_labels == label
        per_class[names.get(label, str(label))] = float(hit_by[mask, 0].mean())
    return {
        "recall": recall, "k": ks, "k_effective": [effective[k] for k in ks], "per_class_r1": per_class,
        "counts": {"queries": len(test_labels), "gallery": len(train_labels), "classes": len(per_class)},
        "ties": "equal similarities ranked by gallery position (stable sort)",
    }


def evaluate_files(train_path: str | os.PathLike, test_path: str | os.PathLike, out: str | os.PathLike,
                   ks: Sequence[int] = KS, chunk_size: int = 1024, device: str = "cpu",
                   protocol: str | None = None, **identity) -> dict:
    """Retrieval metrics of two feature files, written to `out` as a metrics record (its `metrics`
    hold recall, per_class_r1, ...; extra.train / extra.test the two files' provenance); returns it.
    `identity`: config_path, seed, profile, dataset, split (record.write_feature_evaluation)."""
    return write_feature_evaluation(
        train_path, test_path, out,
        lambda *splits: retrieval_metrics(*splits[:4], ks, chunk_size, splits[4], device),
        task="retrieval", protocol=protocol or PROTOCOL, **identity)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", required=True, type=Path, help="gallery features (.npz, vclr eval features)")
    parser.add_argument("--test", required=True, type=Path, help="query features (.npz)")
    parser.add_argument("--out", required=True, type=Path, help="metrics JSON to write")
    parser.add_argument("--chunk-size", type=int, default=1024, help="queries per similarity block")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    add_provenance_arguments(parser, f"protocol name for the record (default {PROTOCOL}; the paper's "
                                     f"UCF101/HMDB51 rows: knn_cosine_split1)")


def main(args: argparse.Namespace) -> int:
    if args.chunk_size < 1:
        raise VclrError(f"--chunk-size must be positive, got {args.chunk_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise VclrError("--device cuda requested but no CUDA device is available")
    record = evaluate_files(args.train, args.test, args.out, KS, args.chunk_size, args.device,
                            **identity_from_args(args))
    metrics = record["metrics"]
    print("  ".join(f"{name} {100 * value:.1f}" for name, value in metrics["recall"].items())
          + f"  ({metrics['counts']['queries']} queries, {metrics['counts']['gallery']} gallery) -> {args.out}")
    return 0
