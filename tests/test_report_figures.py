"""Report figures on real inputs: training logs, a tidy ablation frame, and a retrieval picture over
synthetic videos extracted with the real tools. Files are checked for format and byte-identity."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer
from PIL import Image

from vclr.cli import main as cli_main
from vclr.data.synthetic import generate_dataset
from vclr.errors import VclrError
from vclr.evaluate.feature_files import load_features, save_features
from vclr.report import figures
from vclr.report.figures import (
    ablation_figure,
    binned,
    plot_ablations,
    plot_retrieval_strip,
    plot_training_curves,
    read_training_log,
    retrieval_strip_figure,
    strip_rows,
    training_curves_figure,
)

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC, PDF_MAGIC = b"\x89PNG\r\n\x1a\n", b"%PDF-"


def write_log(path: Path, terms: tuple[str, ...], steps: int = 12) -> Path:
    """A log.jsonl as vclr/train/pretrain.py writes it (switched-off terms absent)."""
    lines = []
    for step in range(1, steps + 1):
        values = {term: 5.0 / step + i for i, term in enumerate(terms)}
        lines.append(json.dumps({"step": step, "epoch": (step - 1) // 4, "iteration": (step - 1) % 4 + 1,
                                 "lr": 0.1 * step / steps, **values, "total": sum(values.values()),
                                 "videos_per_s": 100.0 + step}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def logs(tmp_path) -> dict[str, Path]:
    return {"vclr": write_log(tmp_path / "vclr/log.jsonl", ("inter", "intra", "segment", "order")),
            "seco": write_log(tmp_path / "seco/log.jsonl", ("inter", "intra"), steps=8)}


def ablation_frame() -> pd.DataFrame:
    nan = math.nan
    rows = [  # axis, label, run, dataset, metric, mean, std, n, paper_value
        ("loss terms", "L_inter+L_intra (SeCo)", "seco", "ucf101", "linear top-1", 60.0, 2.0, 3, 82.1),
        ("loss terms", "L_inter+L_intra (SeCo)", "seco", "hmdb51", "linear top-1", 30.0, nan, 1, nan),
        ("loss terms", "+ L_segment", "seg", "ucf101", "linear top-1", 62.0, 1.0, 2, nan),
        ("loss terms", "+ L_segment", "seg", "hmdb51", "linear top-1", 31.0, nan, 1, nan),
        ("loss terms", "+ L_order", "vclr", "ucf101", "linear top-1", 64.0, 0.0, 1, 85.6),
        ("loss terms", "+ L_order", "vclr", "hmdb51", "linear top-1", nan, nan, 0, 54.1),  # run missing
        ("init", "MoCo v2", "vclr", "ucf101", "retrieval R@1", 40.0, nan, 1, nan),
        ("init", "random", "rand", "ucf101", "retrieval R@1", 20.0, nan, 1, nan),
    ]
    return pd.DataFrame(rows, columns=list(figures.ABLATION_COLUMNS))


def assert_figure_files(paths: list[Path], stem: Path) -> None:
    assert paths == [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")]
    assert paths[0].read_bytes().startswith(PNG_MAGIC)
    assert paths[1].read_bytes().startswith(PDF_MAGIC) and paths[1].read_bytes().rstrip().endswith(b"%%EOF")
    assert not list(stem.parent.glob(".*.tmp"))  # no leftovers of the atomic writes


def assert_same_bytes(first: list[Path], second: list[Path]) -> None:
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), f"{a} and {b} differ"


# ----------------------------------------------------------------------------- training curves


def test_binned_averages_equal_count_bins():
    steps = np.arange(1, 11, dtype=float)
    x, y = binned(steps, 10 * steps, max_points=4)  # bins [1,2] [3,4,5] [6,7] [8,9,10]
    np.testing.assert_allclose(x, [1.5, 4.0, 6.5, 9.0])
    np.testing.assert_allclose(y, [15.0, 40.0, 65.0, 90.0])
    assert binned(steps, steps, max_points=10)[0] is steps


def test_training_curves_panels_lines_and_files(tmp_path, logs):
    fig = training_curves_figure(logs)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["L_inter", "L_intra", "L_segment", "L_order", "total loss",
                                                "learning rate", "videos / s"]
    lines = {ax.get_title(): {line.get_label(): line for line in ax.get_lines()} for ax in shown}
    assert set(lines["L_inter"]) == {"vclr", "seco"} and set(lines["L_order"]) == {"vclr"}
    np.testing.assert_allclose(lines["L_segment"]["vclr"].get_xdata(), np.arange(1, 13))
    np.testing.assert_allclose(lines["L_segment"]["vclr"].get_ydata(), 5.0 / np.arange(1, 13) + 2)
    np.testing.assert_allclose(lines["videos / s"]["seco"].get_ydata(), 100.0 + np.arange(1, 9))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["vclr", "seco"]

    stem = tmp_path / "out" / "pretrain.curves"
    first = plot_training_curves(logs, stem)
    assert_figure_files(first, stem)
    assert_same_bytes(first, plot_training_curves(logs, tmp_path / "again" / "pretrain.curves"))


def test_training_log_errors_name_file_and_line(tmp_path, logs):
    log = logs["seco"]
    good = log.read_text().splitlines()
    cases = {
        "invalid JSON": good[:2] + ['{"step": 3, "lr": '] + good[3:],
        "a JSON object expected": good[:2] + ["[1, 2]"],
        "missing key\\(s\\) lr": good[:2] + [json.dumps({"step": 9, "total": 1.0, "videos_per_s": 2.0})],
        "key 'inter' is not a number": good[:2] + [good[2].replace('"inter": ', '"inter": "x", "was": ')],
        "keys .* differ from the first line's": good[:2] + [good[2].replace('"inter"', '"segment"')],
        "step 2 does not follow step 2": good[:2] + [good[1]],
    }
    for message, lines in cases.items():
        log.write_text("\n".join(lines) + "\n")
        with pytest.raises(VclrError, match=f"^{re.escape(str(log))}:3: {message}"):
            plot_training_curves(logs, tmp_path / "bad")
    log.write_text("\n\n")
    with pytest.raises(VclrError, match=f"^{re.escape(str(log))}: empty training log"):
        read_training_log(log)
    with pytest.raises(VclrError, match="training log not found"):
        read_training_log(tmp_path / "absent.jsonl")
    assert not list(tmp_path.glob("bad*"))


# ----------------------------------------------------------------------------- ablations


def test_ablation_bars_error_bars_and_paper_markers(tmp_path):
    frame = ablation_frame()
    fig = ablation_figure(frame, "Ablations (tiny)")
    losses, init = [ax for ax in fig.axes if ax.get_visible()]
    assert (losses.get_title(), init.get_title()) == ("loss terms", "init")
    assert [t.get_text() for t in losses.get_xticklabels()] == ["ucf101\nlinear top-1", "hmdb51\nlinear top-1"]
    bars = [c for c in losses.containers if isinstance(c, BarContainer)]
    heights = sorted(c.patches[0].get_height() for c in bars)
    assert heights == [30.0, 31.0, 60.0, 62.0, 64.0]  # the missing run draws no bar
    with_errors = sorted(c.patches[0].get_height() for c in bars if c.errorbar is not None)
    assert with_errors == [60.0, 62.0]  # n > 1 and a finite std only
    markers = sorted(float(line.get_ydata()[0]) for line in losses.get_lines() if line.get_marker() == "D")
    assert markers == [54.1, 82.1, 85.6]  # NaN paper values draw nothing; the one without a bar still shows
    legend = [t.get_text() for t in losses.get_legend().get_texts()]
    assert legend == ["L_inter+L_intra (SeCo)", "+ L_segment", "+ L_order", "paper"]
    assert [t.get_text() for t in init.get_legend().get_texts()] == ["MoCo v2", "random"]  # no paper entry
    # bars of one group sit side by side in label order around the group's tick
    ucf = sorted((c.patches[0].get_x() + c.patches[0].get_width() / 2, c.patches[0].get_height()) for c in bars
                 if c.patches[0].get_height() >= 60)
    assert [h for _, h in ucf] == [60.0, 62.0, 64.0] and ucf[1][0] == pytest.approx(0.0)
    assert fig._suptitle.get_text() == "Ablations (tiny)"

    stem = tmp_path / "figures" / "ablations"
    first = plot_ablations(frame, stem, "Ablations (tiny)")
    assert_figure_files(first, stem)
    with matplotlib.rc_context({"axes.facecolor": "red", "lines.linewidth": 7}):  # a caller's own style
        again = plot_ablations(frame, tmp_path / "again" / "ablations", "Ablations (tiny)")
        assert matplotlib.rcParams["axes.facecolor"] == "red"  # left as the caller set it
    assert_same_bytes(first, again)


def test_ablation_frame_errors():
    frame = ablation_frame()
    with pytest.raises(VclrError, match="'T': missing column\\(s\\) paper_value"):
        ablation_figure(frame.drop(columns="paper_value"), "T")
    with pytest.raises(VclrError, match="'T': no rows"):
        ablation_figure(frame.iloc[:0], "T")
    nullable = frame.astype({"mean": "Float64", "std": "Float64", "n": "Int64", "paper_value": "Float64"})
    assert len([c for c in ablation_figure(nullable, "T").axes[0].containers if isinstance(c, BarContainer)]) == 5
    with pytest.raises(VclrError, match="several rows for axis 'init', label 'random', ucf101 retrieval R@1"):
        ablation_figure(pd.concat([frame, frame.iloc[[7]]]), "T")


# ----------------------------------------------------------------------------- retrieval picture

# 3 classes x (3 train + 2 test) synthetic UCF101 videos. Gallery (train) order and labels:
#   g0 AEM_g08 0, g1 AEM_g15 0, g2 AEM_g22 0, g3 AL_g08 1, g4 AL_g15 1, g5 AL_g22 1, g6 HSP_g08 2, ...
# Features are unit vectors at these angles (degrees), so the cosine ranking is the angular distance.
GALLERY_ANGLES = [0, 10, 100, 20, 30, 200, 40, 300, 310]
# Test order: AEM_g01, AEM_g02, AL_g01, AL_g02, HSP_g01, HSP_g02. The queries are the first of each
# class (positions 0, 2, 4); AEM_g02 at 200 degrees would rank g5 first if it were wrongly used.
QUERY_ANGLES = [3, 200, 34, 100, 306, 0]
# At 3: g0 3, g1 7, g3 17, g4 27, g6 37.  At 34: g4 4, g6 6, g3 14, g1 24, g0 34.
# At 306: g8 4, g7 6, g0 54, g1 64, g3 74.
EXPECTED = [(0, [0, 1, 3, 4, 6]), (2, [4, 6, 3, 1, 0]), (4, [8, 7, 0, 1, 3])]


def unit(angles) -> np.ndarray:
    radians = np.deg2rad(np.asarray(angles, dtype=float))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def strip_inputs(tmp_path_factory):
    """Real synthetic UCF101 videos, packed by `vclr data extract`, with hand-chosen features."""
    root = tmp_path_factory.mktemp("strip")
    generate_dataset("ucf101", root / "raw", seed=0, classes=3, train_per_class=3, test_per_class=2,
                     width=32, height=24, frames=6)
    assert cli_main(["data", "extract", "--dataset", "ucf101", "--videos", str(root / "raw/videos"),
                     "--out", str(root / "frames"), "--short-side", "24", "--shards", "1", "--no-progress"]) == 0
    classes = [line.split()[1] for line in (root / "raw/annotations/ucfTrainTestlist/classInd.txt")
               .read_text().splitlines()]
    train_list = (root / "raw/annotations/ucfTrainTestlist/trainlist01.txt").read_text().splitlines()
    test_list = (root / "raw/annotations/ucfTrainTestlist/testlist01.txt").read_text().splitlines()
    train = [(Path(line.split()[0]).stem, int(line.split()[1]) - 1) for line in train_list]
    test = [(Path(line).stem, classes.index(Path(line).parent.name)) for line in test_list]
    provenance = {"backbone": "resnet_tiny", "checkpoint": "random:seed=0", "checkpoint_sha256": None,
                  "num_frames": 6, "crop": 24, "class_names": {str(i): name for i, name in enumerate(classes)}}
    paths = {"gallery": root / "train.npz", "query": root / "test.npz", "frames": root / "frames", "root": root}
    for path, videos, angles in ((paths["gallery"], train, GALLERY_ANGLES), (paths["query"], test, QUERY_ANGLES)):
        save_features(path, unit(angles), [v for v, _ in videos], np.array([label for _, label in videos]),
                      provenance)
    return paths


def test_strip_rows_pick_one_query_per_class_and_rank_like_the_metric(strip_inputs):
    gallery, query = load_features(strip_inputs["gallery"]), load_features(strip_inputs["query"])
    assert gallery["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert query["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    rows = strip_rows(gallery, query, queries=3, k=5)
    assert [(row.query_id, [n.video_id for n in row.neighbours]) for row in rows] == [
        (query["video_ids"][q], [gallery["video_ids"][g] for g in ranked]) for q, ranked in EXPECTED]
    assert rows[0].query_id == "v_ApplyEyeMakeup_g01_c01" and rows[2].label == 2
    assert [[n.correct for n in row.neighbours] for row in rows] == [
        [True, True, False, False, False], [True, False, True, False, False], [True, True, False, False, False]]
    assert rows[1].neighbours[1].label == 2  # the wrong neighbour carries its own class
    short = strip_rows(gallery, query, queries=2, k=3)
    assert [len(row.neighbours) for row in short] == [3, 3] and short[1].query_id == rows[1].query_id
    assert len(strip_rows(gallery, query, queries=10, k=50)) == 3  # only three classes; k clamped to 9
    with pytest.raises(VclrError, match="must be positive"):
        strip_rows(gallery, query, queries=0)


def test_retrieval_strip_figure_and_files(strip_inputs, tmp_path):
    gallery, query, frames = strip_inputs["gallery"], strip_inputs["query"], strip_inputs["frames"]
    fig = retrieval_strip_figure(gallery, query, frames, queries=3, k=5)
    titles = [[ax.get_title() for ax in fig.axes[row * 6:(row + 1) * 6]] for row in range(3)]
    assert titles[1] == ["query: ApplyLipstick", "#1 \u2713 ApplyLipstick", "#2 \u2717 HandstandPushups",
                         "#3 \u2713 ApplyLipstick", "#4 \u2717 ApplyEyeMakeup", "#5 \u2717 ApplyEyeMakeup"]
    assert fig.axes[7].spines["top"].get_edgecolor()[:3] == pytest.approx(
        matplotlib.colors.to_rgb(figures.CORRECT))
    assert fig.axes[8].spines["top"].get_edgecolor()[:3] == pytest.approx(matplotlib.colors.to_rgb(figures.WRONG))
    # the panel shows the stored middle frame (frame 3 of 6) of that video
    from vclr.data.packed import PackedFrames
    stored = PackedFrames(frames).read_frame("v_ApplyLipstick_g15_c01", 3).permute(1, 2, 0).numpy()
    assert np.array_equal(fig.axes[7].get_images()[0].get_array(), stored)

    stem = tmp_path / "retrieval_strip"
    first = plot_retrieval_strip(gallery, query, frames, stem)
    assert_figure_files(first, stem)
    pixels = np.asarray(Image.open(first[0]).convert("RGB")).reshape(-1, 3)
    for colour in (figures.CORRECT, figures.WRONG):  # both kinds of border are drawn
        rgb = np.round(np.array(matplotlib.colors.to_rgb(colour)) * 255).astype(np.uint8)
        assert (pixels == rgb).all(axis=1).sum() > 100
    assert_same_bytes(first, plot_retrieval_strip(gallery, query, frames, tmp_path / "again" / "retrieval_strip"))


def test_retrieval_strip_label_ids_without_names_and_errors(strip_inputs, tmp_path):
    root = strip_inputs["root"]
    plain = {}
    for split in ("gallery", "query"):
        loaded = load_features(strip_inputs[split])
        provenance = {k: v for k, v in loaded["provenance"].items() if k not in ("format", "class_names")}
        plain[split] = tmp_path / f"{split}.npz"
        save_features(plain[split], loaded["features"], loaded["video_ids"], loaded["labels"], provenance)
    fig = retrieval_strip_figure(plain["gallery"], plain["query"], strip_inputs["frames"], queries=1, k=2)
    assert [ax.get_title() for ax in fig.axes] == ["query: class 0", "#1 \u2713 class 0", "#2 \u2713 class 0"]

    (tmp_path / "frames").mkdir()
    (tmp_path / "frames/shards").symlink_to(root / "frames/shards")
    (tmp_path / "frames/manifest.json").write_text((root / "frames/manifest.json").read_text()
                                                   .replace('"v_ApplyEyeMakeup_g08_c01"', '"renamed"'))
    with pytest.raises(VclrError, match="manifest.json: no video 'v_ApplyEyeMakeup_g08_c01'"):
        plot_retrieval_strip(plain["gallery"], plain["query"], tmp_path / "frames", tmp_path / "x")
    with pytest.raises(VclrError, match="absent.npz: features file not found"):
        plot_retrieval_strip(tmp_path / "absent.npz", plain["query"], strip_inputs["frames"], tmp_path / "x")
    assert not list(tmp_path.glob("x.*"))


# ----------------------------------------------------------------------------- determinism across processes

SCRIPT = """
import sys
from pathlib import Path
import matplotlib
matplotlib.rcParams["font.size"] = 30  # a caller's setting must not leak into the figure
from vclr.report import figures
import test_report_figures as t
out = Path(sys.argv[1])
logs = {"vclr": t.write_log(out / "a/log.jsonl", ("inter", "intra", "segment", "order")),
        "seco": t.write_log(out / "b/log.jsonl", ("inter", "intra"), steps=8)}
figures.plot_training_curves(logs, out / "curves")
figures.plot_ablations(t.ablation_frame(), out / "ablations", "Ablations (tiny)")
assert "matplotlib.pyplot" not in sys.modules, "pyplot imported: global figure state touched"
"""


def test_figures_are_byte_identical_in_a_fresh_process(tmp_path):
    here = tmp_path / "here"
    plot_training_curves({"vclr": write_log(here / "a/log.jsonl", ("inter", "intra", "segment", "order")),
                          "seco": write_log(here / "b/log.jsonl", ("inter", "intra"), steps=8)}, here / "curves")
    plot_ablations(ablation_frame(), here / "ablations", "Ablations (tiny)")
    there = tmp_path / "there"
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    subprocess.run([sys.executable, "-c", SCRIPT, str(there)], check=True, env=env, timeout=120)
    for name in ("curves.png", "curves.pdf", "ablations.png", "ablations.pdf"):
        assert (here / name).read_bytes() == (there / name).read_bytes(), name
