"""The paper tables of one profile: published vs reproduced numbers, ablations, and the README index.

Every table is one pandas frame: the columns whose names start with an upper-case letter are the
shown, formatted ones (Markdown and LaTeX), the lower-case ones the numbers behind them (kept in the
CSV with the shown ones). Outputs carry no timestamps or wall times, so a rerun on the same records
writes the same bytes. All values are in percent.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from vclr.errors import VclrError
from vclr.io_utils import atomic_write_text
from vclr.report.published import protocol_arch

# Table group (the published file's task name) -> the evaluation task of the metrics records.
GROUPS = {"linear_probe": "linear_probe", "retrieval": "retrieval", "finetune": "finetune",
          "localization": "localize"}
GROUP_TITLES = {
    "linear_probe": "Linear probe (Kinetics-400)",
    "retrieval": "Video retrieval (UCF101, HMDB51)",
    "finetune": "Fine-tuning (UCF101, HMDB51, Something-Something v2 TSN and TSM, ActivityNet)",
    "localization": "Temporal action proposals (ActivityNet, BMN)",
}
DATASET_NAMES = {"k400": "Kinetics-400", "ucf101": "UCF101", "hmdb51": "HMDB51", "ssv2": "SSv2",
                 "anet": "ActivityNet"}
MAIN_COLUMNS = ("Dataset", "Protocol", "Pretrained on", "Run", "Metric", "Published", "Source", "Reproduced",
                "Difference", "Random init", "Status", "task", "dataset", "arch", "pretrain_dataset", "run",
                "metric", "published", "mean", "std", "n", "diff", "random_mean", "random_std", "random_n",
                "tolerance")
ABLATION_COLUMNS = ("axis", "label", "run", "dataset", "metric", "mean", "std", "n", "paper_value")
# What an ablation is scored on: retrieval R@1 and, where it ran, the linear probe's top-1.
ABLATION_METRICS = {"retrieval": "R@1", "linear_probe": "top1"}
MAIN_NOTE = ("All values in percent. Published: the paper's number and its source. Reproduced: mean ± sample "
             "std (ddof=1) over seeds, n = seeds that ran. Difference: reproduced mean − published. Random "
             "init: the same evaluation of a randomly initialised backbone (the baseline). Status: within or "
             "outside the tolerance the config sets for the row; not run; recipe unpublished (the paper "
             "gives no recipe and nothing ran); not published (no paper value).")
SYNTHETIC_BANNER = "Synthetic data, not comparable to the paper."
ROUND = 4  # decimals of the numbers in the CSV (the shown ones have one)


def _text(value) -> str:
    """'' for a missing value (None / NaN), else str(value): the key form of arch / pretrain columns."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _summary(values: pd.Series) -> tuple[float, float, int]:
    """(mean, sample std (NaN for one value), n) of the values that ran."""
    values = values.dropna().astype(float)
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    return float(values.mean()), float(values.std(ddof=1)) if n > 1 else math.nan, n


def _number(value: float) -> float:
    return round(value, ROUND) if not math.isnan(value) else math.nan


def format_value(value: float, signed: bool = False) -> str:
    if math.isnan(value):
        return ""
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def format_summary(mean: float, std: float, n: int) -> str:
    """'61.2 ± 1.3 (n=2)', '61.2 (n=1)', or '' when nothing ran."""
    if n == 0:
        return ""
    return f"{mean:.1f} (n=1)" if n == 1 else f"{mean:.1f} ± {std:.1f} (n={n})"


