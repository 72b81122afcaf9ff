"""`vclr report build`: the profile's metrics records and run logs into paper_tables/<profile>/.

Which record belongs in which cell comes from the experiment matrix (the same job list the
pipeline runs), so a record that is missing shows as "not run" and one from another profile or
config is refused. Everything written is a pure function of the inputs (no times, no absolute
paths), so `snakemake all_tables` and `dvc repro` write identical files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from vclr.config import config_hash, load_config
from vclr.errors import VclrError
from vclr.io_utils import atomic_directory, atomic_write_text
from vclr.matrix import expand_jobs, picture_source
from vclr.report import figures
from vclr.report.collect import collect_results
from vclr.report.published import PAPER_ABLATIONS_FILE, PUBLISHED_FILE, load_paper_ablations, load_published
from vclr.report.tables import ablation_table, write_readme, write_report_tables


def build_report(config_path: str, out: Path, root: Path = Path("."), published: Path = PUBLISHED_FILE,
                 paper_ablations: Path = PAPER_ABLATIONS_FILE) -> list[Path]:
    """Write every table and figure of the profile to `out` (replaced as a whole, atomically)."""
    config = load_config(config_path)
    jobs = expand_jobs(config, config_path)
    results = collect_results(jobs, root, config["profile"], config_hash(config))
    report = config.get("report") or {}
    axes = (config.get("ablations") or {}).get("axes", {})
    reference_labels = {axis: entry["reference"] for axis, entry in axes.items()}
    paper = load_paper_ablations(paper_ablations)
    with atomic_directory(out) as staging:
        staging = Path(staging)
        tables = write_report_tables(staging, results, load_published(published), paper,
                                     report.get("tolerance", {"default": 1.0}), reference_labels,
                                     synthetic=_synthetic(config))
        shown = []  # (title, path relative to `out`)
        ablations = ablation_table(results, reference_labels, paper)
        if len(ablations):
            figures.plot_ablations(ablations, staging / "figures" / "ablations", "Ablations (R@1 / top-1, %)")
            shown.append(("Ablations: every axis, reference run first", "figures/ablations.png"))
        logs = {job.name.removeprefix("pretrain_"): root / job.meta["log"]
                for job in jobs if job.stage == "pretrain" and (root / job.meta["log"]).is_file()}
        if logs:
            write_curves(logs, staging / "curves")
            figures.plot_training_curves(logs, staging / "figures" / "training_curves")
            shown.append(("Pretraining curves: each loss term, lr, videos/s", "figures/training_curves.png"))
        picture = picture_source(config, jobs)
        if picture is not None and all((root / picture.meta[key]).exists() for key in ("gallery", "queries")):
            figures.plot_retrieval_strip(root / picture.meta["gallery"], root / picture.meta["queries"],
                                         root / picture.meta["frames"], staging / "figures" / "retrieval",
                                         queries=report.get("retrieval_picture", {}).get("queries", 3))
            shown.append((f"Retrieval: test queries and their top-5 train videos ({picture.meta['backbone']}, "
                          f"{picture.meta['dataset']}; green = same class)", "figures/retrieval.png"))
        write_readme(staging, profile=config["profile"], description=config.get("description", ""),
                     synthetic=_synthetic(config), tables=tables, figures=shown, results=results)
    return sorted(out.rglob("*"))


def write_curves(logs: dict[str, Path], folder: Path) -> None:
    """Each run's per-step log as <run>.csv (step, lr, loss terms, total, videos/s): the data behind
    the curves figure, and what `dvc plots show` draws."""
    folder.mkdir(parents=True, exist_ok=True)
    for run, path in logs.items():
        columns = figures.read_training_log(path)
        text = pd.DataFrame(columns).to_csv(index=False, float_format="%.6g", lineterminator="\n")
        atomic_write_text(folder / f"{run}.csv", text)


def _synthetic(config: dict) -> bool:
    return any(entry.get("source") == "synthetic" for entry in config["datasets"].values())


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the profile's config (as the pipeline ran it)")
    parser.add_argument("--out", required=True, type=Path, help="tables folder (paths.tables)")
    parser.add_argument("--root", type=Path, default=Path("."), help="where the results paths are relative to")
    parser.add_argument("--published", type=Path, default=PUBLISHED_FILE, help="published values CSV")
    parser.add_argument("--paper-ablations", type=Path, default=PAPER_ABLATIONS_FILE,
                        help="the paper's ablation values (CSV slot; header only until filled)")


def main(args: argparse.Namespace) -> int:
    if not args.root.is_dir():
        raise VclrError(f"--root {args.root}: not a directory")
    written = build_report(args.config, args.out, args.root, args.published, args.paper_ablations)
    print(f"wrote {args.out}: {sum(path.is_file() for path in written)} files")
    return 0
