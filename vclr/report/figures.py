"""Report figures: ablation bars, pretraining curves, a retrieval picture; each as PNG and PDF.

Figures are built on `matplotlib.figure.Figure` directly (never pyplot), so no backend is chosen and
no global figure state is touched for the caller. Every figure is drawn under matplotlib's default
style plus STYLE (not the user's matplotlibrc) and saved without timestamps or version strings, so
the same inputs give byte-identical files on any machine with the pinned matplotlib: the files are
versioned by DVC and a rerun must not look like a change.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib import style as mpl_style
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from vclr.data.packed import PackedFrames
from vclr.errors import VclrError
from vclr.evaluate.feature_files import check_labelled_splits, load_feature_pair
from vclr.evaluate.retrieval import nearest_gallery
from vclr.io_utils import atomic_open
from vclr.train.losses import LOSS_TERMS

# Fixed drawing settings. Type 3 PDF fonts are written by matplotlib alone (tested byte-identical);
# the TrueType (42) path goes through fontTools subsetting, whose output we have not checked.
STYLE = {
    "savefig.dpi": 150,
    "pdf.fonttype": 3,
    "pdf.compression": 6,
    "svg.hashsalt": "vclr",
    "font.family": "DejaVu Sans",  # bundled with matplotlib: the same glyphs everywhere
    "axes.grid": True,
    "grid.alpha": 0.3,
}
# No creation date, producer or software version: these change the bytes, not the picture.
PDF_METADATA = {"Creator": None, "Producer": None, "CreationDate": None, "ModDate": None}
PNG_METADATA = {"Software": None}

MAX_POINTS = 1000  # per line: a paper-profile log has ~10^5-10^6 steps; more points only bloat the PDF
REQUIRED_LOG_KEYS = ("step", "lr", "total", "videos_per_s")  # always written by vclr/train/pretrain.py
ABLATION_COLUMNS = ("axis", "label", "run", "dataset", "metric", "mean", "std", "n", "paper_value")
CORRECT, WRONG = "#1a9850", "#d73027"  # green / red borders of the retrieval picture


@contextlib.contextmanager
def _style() -> Iterator[None]:
    """Default matplotlib settings plus STYLE, whatever the caller's rcParams; restored afterwards."""
    with mpl_style.context(["default", STYLE]):
        yield


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def figure_paths(out_stem: Path) -> list[Path]:
    """The files save_figure writes for `out_stem` (for declaring workflow outputs)."""
    out_stem = Path(out_stem)
    return [out_stem.with_name(out_stem.name + ".png"), out_stem.with_name(out_stem.name + ".pdf")]


def save_figure(fig: Figure, out_stem: Path) -> list[Path]:
    """Write out_stem.png and out_stem.pdf atomically and reproducibly; close the figure.

    `out_stem` keeps any dots in its name ("ablation.loss" -> "ablation.loss.png").
    """
    paths = figure_paths(out_stem)
    try:
        with _style():
            for path, metadata in zip(paths, (PNG_METADATA, PDF_METADATA)):
                with atomic_open(path, "wb") as handle:
                    fig.savefig(handle, format=path.suffix[1:], metadata=metadata)
    finally:
        _close(fig)
    return paths


def _close(fig: Figure) -> None:
    """Free the figure; a pyplot-managed one (a caller's) is also removed from pyplot's list."""
    if getattr(fig.canvas, "manager", None) is not None:
        import matplotlib.pyplot as plt

        plt.close(fig)
    fig.clear()


# ----------------------------------------------------------------------------- training curves