def tolerance_for(tolerance: dict, group: str, dataset: str, arch: str) -> float:
    """Points of tolerance of a row: tolerance["<group>_<dataset>_<arch>"], else
    tolerance["<group>_<dataset>"], else tolerance["default"] (group: the published task name)."""
    for key in filter(None, (f"{group}_{dataset}_{arch}" if arch else None, f"{group}_{dataset}", "default")):
        if key in tolerance:
            value = tolerance[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise VclrError(f"tolerance {key!r}: a non-negative number of points, got {value!r}")
            return float(value)
    raise VclrError(f"tolerance: no 'default' and no {group}_{dataset}[_{arch}] entry")


def _status(n: int, published: float, source: str, diff: float, tol: float) -> str:
    if n == 0:
        return "recipe unpublished" if "recipe unpublished" in source.lower() else "not run"
    if math.isnan(published):
        return "not published"
    return f"within ±{tol:g}" if abs(diff) <= tol + 1e-9 else f"outside ±{tol:g}"


def _keyed(results: pd.DataFrame) -> pd.DataFrame:
    """results with arch / pretrain_dataset as '' where missing, so rows can be matched on them."""
    return results.assign(arch=results["arch"].map(_text), pretrain_dataset=results["pretrain_dataset"].map(_text))


def _main_row(group, key, protocol, run, values, random_values, published, source, tolerance) -> dict:
    dataset, arch, pretrain, metric = key
    mean, std, n = _summary(values["value"])
    random_mean, random_std, random_n = _summary(random_values["value"])
    diff = mean - published
    tol = tolerance_for(tolerance, group, dataset, arch) if not math.isnan(published) else math.nan
    return {
        "Dataset": DATASET_NAMES.get(dataset, dataset) + (f" {arch.upper()}" if arch else ""),
        "Protocol": protocol, "Pretrained on": DATASET_NAMES.get(pretrain, pretrain), "Run": run or "",
        "Metric": metric, "Published": format_value(published), "Source": source,
        "Reproduced": format_summary(mean, std, n), "Difference": format_value(diff, signed=True),
        "Random init": format_summary(random_mean, random_std, random_n),
        "Status": _status(n, published, source, diff, tol),
        "task": group, "dataset": dataset, "arch": arch, "pretrain_dataset": pretrain, "run": run or "",
        "metric": metric, "published": published, "mean": _number(mean), "std": _number(std), "n": n,
        "diff": _number(diff), "random_mean": _number(random_mean), "random_std": _number(random_std),
        "random_n": random_n, "tolerance": tol,
    }


def _rows_for(group, key, protocol, published, source, reference, randoms, tolerance) -> list[dict]:
    """The table rows of one (dataset, arch, pretraining dataset, metric): one per matching run group
    of `reference`, or one empty row when none matched. protocol None: the one the records name."""
    dataset, arch, pretrain, metric = key

    def select(frame):
        return frame[(frame["dataset"] == dataset) & (frame["arch"] == arch) & (frame["metric"] == metric)]

    matched = select(reference)
    matched = matched[matched["pretrain_dataset"] == pretrain]
    ran = matched[matched["status"] == "ok"]
    if protocol is None:
        protocol = next(iter(ran["protocol"]), "")
    runs = list(dict.fromkeys(matched["run"])) or [None]
    return [_main_row(group, key, protocol, run, ran[ran["run"] == run], select(randoms), published, source,
                      tolerance) for run in runs]


def main_tables(results: pd.DataFrame, published: pd.DataFrame, tolerance: dict) -> dict[str, pd.DataFrame]:
    """{group: table} for the groups of GROUPS, each with MAIN_COLUMNS.

    Rows: every published row of the group, in file order, matched to the reproduced rows of the
    reference backbones (reference True, run not "random") with the same dataset, architecture
    (a fine-tuning protocol's prefix), pretraining dataset and metric: one row per matching run
    group (mean, std, n over its seeds), or one "not run" / "recipe unpublished" row when none
    matched. Then one row per reproduced metric with no published value ("not published"), in the
    order the records came. Random init: the same task, dataset, architecture and metric of run
    "random". `results`: collect_results's frame; `published`: load_published's;
    `tolerance`: see tolerance_for.
    """
    results = _keyed(results)
    tables = {}
    for group, task in GROUPS.items():
        mine = results[results["task"] == task]
        reference = mine[mine["reference"] & (mine["run"] != "random")]
        randoms = mine[(mine["run"] == "random") & (mine["status"] == "ok")]
        rows, covered = [], set()
        for item in published[published["task"] == group].itertuples(index=False):
            key = (item.dataset, _text(protocol_arch(group, item.protocol)), item.pretrain_data, item.metric)
            covered.add(key)
            rows.extend(_rows_for(group, key, item.protocol, float(item.value), item.source, reference, randoms,
                                  tolerance))
        extra = zip(reference["dataset"], reference["arch"], reference["pretrain_dataset"], reference["metric"])
        for key in dict.fromkeys(extra):
            if key not in covered:
                rows.extend(_rows_for(group, key, None, math.nan, "", reference, randoms, tolerance))
        tables[group] = pd.DataFrame(rows, columns=list(MAIN_COLUMNS))
    return tables


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def ablation_table(results: pd.DataFrame, reference_labels: dict[str, str],
                   paper_ablations: pd.DataFrame) -> pd.DataFrame:
    """Tidy ablation frame with ABLATION_COLUMNS, one row per (axis, setting, run, dataset, metric).

    Each ablation axis (in the order the records came, then axes only the paper has) lists the
    reference run first (the axis's own reference run when the axis has its own settings, else the
    grid's own reference run - no axis, not in the main tables - or else the non-random run group of
    the main tables' backbones, pretrained on the same data as the axis's runs; labelled
    reference_labels[axis], or "reference") and then its ablation
    runs; numeric settings (segments, epochs) are sorted by value instead. Numbers: the
    ABLATION_METRICS the axis's runs have (mean, std, n over the seeds that ran). paper_value: the
    paper_ablations row of (axis, label, dataset, metric), NaN when none; paper rows that match no
    reproduced setting are listed too, with n 0."""
    results = _keyed(results)
    scored = results[results["task"].map(ABLATION_METRICS) == results["metric"]]
    ablated = scored[scored["ablation_axis"].notna()]
    paper = {(row.axis, row.label, row.dataset, row.metric): float(row.value)
             for row in paper_ablations.itertuples(index=False)}
    rows = []
    for axis in dict.fromkeys([*ablated["ablation_axis"], *paper_ablations["axis"]]):
        part = ablated[ablated["ablation_axis"] == axis]
        own_reference = part[part["ablation_label"].isna()]  # an axis with its own settings
        part = part[part["ablation_label"].notna()]
        candidates = scored[(scored["run"] != "random") & scored["ablation_axis"].isna()
                            & scored["pretrain_dataset"].isin(set(part["pretrain_dataset"]))]
        grid_base = candidates[~candidates["reference"]]  # the grid's own reference (ablations.settings)
        reference = (own_reference if len(own_reference) else
                     grid_base if len(grid_base) else candidates[candidates["reference"]])
        reference_runs = list(dict.fromkeys(reference["run"]))
        label = str(reference_labels.get(axis, "reference"))
        entries = [(label if len(reference_runs) == 1 else f"{label} ({run})", run,
                    reference[reference["run"] == run]) for run in reference_runs]
        entries += [(str(setting), run, part[(part["ablation_label"] == setting) & (part["run"] == run)])
                    for setting, run in dict.fromkeys(zip(part["ablation_label"], part["run"]))]
        if all(_is_number(setting) for setting, _, _ in entries):
            entries.sort(key=lambda entry: float(entry[0]))
        combos = list(dict.fromkeys(zip(part["task"], part["dataset"], part["metric"])))
        for setting, run, frame in entries:
            frame = frame[frame["status"] == "ok"]
            for task, dataset, metric in combos:
                mean, std, n = _summary(frame.loc[(frame["task"] == task) & (frame["dataset"] == dataset)
                                                  & (frame["metric"] == metric), "value"])
                rows.append({"axis": axis, "label": setting, "run": run, "dataset": dataset, "metric": metric,
                             "mean": _number(mean), "std": _number(std), "n": n,
                             "paper_value": paper.pop((axis, setting, dataset, metric), math.nan)})
        for key in [key for key in paper if key[0] == axis]:
            rows.append({"axis": axis, "label": key[1], "run": "", "dataset": key[2], "metric": key[3],
                         "mean": math.nan, "std": math.nan, "n": 0, "paper_value": paper.pop(key)})
    return pd.DataFrame(rows, columns=list(ABLATION_COLUMNS))


def ablation_display(tidy: pd.DataFrame) -> pd.DataFrame:
    """ablation_table rows with the shown columns Setting, Run, Dataset, Metric, Reproduced and (only
    when some paper value is filled) Paper, in front of the tidy columns."""
    shown = pd.DataFrame({
        "Setting": tidy["label"], "Run": tidy["run"],
        "Dataset": tidy["dataset"].map(lambda name: DATASET_NAMES.get(name, name)), "Metric": tidy["metric"],
        "Reproduced": [format_summary(m, s, n) for m, s, n in zip(tidy["mean"], tidy["std"], tidy["n"])],
    }, index=tidy.index)
    if tidy["paper_value"].notna().any():
        shown["Paper"] = tidy["paper_value"].map(format_value)
    return pd.concat([shown, tidy], axis=1)


def _markdown_cell(value: str) -> str:
    return value.replace("|", "\\|")


def write_table(frame: pd.DataFrame, out_dir: str | os.PathLike, stem: str, title: str, note: str,
                shown: Sequence[str] | None = None) -> list[Path]:
    """Write <stem>.md, <stem>.csv and <stem>.tex (booktabs) of one frame, atomically; returns them.

    Markdown and LaTeX show `shown` (default: the columns whose names start with an upper-case
    letter, or all when none does) as text, a missing value blank; the CSV holds every column. No timestamps: the same frame
    gives the same bytes."""
    out_dir = Path(out_dir)
    if shown is None:  # a frame with no formatted columns (a tidy one) shows all of them
        shown = [column for column in frame.columns if column[:1].isupper()] or list(frame.columns)
    shown = list(shown)
    display = frame[shown].map(_text).astype(object)
    one_line = " ".join(note.split())
    header = f"# {title}\n\n{one_line}\n\n" if one_line else f"# {title}\n\n"
    markdown = header + (display.map(_markdown_cell).to_markdown(index=False, disable_numparse=True)
                         if len(display) else "(no rows)") + "\n"
    latex = (display.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
             .to_latex(hrules=True, column_format="l" * len(shown)))
    latex = f"% {title}\n% {one_line}\n" + latex.replace("±", r"$\pm$").replace("−", "-")
    paths = [out_dir / f"{stem}.md", out_dir / f"{stem}.csv", out_dir / f"{stem}.tex"]
    atomic_write_text(paths[0], markdown)
    atomic_write_text(paths[1], frame.to_csv(index=False, lineterminator="\n"))
    atomic_write_text(paths[2], latex)
    return paths


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in str(text).lower()).strip("_") or "axis"


