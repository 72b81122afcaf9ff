"""The synthetic generator: real containers/codecs, official annotation formats, determinism,
atomic output, and classes that only motion and temporal order tell apart."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest

from vclr.cli import main as cli_main
from vclr.data import synthetic
from vclr.data.synthetic import class_motions, generate_dataset, paired_class, render_frames, reverse_motion
from vclr.errors import VclrError

REAL = Path(__file__).resolve().parents[2] / "shared" / "real_annotations"

TINY = {
    "ucf101": dict(classes=4, train_per_class=3, test_per_class=2, width=64, height=48, frames=10),
    "hmdb51": dict(classes=3, train_per_class=2, test_per_class=1, unused_per_class=1, width=64, height=48, frames=10),
    "k400": dict(classes=5, train_per_class=1, val_per_class=1, test_per_class=1, width=64, height=48, frames=10),
    "ssv2": dict(classes=4, train_per_class=2, val_per_class=1, test_per_class=1, width=64, height=48, frames=8),
    "anet": dict(classes=3, videos=2, min_seconds=3.0, max_seconds=4.0, fps=10, width=64, height=48),
}
EXPECTED_VIDEO = {  # extension, container format name, codec name, frames per trimmed clip
    "ucf101": (".avi", "avi", "mpeg4", 10),
    "hmdb51": (".avi", "avi", "mpeg4", 10),
    "k400": (".mp4", "mov,mp4,m4a,3gp,3g2,mj2", "h264", 10),
    "ssv2": (".webm", "matroska,webm", "vp9", 8),
    "anet": (".mp4", "mov,mp4,m4a,3gp,3g2,mj2", "h264", None),
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("synthetic")
    return {d: (root / d, generate_dataset(d, root / d, seed=7, **TINY[d])) for d in synthetic.DATASETS}


def decode(path: Path) -> tuple[str, str, str, np.ndarray]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return container.format.name, stream.codec_context.name, stream.codec_context.codec_tag, frames


def video_files(raw: Path) -> list[Path]:
    return sorted(p for p in (raw / "videos").rglob("*") if p.is_file())


def annotation_bytes(raw: Path) -> dict[str, bytes]:
    return {str(p.relative_to(raw)): p.read_bytes() for p in sorted((raw / "annotations").rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- videos


@pytest.mark.parametrize("dataset", synthetic.DATASETS)
def test_videos_use_the_real_container_codec_size_and_length(generated, dataset):
    raw, counts = generated[dataset]
    files = video_files(raw)
    assert len(files) == counts["videos"] > 0
    extension, container_name, codec_name, frames = EXPECTED_VIDEO[dataset]
    assert {p.suffix for p in files} == {extension}
    for path in files[:3]:
        container, codec, tag, decoded = decode(path)
        assert (container, codec) == (container_name, codec_name), path
        assert decoded.shape[1:] == (48, 64, 3)
        if frames is not None:
            assert decoded.shape[0] == frames
        if dataset == "ucf101":
            assert tag == "XVID"


# ----------------------------------------------------------------------------- annotation formats


def test_ucf101_lists_are_official_crlf_group_disjoint_with_the_handstand_quirk(generated):
    raw, _ = generated["ucf101"]
    lists = raw / "annotations" / "ucfTrainTestlist"
    on_disk = {str(p.relative_to(raw / "videos" / "UCF-101")) for p in video_files(raw)}
    class_lines = (lists / "classInd.txt").read_bytes().split(b"\r\n")
    assert class_lines[-1] == b"" and all(b"\n" not in line for line in class_lines)
    classes = [line.decode().split(" ")[1] for line in class_lines[:-1]]
    assert [line.decode().split(" ")[0] for line in class_lines[:-1]] == ["1", "2", "3", "4"]
    assert "HandstandPushups" in classes
    assert any(name.startswith("HandstandPushups/v_HandStandPushups_g") for name in on_disk)
    for split in (1, 2, 3):
        train_raw = (lists / f"trainlist{split:02d}.txt").read_bytes()
        test_raw = (lists / f"testlist{split:02d}.txt").read_bytes()
        for raw_text in (train_raw, test_raw):
            assert raw_text.endswith(b"\r\n") and raw_text.count(b"\n") == raw_text.count(b"\r\n")
        train = [line.split(" ") for line in train_raw.decode().split("\r\n")[:-1]]
        test = test_raw.decode().split("\r\n")[:-1]
        assert all(re.fullmatch(r"\w+/v_\w+_g\d\d_c\d\d\.avi", path) for path, _ in train)
        assert all(classes[int(label) - 1] == path.split("/")[0] for path, label in train)
        assert all(" " not in line for line in test)
        assert sorted([p for p, _ in train] + test) == sorted(on_disk)
        group = lambda path: (path.split("/")[0], path.split("_g")[1][:2])  # noqa: E731
        assert not {group(p) for p, _ in train} & {group(p) for p in test}
        test_groups = {int(p.split("_g")[1][:2]) for p in test}
        assert test_groups <= set(range(7 * split - 6, 7 * split + 1))


def test_hmdb51_split_files_have_trailing_space_lf_and_unused_entries(generated):
    raw, _ = generated["hmdb51"]
    split_dir = raw / "annotations" / "testTrainMulti_7030_splits"
    assert len(list(split_dir.iterdir())) == 3 * 3
    codes_seen = set()
    for path in split_dir.iterdir():
        text = path.read_bytes().decode()
        assert "\r" not in text and text.endswith(" \n")
        lines = text.split("\n")[:-1]
        assert all(re.fullmatch(r"\S+\.avi [012] ", line) for line in lines), path
        class_name = path.name.rsplit("_test_split", 1)[0]
        assert all((raw / "videos" / class_name / line.split(" ")[0]).is_file() for line in lines)
        codes = [line.split(" ")[1] for line in lines]
        assert codes.count("1") == 2 and codes.count("2") == 1
        codes_seen |= set(codes)
    assert codes_seen == {"0", "1", "2"}


def test_k400_csvs_match_the_real_quoting_and_header(generated):
    raw, _ = generated["k400"]
    names = {"train.csv": "train", "validate.csv": "val", "test.csv": "test"}
    rows_seen = []
    for name, split in names.items():
        text = (raw / "annotations" / name).read_text()
        lines = text.split("\n")
        assert lines[0] == "label,youtube_id,time_start,time_end,split,is_cc" and lines[-1] == ""
        for line, row in zip(lines[1:-1], csv.reader(lines[1:-1])):
            label, youtube_id, start, end, row_split, is_cc = row
            assert line.startswith(f'"{label}",') == (" " in label)  # quoted exactly when it has a space
            assert re.fullmatch(r"[A-Za-z0-9_-]{11}", youtube_id) and row_split == split and is_cc in "01"
            assert (raw / "videos" / split / f"{youtube_id}_{int(start):06d}_{int(end):06d}.mp4").is_file()
            rows_seen.append((label, line.split(",")[0] if " " not in label else line[: len(label) + 2]))
    labels = {label for label, _ in rows_seen}
    assert any(" " in l for l in labels) and any("(" in l for l in labels) and any("'" in l for l in labels)
    real_val = REAL / "kinetics400" / "kinetics-400_val.csv"
    if not real_val.is_file():
        pytest.skip(f"{real_val} not available")
    real_fields = {}
    for line, row in zip(real_val.read_text().split("\n")[1:], csv.reader(real_val.read_text().split("\n")[1:])):
        if row:
            real_fields[row[0]] = line[: len(row[0]) + 2] if line.startswith('"') else row[0]
    for label, raw_field in rows_seen:
        assert real_fields[label] == raw_field  # the real class name, written exactly like the real file


def test_ssv2_json_files_have_the_released_structure_and_layout(generated):
    raw, counts = generated["ssv2"]
    annotations = raw / "annotations"
    labels_text = (annotations / "labels.json").read_text()
    assert labels_text.startswith('{\n "') and labels_text.endswith('"\n}\n')
    labels = json.loads(labels_text)
    assert list(labels) == sorted(labels) and list(labels.values()) == [str(i) for i in range(len(labels))]
    entry_line = re.compile(r'\{"id":"\d+","label":"[^"]+","template":"[^"]+","placeholders":\["[^"]+"(,"[^"]+")*\]\},?')
    ids = []
    for split in ("train", "validation"):
        text = (annotations / f"{split}.json").read_text()
        lines = text.split("\n")
        assert lines[0] == "[" and lines[-2:] == ["]", ""]
        assert all(entry_line.fullmatch(line) for line in lines[1:-2])
        for entry in json.loads(text):
            assert list(entry) == ["id", "label", "template", "placeholders"]
            assert entry["template"].replace("[", "").replace("]", "") in labels
            assert entry["template"].count("[") == len(entry["placeholders"]) >= 1
            assert entry["label"][0].islower() and all(p in entry["label"] for p in entry["placeholders"])
            ids.append(entry["id"])
    test_text = (annotations / "test.json").read_text()
    assert all(re.fullmatch(r'\{"id":"\d+"\},?', line) for line in test_text.split("\n")[1:-2])
    test_ids = [e["id"] for e in json.loads(test_text)]
    answers = (annotations / "test-answers.csv").read_text().split("\n")[:-1]
    assert [a.split(";")[0] for a in answers] == test_ids and all(a.split(";")[1] in labels for a in answers)
    ids += test_ids
    assert len(set(ids)) == len(ids) == counts["videos"]
    assert {p.stem for p in video_files(raw)} == set(ids)
    real_validation = REAL / "ssv2" / "labels_lf_layout" / "validation.json"
    if real_validation.is_file():  # the same one-object-per-line layout as the real file
        with real_validation.open() as handle:
            real_lines = [handle.readline().rstrip("\n") for _ in range(3)]
        assert real_lines[0] == "[" and all(entry_line.fullmatch(line) for line in real_lines[1:])


def test_activitynet_json_structure_and_segments(generated):
    raw, _ = generated["anet"]
    document = json.loads((raw / "annotations" / "activity_net.v1-3.min.json").read_text())
    assert list(document) == ["version", "taxonomy", "database"] and document["version"] == "VERSION 1.3"
    nodes = document["taxonomy"]
    assert all(set(n) == {"parentName", "nodeName", "nodeId", "parentId"} for n in nodes)
    by_id = {n["nodeId"]: n for n in nodes}
    assert all(n["parentId"] is None or by_id[n["parentId"]]["nodeName"] == n["parentName"] for n in nodes)
    leaves = {n["nodeName"] for n in nodes} - {n["parentName"] for n in nodes}
    subsets = set()
    for youtube_id, video in document["database"].items():
        assert set(video) == {"duration", "subset", "resolution", "url", "annotations"}
        assert video["url"] == f"https://www.youtube.com/watch?v={youtube_id}" and video["resolution"] == "64x48"
        subsets.add(video["subset"])
        _, _, _, frames = decode(raw / "videos" / f"v_{youtube_id}.mp4")
        assert video["duration"] == pytest.approx(len(frames) / 10, abs=0.01)
        if video["subset"] == "testing":
            assert video["annotations"] == []
            continue
        assert 1 <= len(video["annotations"]) <= 2
        previous_end = 0.0
        for annotation in video["annotations"]:
            start, end = annotation["segment"]
            assert previous_end <= start < end <= video["duration"] and annotation["label"] in leaves
            previous_end = end
    assert subsets == {"training", "validation", "testing"}


# ----------------------------------------------------------------------------- determinism and atomicity


def test_same_seed_is_identical_and_another_seed_differs(generated, tmp_path):
    for dataset in ("k400", "ssv2"):
        first, _ = generated[dataset]
        again = tmp_path / f"{dataset}-again"
        generate_dataset(dataset, again, seed=7, **TINY[dataset])
        assert annotation_bytes(again) == annotation_bytes(first)
        assert [p.relative_to(again) for p in video_files(again)] == [p.relative_to(first) for p in video_files(first)]
        # byte-identical, not just decodably equal: DVC and Snakemake runs must hash the same
        assert [p.read_bytes() for p in video_files(again)] == [p.read_bytes() for p in video_files(first)]
        other = tmp_path / f"{dataset}-other"
        generate_dataset(dataset, other, seed=8, **TINY[dataset])
        assert annotation_bytes(other) != annotation_bytes(first)
        assert not np.array_equal(decode(video_files(other)[0])[3], decode(video_files(first)[0])[3])


def test_a_crash_leaves_no_partial_dataset(tmp_path, monkeypatch):
    out = tmp_path / "hmdb51"
    out.mkdir()
    (out / "previous.txt").write_text("an older complete dataset")
    calls = []
    original = synthetic.write_video

    def failing_write(path, frames, dataset, fps):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        original(path, frames, dataset, fps)

    monkeypatch.setattr(synthetic, "write_video", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_dataset("hmdb51", out, seed=1, **TINY["hmdb51"])
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hmdb51"]  # no temporary sibling left
    assert [p.name for p in out.iterdir()] == ["previous.txt"]


def test_cli_writes_a_dataset_and_rejects_bad_options(tmp_path, capsys):
    out = tmp_path / "raw"
    argv = ["data", "generate", "--dataset", "ucf101", "--out", str(out), "--seed", "3", "--classes", "2",
            "--train-per-class", "1", "--test-per-class", "1", "--width", "32", "--height", "32", "--frames", "4"]
    assert cli_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["videos"] == 4
    assert len(video_files(out)) == 4
    bad = [
        ["--dataset", "hmdb51", "--val-per-class", "2"],  # not a size hmdb51 has
        ["--dataset", "k400", "--width", "63"],  # yuv420p needs even sizes
        ["--dataset", "k400", "--classes", "1000"],
        ["--dataset", "anet", "--frames", "30"],  # untrimmed videos have random lengths
        ["--dataset", "anet", "--seconds", "8", "--min-seconds", "6"],
    ]
    for extra in bad:
        assert cli_main(["data", "generate", "--out", str(tmp_path / "never"), *extra]) == 2
        assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    with pytest.raises(VclrError, match="--frames and --seconds"):
        synthetic.resolve_sizes("ucf101", frames=4, seconds=1.0)
    assert synthetic.resolve_sizes("ucf101", seconds=1.2, fps=25.0)["frames"] == 30
    anet = synthetic.resolve_sizes("anet", seconds=8.0)
    assert (anet["min_seconds"], anet["max_seconds"]) == (6.0, 10.0)


# ----------------------------------------------------------------------------- the class signal is motion


def motion_centres(frames: np.ndarray, threshold: int = 90) -> np.ndarray:
    """Centre (x, y) of the pixels that change between consecutive frames; NaN where nothing moves."""
    change = np.abs(np.diff(frames.astype(np.int32), axis=0)).sum(axis=3) > threshold
    ys, xs = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]]
    count = change.sum(axis=(1, 2))
    with np.errstate(invalid="ignore"):
        return np.stack([(change * xs).sum(axis=(1, 2)) / count, (change * ys).sum(axis=(1, 2)) / count], axis=1)


@pytest.mark.parametrize("dataset", ["ucf101", "ssv2"])
def test_paired_classes_are_exact_time_reversals(dataset):
    motions = class_motions(dataset, 12)
    for class_index in range(12):
        pair = paired_class(class_index)
        assert reverse_motion(motions[class_index]) == motions[pair]
        forward = render_frames(motions[class_index], 100 + class_index, 64, 48, 12, dataset != "ssv2")
        backward = render_frames(motions[pair], 100 + class_index, 64, 48, 12, dataset != "ssv2")
        difference = np.abs(forward[::-1].astype(int) - backward.astype(int))
        assert difference.max() <= 2 and (difference > 0).mean() < 0.01, (dataset, class_index)
        assert not np.array_equal(forward, backward)


def test_within_a_pair_single_frames_carry_no_class_signal_but_trajectories_do():
    up, down = class_motions("ucf101", 2)  # class 0 moves up, class 1 moves down
    assert up == (("move", 0, -1),) and down == reverse_motion(up)
    for seed in range(6):
        a = render_frames(up, seed, 64, 48, 13)
        b = render_frames(down, seed, 64, 48, 13)
        histogram = lambda frame: np.histogramdd(frame.reshape(-1, 3), bins=4, range=[(0, 256)] * 3)[0]  # noqa: E731
        # every frame of one class has an identical-looking frame in the other: same appearance statistics
        assert np.abs(histogram(a[6]) - histogram(b[6])).sum() <= 0.01 * 64 * 48
        pooled_a = sum(histogram(f) for f in a)
        pooled_b = sum(histogram(f) for f in b)
        assert np.abs(pooled_a - pooled_b).sum() <= 0.01 * 13 * 64 * 48
        # while the trajectory separates them: up has decreasing y, down increasing
        ya, yb = motion_centres(a)[:, 1], motion_centres(b)[:, 1]
        assert ya[-1] - ya[0] < -8 and yb[-1] - yb[0] > 8


def test_a_single_grey_frame_shows_the_pair_through_its_scene_texture():
    """Nearest class-pair centroid of a colour-blind texture statistic (the grey frame's low-frequency
    Fourier magnitude: blind to colour and to where the texture starts) finds the pair of videos never
    seen before."""
    motions = class_motions("ucf101", 6)

    def statistic(label: int, seed: int) -> np.ndarray:
        frame = render_frames(motions[label], seed, 96, 72, 4, texture_family=label // 2)[1]
        grey = frame.astype(np.float64).mean(axis=2)
        spectrum = np.abs(np.fft.rfft2(grey - grey.mean()))
        low = np.concatenate([spectrum[:12, 1:13], spectrum[-12:, 1:13]]).ravel()
        return low / np.linalg.norm(low)

    labels = np.arange(6).repeat(8)
    train = np.stack([statistic(label, 1000 + n) for n, label in enumerate(labels)])
    test = np.stack([statistic(label, 5000 + n) for n, label in enumerate(labels)])
    pairs = labels // 2
    centroids = np.stack([train[pairs == p].mean(axis=0) for p in range(3)])
    predicted = np.argmin(((test[:, None] - centroids[None]) ** 2).sum(axis=2), axis=1)
    assert (predicted == pairs).mean() >= 0.6  # chance: 1/3 (16 of 48, sd 3.3); measured 0.75


def test_mirroring_changes_the_class_only_for_ssv2():
    for seed in range(8):
        x = motion_centres(render_frames((("move", 1, 0),), seed, 64, 48, 10, mirror_invariant=False))[:, 0]
        assert x[-1] - x[0] > 8  # ssv2: "from left to right" always moves right
    directions = set()
    for seed in range(8):
        x = motion_centres(render_frames((("move", 1, 0), ("move", 0, -1)), seed, 64, 48, 10))[:, 0]
        directions.add(bool(x[4] > x[0]))
    assert directions == {True, False}  # other datasets: left/right is random, so flips keep the class


def test_activitynet_segments_are_exactly_the_action_frames():
    up = class_motions("anet", 1)[0]
    spans = [(10, 40), (60, 85)]
    frames = render_frames(up, 5, 64, 48, 100, action_spans=spans, texture_family=0)
    action = np.zeros(100, dtype=bool)
    for start, end in spans:
        action[start:end] = True
    # background: one still grey scene without texture or object, the same in every video (another
    # video, scene and class: the same background), so a single frame tells it from action everywhere
    assert (frames[~action] == synthetic.BACKGROUND_GREY).all()
    other = render_frames(class_motions("anet", 2)[1], 9, 64, 48, 30, action_spans=[(5, 20)], texture_family=1)
    assert (other[:5] == frames[0]).all() and (other[20:] == frames[0]).all()
    textured = frames.astype(np.float32).std(axis=(1, 2, 3))
    assert textured[action].min() > textured[~action].max()
    centres = motion_centres(frames)
    moving = ~np.isnan(centres[:, 0])  # transition t -> t+1 changed something visible
    inside = np.zeros(99, dtype=bool)
    for start, end in spans:
        inside[start : end - 1] = True
    assert moving[inside].all() and not moving[~action[:-1] & ~action[1:]].any()
    for start, end in spans:
        assert centres[end - 2, 1] < centres[start, 1] - 5  # the action moves the object up


@pytest.mark.parametrize("dataset", synthetic.DATASETS)
def test_parsers_read_what_is_generated(generated, dataset):
    annotations = pytest.importorskip("vclr.data.annotations")
    raw, counts = generated[dataset]
    parsed = annotations.parse_annotations(dataset, raw / "annotations")
    assert len(parsed.classes) == counts["classes"] == TINY[dataset]["classes"]
    keys = {entry.key for entries in parsed.splits.values() for entry in entries}
    on_disk = {p.stem for p in video_files(raw)}
    labelled = [e for split, entries in parsed.splits.items() for e in entries if not (dataset == "anet" and split == "test")]
    assert keys <= on_disk and all(entry.label >= 0 for entry in labelled)
    if dataset not in ("ucf101", "hmdb51"):
        assert keys == on_disk
    if dataset == "anet":
        for entry in parsed.splits["train"] + parsed.splits["val"]:
            assert entry.segments and all(0 <= s < e <= entry.duration for s, e, _ in entry.segments)