def read_training_log(path: Path) -> dict[str, np.ndarray]:
    """{key: values per step} of a pretraining log.jsonl (vclr/train/pretrain.py, one object a line).

    Every line must hold the same keys (a switched-off loss term is absent on every line) and
    strictly increasing steps: pretrain.py truncates the log on resume, so anything else is a
    concatenated or hand-edited file. Blank lines are skipped, as pretrain.py does.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise VclrError(f"{path}: training log not found") from None
    records, keys = [], None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _parse_log_line(line, f"{path}:{number}")
        if keys is None:
            keys = list(record)
        elif set(record) != set(keys):
            raise VclrError(f"{path}:{number}: keys {sorted(record)} differ from the first line's {sorted(keys)}")
        if records and record["step"] <= records[-1]["step"]:
            raise VclrError(f"{path}:{number}: step {record['step']} does not follow step {records[-1]['step']}")
        records.append(record)
    if not records:
        raise VclrError(f"{path}: empty training log (no steps)")
    return {key: np.array([record[key] for record in records], dtype=np.float64) for key in keys}


def _parse_log_line(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except ValueError as error:
        raise VclrError(f"{where}: invalid JSON ({error})") from None
    if not isinstance(record, dict):
        raise VclrError(f"{where}: a JSON object expected, got {type(record).__name__}")
    missing = [key for key in REQUIRED_LOG_KEYS if key not in record]
    if missing:
        raise VclrError(f"{where}: missing key(s) {', '.join(missing)}")
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise VclrError(f"{where}: key {key!r} is not a number ({value!r})")
    return record


def binned(steps: np.ndarray, values: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` points: means of consecutive equal-count bins of steps and of values.

    Averaging (not subsampling) keeps the trend of noisy per-step losses and throughput visible.
    """
    if len(steps) <= max_points:
        return steps, values
    starts = np.linspace(0, len(steps), max_points + 1).astype(np.int64)[:-1]
    counts = np.diff(np.append(starts, len(steps)))
    return np.add.reduceat(steps, starts) / counts, np.add.reduceat(values, starts) / counts


def _curve_panels(runs: Mapping[str, Mapping[str, np.ndarray]]) -> list[tuple[str, str]]:
    """(log key, panel title): the loss terms present in any run in LOSS_TERMS order, then the rest."""
    present = {key for columns in runs.values() for key in columns}
    panels = [(term, f"L_{term}") for term in LOSS_TERMS if term in present]
    return panels + [("total", "total loss"), ("lr", "learning rate"), ("videos_per_s", "videos / s")]


def plot_training_curves(logs: Mapping[str, Path], out_stem: Path) -> list[Path]:
    """training_curves_figure of `logs` saved as out_stem.png / .pdf."""
    return save_figure(training_curves_figure(logs), out_stem)


def training_curves_figure(logs: Mapping[str, Path]) -> Figure:
    """Pretraining curves: a panel per loss term present in any run, total loss, lr and throughput.

    `logs`: run name -> its log.jsonl; one line per run, in the mapping's order, against the step.
    """
    if not logs:
        raise VclrError("no training logs to plot")
    runs = {name: read_training_log(path) for name, path in logs.items()}
    panels = _curve_panels(runs)
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    with _style():
        fig = _new_figure(4.2 * columns, 3.0 * rows + 0.4)
        axes = fig.subplots(rows, columns, squeeze=False).ravel()
        for ax, (key, title) in zip(axes, panels):
            for color, (name, columns_of_run) in enumerate(runs.items()):
                if key in columns_of_run:
                    ax.plot(*binned(columns_of_run["step"], columns_of_run[key]), color=f"C{color % 10}",
                            linewidth=1.0, label=name)
            ax.set_title(title)
            ax.set_xlabel("step")
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        fig.legend(*axes[panels.index(("total", "total loss"))].get_legend_handles_labels(),
                   loc="outside lower center", ncols=min(4, len(runs)), fontsize="small")
    return fig


# ----------------------------------------------------------------------------- ablations


def _check_ablation_frame(frame, title: str):
    """The frame with every column, non-empty and one row per (axis, label, dataset, metric)."""
    missing = [column for column in ABLATION_COLUMNS if column not in frame.columns]
    if missing:
        raise VclrError(f"ablation frame for {title!r}: missing column(s) {', '.join(missing)}")
    if len(frame) == 0:
        raise VclrError(f"ablation frame for {title!r}: no rows")
    key = ["axis", "label", "dataset", "metric"]
    repeated = frame[frame.duplicated(key, keep=False)]
    if len(repeated):
        first = repeated.iloc[0]
        raise VclrError(f"ablation frame for {title!r}: several rows for axis {first['axis']!r}, label "
                        f"{first['label']!r}, {first['dataset']} {first['metric']}")
    return frame