def write_report_tables(out_dir: str | os.PathLike, results: pd.DataFrame, published: pd.DataFrame,
                        paper_ablations: pd.DataFrame, tolerance: dict, reference_labels: dict[str, str], *,
                        synthetic: bool) -> list[tuple[str, str]]:
    """Write the four main tables and one ablation table per axis into `out_dir`; returns their
    (title, stem) in order, for write_readme."""
    banner = f"{SYNTHETIC_BANNER} " if synthetic else ""
    written = []
    for group, table in main_tables(results, published, tolerance).items():
        write_table(table, out_dir, group, GROUP_TITLES[group], banner + MAIN_NOTE)
        written.append((GROUP_TITLES[group], group))
    tidy = ablation_table(results, reference_labels, paper_ablations)
    missing_paper = ("" if len(paper_ablations) else " The paper's own ablation values could not be obtained; "
                     "they are shown here once vclr/report/paper_ablations.csv is filled.")
    for axis in dict.fromkeys(tidy["axis"]):
        part = tidy[tidy["axis"] == axis].reset_index(drop=True)
        title, stem = f"Ablation: {axis}", f"ablation_{_slug(axis)}"
        write_table(ablation_display(part), out_dir, stem, title,
                    banner + "All values in percent: mean ± sample std over seeds (n = seeds that ran); the "
                    "reference row is the main run with the grid's shared settings, or with the axis's own settings "
                    "where the axis has some (its Run column names it)." + missing_paper)
        written.append((title, stem))
    return written


