"""Retrieval metrics on hand-computed cases, feature files and extraction (tiny, CPU)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vclr import cli
from vclr.data.packed import FORMAT, PackedFrames, ShardVideo, write_shard
from vclr.errors import VclrError
from vclr.evaluate.feature_files import load_features, save_features
from vclr.evaluate.features import center_crop, extract_features, load_backbone
from vclr.evaluate.retrieval import nearest_gallery, retrieval_metrics

# Gallery of unit vectors on a circle, so cosine similarities are easy to reason about.
#   g0 = (1, 0) class 0, g1 = (1, 0) class 1 (a tie with g0), g2 = (0, 1) class 1,
#   g3 = (-1, 0) class 2 (the only video of class 2), g4 = (0, -1) class 0.
GALLERY = np.array([[1, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.float32)
GALLERY_LABELS = np.array([0, 1, 1, 2, 0])
# q0 = (2, 0) class 1: ties g0/g1 at 1.0; the earlier g0 (class 0) ranks first -> miss at R@1, hit at R@2.
# q1 = (0, 3) class 1: g2 first -> hit.   q2 = (-1, 0.1) class 2: g3 first -> hit.
# q3 = (1, -1) class 2: sims g0 .707, g1 .707, g4 .707, g2 -.707, g3 -.707 -> g3 is 5th (tie with g2,
#   g2 first by index). Miss at k < 5, hit at k = 5.
QUERIES = np.array([[2, 0], [0, 3], [-1, 0.1], [1, -1]], dtype=np.float32)
QUERY_LABELS = np.array([1, 1, 2, 2])


def test_nearest_gallery_breaks_ties_by_gallery_index():
    ranked = nearest_gallery(QUERIES, GALLERY, k=5)
    assert ranked[0].tolist()[:2] == [0, 1]
    assert ranked[3].tolist() == [0, 1, 4, 2, 3]
    assert nearest_gallery(QUERIES, GALLERY, k=50).shape == (4, 5)  # k clamped to the gallery


def test_recall_at_k_hand_computed():
    metrics = retrieval_metrics(GALLERY, GALLERY_LABELS, QUERIES, QUERY_LABELS, ks=(1, 2, 4, 5, 50),
                                class_names={1: "one", 2: "two"})
    assert metrics["recall"] == {"R@1": 0.5, "R@2": 0.75, "R@4": 0.75, "R@5": 1.0, "R@50": 1.0}
    assert metrics["k_effective"] == [1, 2, 4, 5, 5]
    assert metrics["per_class_r1"] == {"one": 0.5, "two": 0.5}
    assert metrics["counts"] == {"queries": 4, "gallery": 5, "classes": 2}


def test_chunked_equals_unchunked():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(37, 8)).astype(np.float32)
    gallery[5] = gallery[2]  # exact duplicates give ties in every chunking
    queries = rng.normal(size=(23, 8)).astype(np.float32)
    whole = nearest_gallery(queries, gallery, k=20, chunk_size=1000)
    for chunk in (1, 4, 7):
        assert np.array_equal(nearest_gallery(queries, gallery, k=20, chunk_size=chunk), whole)
    labels = rng.integers(0, 4, 37)
    labels[:4] = np.arange(4)
    query_labels = rng.integers(0, 4, 23)
    assert (retrieval_metrics(gallery, labels, queries, query_labels, chunk_size=3)
            == retrieval_metrics(gallery, labels, queries, query_labels, chunk_size=1000))


def test_retrieval_errors():
    with pytest.raises(VclrError, match="'two' \\(label 2\\)"):
        retrieval_metrics(GALLERY[:3], GALLERY_LABELS[:3], QUERIES, QUERY_LABELS, class_names={2: "two"})
    with pytest.raises(VclrError, match="out of step"):
        retrieval_metrics(GALLERY, GALLERY_LABELS[:4], QUERIES, QUERY_LABELS)
    with pytest.raises(VclrError, match="test split is empty"):
        retrieval_metrics(GALLERY, GALLERY_LABELS, QUERIES[:0], QUERY_LABELS[:0])
    with pytest.raises(VclrError, match="train split is empty"):
        retrieval_metrics(GALLERY[:0], GALLERY_LABELS[:0], QUERIES, QUERY_LABELS)


def _provenance(**changes):
    return {"backbone": "resnet_tiny", "checkpoint": "random:seed=0", "checkpoint_sha256": None,
            "index": "i.csv", "num_frames": 30, "crop": 224, **changes}


def _index(root):
    """An index folder as `vclr data index` writes it (summary.json names the dataset)."""
    root.mkdir()
    (root / "summary.json").write_text('{"dataset": "ucf101", "classes": 3, "splits": {}}\n')
    for split in ("train", "test"):
        (root / f"{split}.csv").write_text("video_id,label,label_name,status,frames,shard,duration,segments\n")
    return root


def test_feature_file_round_trip_and_cli(tmp_path):
    from vclr.evaluate.record import dvc_dir_md5, read_metrics_record

    index = _index(tmp_path / "index")
    train, test = tmp_path / "train.npz", tmp_path / "test.npz"
    save_features(train, GALLERY, [f"g{i}" for i in range(5)], GALLERY_LABELS,
                  _provenance(class_names={"0": "zero", "1": "one", "2": "two"}, index=str(index / "train.csv")))
    save_features(test, QUERIES, [f"q{i}" for i in range(4)], QUERY_LABELS, _provenance(index=str(index / "test.csv")))
    loaded = load_features(train)
    assert loaded["video_ids"] == ["g0", "g1", "g2", "g3", "g4"] and loaded["provenance"]["crop"] == 224
    out = tmp_path / "metrics.json"
    assert cli.main(["eval", "retrieval", "--train", str(train), "--test", str(test), "--out", str(out),
                     "--chunk-size", "2", "--seed", "3", "--protocol", "knn_cosine_split1"]) == 0
    record = read_metrics_record(out)
    metrics = record["metrics"]
    assert metrics["recall"]["R@1"] == 0.5 and metrics["recall"]["R@5"] == 1.0
    assert metrics["k"] == [1, 5, 10, 20, 50] and metrics["per_class_r1"] == {"one": 0.5, "two": 0.5}
    assert (record["task"], record["dataset"], record["split"], record["protocol"], record["seed"]) == (
        "retrieval", "ucf101", "test", "knn_cosine_split1", 3)
    assert record["data_index"]["dvc_md5"] == dvc_dir_md5(index) and record["config"]["hash"] is None
    assert record["checkpoint"] == {"path": "random:seed=0", "dvc_md5": None,
                                    "reason": "random initialisation, no file"}
    assert record["extra"]["train"]["file"] == str(train.resolve()) and record["extra"]["test"]["num_frames"] == 30

    save_features(test, QUERIES, [f"q{i}" for i in range(4)], QUERY_LABELS,
                  _provenance(index=str(tmp_path / "gone.csv")))
    assert cli.main(["eval", "retrieval", "--train", str(train), "--test", str(test), "--out", str(out)]) == 2
    save_features(test, QUERIES, [f"q{i}" for i in range(4)], QUERY_LABELS, _provenance(crop=112))
    assert cli.main(["eval", "retrieval", "--train", str(train), "--test", str(test), "--out", str(out)]) == 2
    assert read_metrics_record(out)["seed"] == 3  # failed runs left the record alone
    np.savez(test, features=QUERIES, video_ids=np.array(["a", "b", "c"]), labels=QUERY_LABELS,
             provenance=np.asarray(json.dumps({"format": "vclr-features/1"})))
    with pytest.raises(VclrError, match="out of step"):
        load_features(test)


def test_center_crop_resizes_only_small_frames():
    frames = torch.arange(2 * 3 * 6 * 10, dtype=torch.float32).reshape(2, 3, 6, 10).to(torch.uint8)
    cropped = center_crop(frames, 4)
    assert torch.equal(cropped, frames[..., 1:5, 3:7].float() / 255)
    assert center_crop(frames, 8).shape == (2, 3, 8, 8)  # short side 6 -> 8, then the crop


def _write_frames(root, videos):
    """A packed-frames dir whose video i shows a constant colour per frame (frame j: value 10*i + j)."""
    keys = [f"v{i}" for i in range(videos)]

    def jpegs(i):
        for j in range(5):
            buffer = io.BytesIO()
            Image.fromarray(np.full((12, 16, 3), 10 * i + j, np.uint8)).save(buffer, format="JPEG")
            yield buffer.getvalue()

    write_shard(root / "shards/00000.vpk", [ShardVideo(k, 16, 12, 5, jpegs(i)) for i, k in enumerate(keys)])
    entry = {"shard": "shards/00000.vpk", "frames": 5, "decoded": 5, "width": 16, "height": 12}
    (root / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "dataset": "toy", "settings": {}, "shards": ["shards/00000.vpk"],
        "videos": {k: entry for k in keys}, "failed": {}}))
    return keys


def test_extract_features_averages_frames_in_any_batching(tmp_path):
    from vclr.data.index import IndexRow

    keys = _write_frames(tmp_path, 3)
    rows = [IndexRow(k, i, f"c{i}", "found", 5, "shards/00000.vpk", None, []) for i, k in enumerate(keys)]
    rows.append(IndexRow("gone", 0, "c0", "missing", 0, "", None, []))
    frames = PackedFrames(tmp_path)
    backbone = load_backbone("random", "resnet_tiny", seed=1)
    features, ids, labels = extract_features(backbone, rows, frames, num_frames=3, crop=8, batch_size=3)
    assert features.shape == (3, 128) and features.dtype == np.float32
    assert ids == keys and labels.tolist() == [0, 1, 2]
    again, _, _ = extract_features(backbone, rows, frames, num_frames=3, crop=8, batch_size=100)
    np.testing.assert_allclose(again, features, rtol=1e-4, atol=1e-5)
    # The average of per-frame features, frames 0, 2, 4 (uniform indices over 5).
    clip = torch.stack([frames.read_frame("v1", j) for j in (0, 2, 4)])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = backbone.eval()((center_crop(clip, 8) - mean) / std).mean(0)
    np.testing.assert_allclose(features[1], expected.numpy(), rtol=1e-4, atol=1e-5)


def test_load_backbone_sources(tmp_path):
    first = load_backbone("random", "resnet_tiny", seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                  load_backbone("random", "resnet_tiny", seed=4).state_dict().values()))
    other = load_backbone("random", "resnet_tiny", seed=5)
    assert not torch.equal(first.conv1.weight, other.conv1.weight)
    torch.save(first.state_dict(), tmp_path / "backbone.pt")
    assert torch.equal(load_backbone(tmp_path / "backbone.pt", "resnet_tiny").conv1.weight, first.conv1.weight)
    from vclr.train.checkpoint import CHECKPOINT_FORMAT
    state = {"format": CHECKPOINT_FORMAT,
             "vclr": {**{f"model.backbone.{k}": v for k, v in first.state_dict().items()},
                      **{f"momentum.encoder.backbone.{k}": v * 0 for k, v in other.state_dict().items()}}}
    torch.save(state, tmp_path / "checkpoint_last.pt")
    assert torch.equal(load_backbone(tmp_path / "checkpoint_last.pt", "resnet_tiny").conv1.weight,
                       first.conv1.weight)
    with pytest.raises(VclrError, match="does not fit"):
        load_backbone(tmp_path / "backbone.pt", "resnet18")
    with pytest.raises(VclrError, match="not found"):
        load_backbone(tmp_path / "absent.pt", "resnet_tiny")


def test_top_k_is_stable_when_ties_cross_the_candidate_boundary():
    # 200 identical gallery videos: every similarity ties, far beyond k + TIE_MARGIN candidates.
    gallery = np.ones((200, 4), dtype=np.float32)
    assert nearest_gallery(np.ones((2, 4), dtype=np.float32), gallery, 5).tolist() == [[0, 1, 2, 3, 4]] * 2
    # Ties inside the candidates: a later-index exact duplicate of the best match ranks after it.
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(300, 8)).astype(np.float32)
    gallery[250] = gallery[17]
    query = gallery[17:18] * 3
    ranked = nearest_gallery(query, gallery, 10)[0].tolist()
    assert ranked[:2] == [17, 250]
    # and the fast path equals a full stable sort everywhere
    queries = rng.normal(size=(20, 8)).astype(np.float32)
    similarity = torch.nn.functional.normalize(torch.from_numpy(queries), dim=1) @ \
        torch.nn.functional.normalize(torch.from_numpy(gallery), dim=1).T
    reference = torch.sort(-similarity, dim=1, stable=True).indices[:, :50].numpy()
    assert (nearest_gallery(queries, gallery, 50) == reference).all()