def _number(value) -> float:
    """A cell as a float; missing (None, NaN, pandas NA of nullable columns) as NaN."""
    return math.nan if value is None or pd.isna(value) else float(value)


def _first_seen(values) -> list:
    return list(dict.fromkeys(values))


def _draw_ablation_axis(ax, rows, axis_name: str) -> None:
    """Groups of bars on the x axis per (dataset, metric), one bar (colour) per label; error bars
    where several seeds ran, the paper's value as a black marker on its bar."""
    labels = _first_seen(rows["label"])
    groups = _first_seen(zip(rows["dataset"], rows["metric"]))
    width = 0.8 / len(labels)
    paper_shown = False
    for row in rows.itertuples(index=False):
        position = labels.index(row.label)
        x = groups.index((row.dataset, row.metric)) + (position - (len(labels) - 1) / 2) * width
        mean, std, n, paper = (_number(value) for value in (row.mean, row.std, row.n, row.paper_value))
        if math.isfinite(mean):
            ax.bar(x, mean, width, yerr=std if n > 1 and math.isfinite(std) else None, capsize=2,
                   color=f"C{position % 10}")
        if math.isfinite(paper):
            ax.plot(x, paper, marker="D", color="black", markersize=4, linestyle="none")
            paper_shown = True
    handles = [Patch(color=f"C{position % 10}", label=str(label)) for position, label in enumerate(labels)]
    if paper_shown:
        handles.append(Line2D([], [], marker="D", color="black", markersize=4, linestyle="none", label="paper"))
    ax.set_xticks(range(len(groups)), [f"{dataset}\n{metric}" for dataset, metric in groups], fontsize="small")
    ax.set_title(axis_name)
    ax.legend(handles=handles, fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))


def plot_ablations(frame, out_stem: Path, title: str) -> list[Path]:
    """ablation_figure of `frame` saved as out_stem.png / .pdf."""
    return save_figure(ablation_figure(frame, title), out_stem)


def ablation_figure(frame, title: str) -> Figure:
    """One panel per ablation axis (in the frame's order) of a tidy frame with ABLATION_COLUMNS.

    One row per (axis, label, dataset, metric); a NaN mean draws no bar (run missing), a NaN
    paper_value no marker. `run` is not drawn (the tables trace cells to runs).
    """
    frame = _check_ablation_frame(frame, title)
    axis_names = _first_seen(frame["axis"])
    columns = min(2, len(axis_names))
    rows = math.ceil(len(axis_names) / columns)
    with _style():
        fig = _new_figure(6.0 * columns, 3.4 * rows + 0.5)
        axes = fig.subplots(rows, columns, squeeze=False).ravel()
        for ax, axis_name in zip(axes, axis_names):
            _draw_ablation_axis(ax, frame[frame["axis"] == axis_name], str(axis_name))
        for ax in axes[len(axis_names):]:
            ax.set_visible(False)
        fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- retrieval picture


class Neighbour(NamedTuple):
    video_id: str
    label: int
    correct: bool


class StripRow(NamedTuple):
    query_id: str
    label: int
    neighbours: list[Neighbour]