def _md(value) -> str:
    return _markdown_cell(_text(value)) or "–"


def write_readme(out_dir: str | os.PathLike, *, profile: str, description: str, synthetic: bool,
                 tables: Sequence[tuple[str, str]], figures: Sequence[tuple[str, str]],
                 results: pd.DataFrame) -> Path:
    """Write <out_dir>/README.md: the index of the tables (stems, relative to out_dir) and figures
    (paths relative to out_dir), the profile and hardware, one provenance row per metrics file (its
    values, commit, checkpoint and data-index DVC md5) and a how-to-cite block. No timestamps or wall
    times: two executors with the same records write the same file."""
    out_dir = Path(out_dir)
    lines = [f"# Paper tables: profile `{profile}`", ""]
    if synthetic:
        lines += [(f"> **{SYNTHETIC_BANNER}** These numbers come from the synthetic stand-in datasets of this "
                   "profile; they test the pipeline, they do not reproduce the paper."), ""]
    lines += [f"Profile `{profile}`: {description}", "", "All values in percent.", "", "## Tables", ""]
    lines += [f"- [{title}]({stem}.md) ([CSV]({stem}.csv), [LaTeX]({stem}.tex))" for title, stem in tables]
    lines += ["", "## Figures", ""]
    lines += [f"- [{title}]({path})" for title, path in figures] or ["(none)"]
    ran = results[results["status"] == "ok"]
    counts = {}
    for name in ran.drop_duplicates("metrics_file")["hardware"]:
        counts[name] = counts.get(name, 0) + 1
    lines += ["", "## Hardware", ""]
    lines += [f"- {name} ({count} metrics files)" for name, count in counts.items()] or ["(nothing ran)"]
    header = ("| Metrics file | Task | Dataset | Run | Seed | Values | Commit | Checkpoint DVC md5 | Index DVC md5 "
              "| Hardware |")
    lines += ["", "## Provenance of every number", "",
              "One row per metrics record (`vclr.evaluate.record`); the table cells are these values.", "",
              header, "|" + "---|" * 10]
    for path, part in results.groupby("metrics_file", sort=False):
        first = part.iloc[0]
        values = ("not run" if first["status"] != "ok" else
                  ", ".join(f"{metric} {value:.2f}" for metric, value in zip(part["metric"], part["value"])))
        dataset = " ".join(filter(None, (first["dataset"], _text(first["arch"]))))
        commit = _text(first["commit"]) + (" (dirty)" if _text(first["dirty"]) == "True" else "")
        checkpoint = _text(first["checkpoint_md5"]) or ("random init" if first["status"] == "ok" else "")
        cells = (f"`{path}`", first["task"], dataset, first["run"], _md(first["seed"]), values, _md(commit),
                 _md(checkpoint), _md(first["index_md5"]), _md(first["hardware"]))
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if ran["dirty"].map(_text).eq("True").any():
        lines += ["", ("Records marked (dirty) came from code with uncommitted changes: their commit alone does "
                       "not pin the code.")]
    lines += ["", "## How to cite", "",
              ("Cite a reproduced number with its metrics file, the git commit of the code that produced it and "
               "the DVC md5 of the checkpoint and of the data index (`git checkout COMMIT` then `dvc pull` "
               "brings the same files back). A mean over seeds cites the record of each seed. For example:"),
              "", "```text"]
    cited = ran[ran["reference"] & (ran["run"] != "random")]
    cited = cited if len(cited) else ran
    if len(cited):
        row = cited.iloc[0]
        lines.append(f"VCLR reproduction, profile {profile}: {row['task']} {row['dataset']} {row['metric']} = "
                     f"{row['value']:.1f} % (run {row['run']}, seed {row['seed']}, protocol {row['protocol']}).")
        lines.append(f"Metrics record {row['metrics_file']}; code commit {_text(row['commit']) or 'unknown'}; "
                     f"checkpoint DVC md5 {_text(row['checkpoint_md5']) or 'none (random init)'}; "
                     f"data index DVC md5 {_text(row['index_md5']) or 'none'}; "
                     f"config hash {_text(row['config_hash']) or 'none'}.")
    else:
        lines.append(f"No number of profile {profile} has been reproduced yet.")
    lines += ["```", ""]
    path = out_dir / "README.md"
    atomic_write_text(path, "\n".join(lines))
    return path