def strip_rows(gallery: Mapping, query: Mapping, queries: int = 3, k: int = 5) -> list[StripRow]:
    """The retrieval picture's content: which queries, their top-k gallery videos, which are right.

    gallery / query as load_features returns them. Queries: the first video (in file order, i.e.
    index order) of each distinct class, the first `queries` classes met. Ranking: nearest_gallery,
    the retrieval metric's own cosine ranking and tie-breaking.
    """
    if queries < 1 or k < 1:
        raise VclrError(f"queries and k must be positive, got {queries} and {k}")
    chosen, seen = [], set()
    for position, label in enumerate(query["labels"].tolist()):
        if label not in seen:
            seen.add(label)
            chosen.append(position)
        if len(chosen) == queries:
            break
    ranked = nearest_gallery(query["features"][chosen], gallery["features"], k)
    rows = []
    for position, neighbours in zip(chosen, ranked):
        label = int(query["labels"][position])
        rows.append(StripRow(query["video_ids"][position], label, [
            Neighbour(gallery["video_ids"][g], int(gallery["labels"][g]), int(gallery["labels"][g]) == label)
            for g in neighbours.tolist()]))
    return rows


def _middle_frames(frames_dir: Path, video_ids) -> dict[str, np.ndarray]:
    """{video id: its middle frame as an [H, W, 3] uint8 array} read from the packed frames."""
    frames = PackedFrames(frames_dir)
    try:
        return {video_id: frames.read_frame(video_id, frames.num_frames(video_id) // 2).permute(1, 2, 0).numpy()
                for video_id in video_ids}
    finally:
        frames.close()


def _cut(text: str, length: int) -> str:
    """Long names (HMDB51, SSv2 templates) cut so a panel's title does not run into the next one."""
    return text if len(text) <= length else text[:length - 1] + "\u2026"


def _class_text(label: int, names: Mapping[int, str]) -> str:
    name = names.get(label)
    return _cut(name, 20) if name else f"class {label}"


def _show_frame(ax, image: np.ndarray, title: str, video_id: str, border: str | None) -> None:
    ax.imshow(image, interpolation="antialiased")  # frames are shrunk: no aliasing
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.set_title(title, fontsize="small", color=border or "black")
    ax.set_xlabel(_cut(video_id, 28), fontsize="xx-small")
    for spine in ax.spines.values():
        spine.set_edgecolor(border or "black")
        spine.set_linewidth(4 if border else 1)


def plot_retrieval_strip(gallery_features: Path, query_features: Path, frames_dir: Path, out_stem: Path,
                         queries: int = 3, k: int = 5) -> list[Path]:
    """retrieval_strip_figure saved as out_stem.png / .pdf."""
    return save_figure(retrieval_strip_figure(gallery_features, query_features, frames_dir, queries, k), out_stem)


def retrieval_strip_figure(gallery_features: Path, query_features: Path, frames_dir: Path, queries: int = 3,
                           k: int = 5) -> Figure:
    """A row per query: its middle frame, then its top-k retrieved videos' middle frames, each with
    rank and class; right-class neighbours green with a check mark, wrong ones red with a cross.

    gallery_features / query_features: the train / test .npz of `vclr eval features` (same
    backbone and extraction, checked); frames_dir: the packed frames both splits were read from.
    """
    gallery, query, names = load_feature_pair(gallery_features, query_features)
    check_labelled_splits(gallery["features"], gallery["labels"], query["features"], query["labels"], names)
    rows = strip_rows(gallery, query, queries, k)
    images = _middle_frames(frames_dir, [video for row in rows
                                         for video in (row.query_id, *(n.video_id for n in row.neighbours))])
    columns = 1 + len(rows[0].neighbours)
    with _style():
        fig = _new_figure(1.7 * columns, 1.9 * len(rows) + 0.3)
        axes = fig.subplots(len(rows), columns, squeeze=False)
        for ax_row, row in zip(axes, rows):
            _show_frame(ax_row[0], images[row.query_id],
                        f"query: {_class_text(row.label, names)}", row.query_id, None)
            for rank, (ax, neighbour) in enumerate(zip(ax_row[1:], row.neighbours), start=1):
                mark = "\u2713" if neighbour.correct else "\u2717"
                _show_frame(ax, images[neighbour.video_id],
                            f"#{rank} {mark} {_class_text(neighbour.label, names)}", neighbour.video_id,
                            CORRECT if neighbour.correct else WRONG)
        fig.suptitle(f"top-{columns - 1} retrieval (query: test, gallery: train)", fontsize="medium")
    return fig
