"""Report tables: real metrics records -> collected numbers -> published-vs-reproduced tables, ablations,
README provenance; hand-computed mean/std/diff/status, refusals, malformed published rows, identical reruns."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from vclr.config import config_hash, load_config
from vclr.errors import VclrError
from vclr.evaluate.record import (
    PACKAGE_DIR,
    dvc_dir_md5,
    dvc_file_md5,
    git_state,
    write_metrics_record,
)
from vclr.report.collect import collect_results
from vclr.report.published import PUBLISHED_FILE, load_paper_ablations, load_published
from vclr.report.tables import (
    ablation_display,
    ablation_table,
    main_tables,
    write_readme,
    write_report_tables,
    write_table,
)

CONFIG = PACKAGE_DIR.parent / "config" / "config.yaml"
TOLERANCE = {"default": 5, "retrieval_ucf101": 10, "finetune_ssv2": 1, "finetune_ssv2_tsm": 15}


@dataclasses.dataclass(frozen=True)
class Job:  # the four attributes of vclr.matrix.Job the report reads
    name: str
    stage: str
    metrics_files: tuple[str, ...]
    meta: dict


def _meta(task, dataset, run, seed, arch=None, ablation=None, reference=True):
    random = run == "random"
    return {"task": task, "dataset": dataset, "arch": arch, "backbone": run if random else f"{run}_seed{seed}",
            "run": run, "seed": seed, "pretrain_dataset": None if random else "k400",
            "pretrain_epochs": None if random else 4, "ablation": ablation, "reference": reference}


def _job(task, dataset, run, seed, metrics, **meta):
    backbone = _meta(task, dataset, run, seed, **meta)["backbone"]
    arch = meta.get("arch")
    path = f"results/tiny/metrics/{task}/{backbone}_{dataset}{'_' + arch if arch else ''}.json"
    return Job(f"{task}_{backbone}_{dataset}", task, (path,), _meta(task, dataset, run, seed, **meta)), metrics


def _recall(r1):
    return {"recall": {"R@1": r1, "R@5": 0.9, "R@10": 0.95, "R@20": 1.0, "R@50": 1.0}, "counts": {"queries": 4}}


CASES = [
    _job("retrieval", "ucf101", "vclr_k400", 1, _recall(0.60)),
    _job("retrieval", "ucf101", "vclr_k400", 2, _recall(0.62)),
    _job("retrieval", "ucf101", "random", 0, _recall(0.20)),
    _job("retrieval", "hmdb51", "vclr_k400", 1, None),  # never ran: its file is missing
    _job("retrieval", "ucf101", "vclr_k400_noorder", 1, _recall(0.50),
         ablation={"axis": "losses", "label": "no order"}, reference=False),
    _job("retrieval", "ucf101", "vclr_k400_seg5", 1, _recall(0.65), ablation={"axis": "segments", "label": "5"},
         reference=False),
    _job("retrieval", "ucf101", "vclr_k400_seg1", 1, _recall(0.40), ablation={"axis": "segments", "label": "1"},
         reference=False),
    _job("linear_probe", "k400", "vclr_k400", 1, {"accuracy": {"top1": 0.55, "top5": 0.80, "mean_class": 0.5}}),
    _job("finetune", "ssv2", "vclr_k400", 1, {"top1": 0.40, "top5": 0.75, "mean_class": 0.375}, arch="tsm"),
    _job("localize", "anet", "vclr_k400", 1, {"AR@1": 10.0, "AR@5": 20.0, "AR@10": 30.0, "AR@100": 70.0,
                                                "AUC": 60.0}),
]
JOBS = [job for job, _ in CASES] + [Job("pretrain_vclr_k400", "pretrain", (), {"run": "vclr_k400"})]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A checkout-like root with real metrics records of CASES (profile tiny, no config)."""
    root = tmp_path_factory.mktemp("report")
    index = root / "data" / "index"
    index.mkdir(parents=True)
    (index / "test.csv").write_text("video_id,label\nv1,0\n")
    checkpoint = root / "backbone.pt"
    checkpoint.write_bytes(b"weights" * 10)
    for job, metrics in CASES:
        if metrics is None:
            continue
        random = job.meta["run"] == "random"
        write_metrics_record(root / job.metrics_files[0], task=job.stage, dataset=job.meta["dataset"], split="test",
                             protocol="knn_cosine" if job.stage == "retrieval" else "p", metrics=metrics,
                             seed=job.meta["seed"], profile="tiny", config_path=None,
                             checkpoint="random:seed=0" if random else checkpoint, index_dir=index, wall_time_s=1.5)
    return {"root": root, "checkpoint_md5": dvc_file_md5(checkpoint), "index_md5": dvc_dir_md5(index)}


@pytest.fixture(scope="module")
def results(workspace):
    return collect_results(JOBS, workspace["root"], "tiny", None)


def _row(table, **where):
    selected = table
    for column, value in where.items():
        selected = selected[selected[column] == value]
    assert len(selected) == 1, f"{where}: {len(selected)} rows"
    return selected.iloc[0]


def test_collect_percent_provenance_and_not_run(results, workspace):
    assert "pretrain" not in set(results["task"])
    r1 = results[(results["metric"] == "R@1") & (results["dataset"] == "ucf101")].set_index("job")
    assert r1.loc["retrieval_vclr_k400_seed1_ucf101", "value"] == pytest.approx(60.0)
    assert r1.loc["retrieval_random_ucf101", "value"] == pytest.approx(20.0)
    row = r1.loc["retrieval_vclr_k400_seed1_ucf101"]
    assert row["metrics_file"] == "results/tiny/metrics/retrieval/vclr_k400_seed1_ucf101.json"
    assert row["commit"] == git_state()["commit"] and row["status"] == "ok"
    assert row["checkpoint_md5"] == workspace["checkpoint_md5"] and row["index_md5"] == workspace["index_md5"]
    assert row["protocol"] == "knn_cosine" and row["split"] == "test" and row["hardware"]
    assert pd.isna(r1.loc["retrieval_random_ucf101", "checkpoint_md5"])
    probe = results[results["task"] == "linear_probe"].set_index("metric")["value"]
    assert list(probe.index) == ["top1", "top5"] and probe["top1"] == pytest.approx(55.0)
    finetune = results[results["task"] == "finetune"].set_index("metric")["value"]
    assert finetune.to_dict() == pytest.approx({"top1": 40.0, "top5": 75.0, "mean_class": 37.5})
    localize = results[results["task"] == "localize"].set_index("metric")["value"]
    assert localize["AUC"] == pytest.approx(60.0) and localize["AR@1"] == pytest.approx(10.0)  # already percent
    missing = results[results["job"] == "retrieval_vclr_k400_seed1_hmdb51"]
    assert list(missing["metric"]) == ["R@1", "R@5", "R@10", "R@20", "R@50"]
    assert set(missing["status"]) == {"not run"} and missing["value"].isna().all()
    ablation = _row(results, job="retrieval_vclr_k400_noorder_seed1_ucf101", metric="R@1")
    assert (ablation["ablation_axis"], ablation["ablation_label"], ablation["reference"]) == (
        "losses", "no order", False)


def test_refuses_other_profile_and_config_hash(workspace, tmp_path):
    job, _ = _job("retrieval", "ucf101", "vclr_k400", 3, None)
    path = tmp_path / job.metrics_files[0]
    write_metrics_record(path, task="retrieval", dataset="ucf101", split="test", protocol="knn_cosine",
                         metrics=_recall(0.5), seed=3, profile="tiny", config_path=CONFIG, checkpoint="random",
                         index_dir=None, wall_time_s=0.0)
    real_hash = config_hash(load_config(CONFIG))
    assert collect_results([job], tmp_path, "tiny", real_hash)["value"].iloc[0] == pytest.approx(50.0)
    with pytest.raises(VclrError, match=rf"{re.escape(str(path))}: config hash '{real_hash}'.*'0123456789abcdef'"):
        collect_results([job], tmp_path, "tiny", "0123456789abcdef")
    with pytest.raises(VclrError, match=rf"{re.escape(str(path))}: profile 'tiny'.*profile 'paper'"):
        collect_results([job], tmp_path, "paper", real_hash)
    wrong = dataclasses.replace(job, meta={**job.meta, "dataset": "hmdb51"})
    with pytest.raises(VclrError, match="dataset 'ucf101', but job"):
        collect_results([wrong], tmp_path, "tiny", real_hash)


def test_main_tables_hand_computed(results):
    published = load_published(PUBLISHED_FILE)
    tables = main_tables(results, published, TOLERANCE)
    assert list(tables) == ["linear_probe", "retrieval", "finetune", "localization"]
    for group, table in tables.items():  # every published row is there
        assert len(table[table["published"].notna()]) == (published["task"] == group).sum()

    retrieval = tables["retrieval"]
    ucf = _row(retrieval, dataset="ucf101", pretrain_dataset="k400", metric="R@1")
    assert (ucf["mean"], ucf["n"], ucf["published"]) == (61.0, 2, 70.6)
    assert ucf["std"] == pytest.approx(math.sqrt(2), abs=1e-4) and ucf["diff"] == pytest.approx(-9.6)
    assert ucf["Reproduced"] == "61.0 ± 1.4 (n=2)" and ucf["Difference"] == "-9.6"
    assert ucf["Status"] == "within ±10" and ucf["Random init"] == "20.0 (n=1)" and ucf["random_mean"] == 20.0
    assert ucf["Source"].startswith("official code README") and ucf["Run"] == "vclr_k400"
    hmdb = _row(retrieval, dataset="hmdb51", pretrain_dataset="k400", metric="R@1")
    assert hmdb["Status"] == "not run" and hmdb["n"] == 0 and hmdb["Reproduced"] == "" and pd.isna(hmdb["mean"])
    for dataset in ("ucf101", "hmdb51"):  # UCF101-pretrained rows: the paper gives no recipe, nothing ran
        assert _row(retrieval, dataset=dataset, pretrain_dataset="ucf101")["Status"] == "recipe unpublished"
    r5 = _row(retrieval, dataset="ucf101", metric="R@5")
    assert (r5["Status"], r5["Reproduced"], r5["Published"], r5["Protocol"]) == (
        "not published", "90.0 ± 0.0 (n=2)", "", "knn_cosine")
    assert "vclr_k400_noorder" not in set(retrieval["run"])  # ablation runs stay out of the main tables

    probe = _row(tables["linear_probe"], metric="top1")
    assert probe["diff"] == pytest.approx(-9.1) and probe["Status"] == "outside ±5"
    assert probe["Reproduced"] == "55.0 (n=1)"
    assert pd.isna(probe["std"])
    finetune = tables["finetune"]
    tsm = _row(finetune, dataset="ssv2", arch="tsm", metric="top1")  # the most specific tolerance key wins
    assert tsm["diff"] == pytest.approx(-12.0) and tsm["Status"] == "within ±15" and tsm["Dataset"] == "SSv2 TSM"
    assert _row(finetune, dataset="ssv2", arch="tsn", metric="top1")["Status"] == "not run"
    assert _row(finetune, dataset="ssv2", arch="tsm", metric="mean_class")["Status"] == "not published"
    localization = tables["localization"]
    assert _row(localization, metric="AUC")["Status"] == "outside ±5"  # 60.0 vs 65.5
    assert _row(localization, metric="AR@100")["Status"] == "within ±5"  # 70.0 vs 73.8
    for metric in ("AR@1", "AR@5", "AR@10"):
        assert _row(localization, metric=metric)["Status"] == "not published"
    with pytest.raises(VclrError, match="no 'default'"):
        main_tables(results, published, {"retrieval_ucf101": 1})


def test_ablation_table(results, tmp_path):
    empty = load_paper_ablations()  # the versioned slot: header only
    assert empty.empty and list(empty.columns) == ["axis", "label", "dataset", "metric", "value", "source"]
    labels = {"losses": "all four", "segments": "3"}
    tidy = ablation_table(results, labels, empty)
    assert list(tidy["axis"]) == ["losses"] * 2 + ["segments"] * 3
    losses = tidy[tidy["axis"] == "losses"]
    assert list(losses["label"]) == ["all four", "no order"]  # the reference first
    assert list(losses["run"]) == ["vclr_k400", "vclr_k400_noorder"]
    assert list(losses["mean"]) == [61.0, 50.0] and list(losses["n"]) == [2, 1]
    assert losses["std"].iloc[0] == pytest.approx(math.sqrt(2), abs=1e-4) and pd.isna(losses["std"].iloc[1])
    segments = tidy[tidy["axis"] == "segments"]  # numeric settings in numeric order, the reference among them
    assert list(segments["label"]) == ["1", "3", "5"] and list(segments["mean"]) == [40.0, 61.0, 65.0]
    assert set(tidy["metric"]) == {"R@1"} and set(tidy["dataset"]) == {"ucf101"} and tidy["paper_value"].isna().all()
    assert "Paper" not in ablation_display(tidy).columns
    filled = tmp_path / "paper_ablations.csv"
    filled.write_text("axis,label,dataset,metric,value,source\nlosses,no order,ucf101,R@1,48.5,paper Table 3\n"
                      "losses,no intra,ucf101,R@1,40.0,paper Table 3\nqueue,65536,ucf101,R@1,70.0,paper Table 4\n")
    tidy = ablation_table(results, labels, load_paper_ablations(filled))
    assert list(tidy["label"]) == ["all four", "no order", "no intra", "1", "3", "5", "65536"]
    assert list(tidy["paper_value"].fillna(-1)) == [-1, 48.5, 40.0, -1, -1, -1, 70.0]
    assert list(tidy["n"]) == [2, 1, 0, 1, 2, 1, 0]
    assert list(ablation_display(tidy)["Paper"]) == ["", "48.5", "40.0", "", "", "", "70.0"]


def test_an_axis_with_its_own_settings_lists_its_own_reference_first(results):
    """An axis with `settings` (e.g. the main schedule for 2D vs 3D) is compared with its own
    reference run (label None in its records), not with the grid's reference."""
    r1 = results[(results["metric"] == "R@1") & (results["dataset"] == "ucf101") & (results["status"] == "ok")
                 & results["ablation_axis"].isna()].iloc[[0]]
    own = r1.assign(job="own", run="vclr_k400_backbone_reference", ablation_axis="backbone",
                    ablation_label=None, reference=False, value=58.0)
    clips = r1.assign(job="clips", run="vclr_k400_backbone_r2plus1d", ablation_axis="backbone",
                      ablation_label="3D clips", reference=False, value=70.0)
    tidy = ablation_table(pd.concat([results, own, clips], ignore_index=True), {"backbone": "2D frames"},
                          load_paper_ablations())
    axis = tidy[tidy["axis"] == "backbone"]
    assert list(axis["label"]) == ["2D frames", "3D clips"]
    assert list(axis["run"]) == ["vclr_k400_backbone_reference", "vclr_k400_backbone_r2plus1d"]
    assert list(axis["mean"]) == [58.0, 70.0] and list(axis["n"]) == [1, 1]


def test_malformed_published_rows_name_line_and_column(tmp_path):
    lines = PUBLISHED_FILE.read_text(encoding="utf-8").splitlines()

    def edited(line_number, column, text):
        changed = list(lines)
        cells = changed[line_number - 1].split(",")
        cells[column] = text
        changed[line_number - 1] = ",".join(cells)
        path = tmp_path / "published.csv"
        path.write_text("\n".join(changed) + "\n", encoding="utf-8")
        return path

    with pytest.raises(VclrError, match=r"published\.csv:4: column 'value': 'abc' is not a number"):
        load_published(edited(4, 7, "abc"))
    with pytest.raises(VclrError, match=r"published\.csv:6: column 'pretrain_epochs': '400\.5' is not an integer"):
        load_published(edited(6, 5, "400.5"))
    with pytest.raises(VclrError, match=r"published\.csv:2: column 'task': 'linearprobe' is not one of"):
        load_published(edited(2, 0, "linearprobe"))
    with pytest.raises(VclrError, match=r"published\.csv:3: column 'metric' is empty"):
        load_published(edited(3, 6, ""))
    with pytest.raises(VclrError, match=r"published\.csv:1: header must be exactly"):
        load_published(edited(1, 7, "val"))
    with pytest.raises(VclrError, match=r"paper_ablations\.csv:2: column 'value': 'x' is not a number"):
        (tmp_path / "paper_ablations.csv").write_text("axis,label,dataset,metric,value,source\na,b,c,d,x,e\n")
        load_paper_ablations(tmp_path / "paper_ablations.csv")


def test_real_published_file():
    published = load_published(PUBLISHED_FILE)
    assert len(published) == 12 and published["source"].str.len().gt(0).all()
    assert _row(published, task="linear_probe")["value"] == 64.1
    assert _row(published, task="finetune", dataset="ssv2", protocol="tsm_8seg")["value"] == 52.0
    assert set(published["task"]) == {"linear_probe", "retrieval", "finetune", "localization"}


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _build(out: Path, results: pd.DataFrame) -> list[tuple[str, str]]:
    tables = write_report_tables(out, results, load_published(PUBLISHED_FILE), load_paper_ablations(),
                                 TOLERANCE, {"losses": "all four"}, synthetic=True)
    write_readme(out, profile="tiny", description="synthetic stand-ins", synthetic=True, tables=tables,
                 figures=[("Retrieval R@1", "figures/retrieval.png")], results=results)
    return tables


def test_files_same_values_and_identical_rerun(results, workspace, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    tables = _build(first, results)
    _build(second, collect_results(JOBS, workspace["root"], "tiny", None))
    assert [stem for _, stem in tables] == ["linear_probe", "retrieval", "finetune", "localization",
                                            "ablation_losses", "ablation_segments"]
    names = sorted(path.name for path in first.iterdir())
    assert names == sorted(path.name for path in second.iterdir()) and len(names) == 6 * 3 + 1
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    csv = pd.read_csv(first / "retrieval.csv", dtype=str, keep_default_na=False)
    shown = [column for column in csv.columns if column[:1].isupper()]
    markdown = (first / "retrieval.md").read_text().splitlines()
    assert markdown[0] == "# Video retrieval (UCF101, HMDB51)" and "Synthetic data" in markdown[2]
    table_lines = [line for line in markdown if line.startswith("|")]
    assert _cells(table_lines[0]) == shown and len(table_lines) == len(csv) + 2
    latex = (first / "retrieval.tex").read_text()
    assert all(rule in latex for rule in (r"\toprule", r"\midrule", r"\bottomrule"))
    body = latex.split("\\midrule\n")[1].split("\\bottomrule")[0].strip().splitlines()
    assert len(body) == len(csv)
    for index, row in csv.iterrows():
        expected = [row[column] for column in shown]
        assert _cells(table_lines[index + 2]) == expected
        tex = [cell.strip().replace(r"$\pm$", "±").replace(r"\_", "_").replace(r"\%", "%")
               for cell in body[index].removesuffix("\\\\").split(" & ")]
        assert tex == expected
    assert "61.0 ± 1.4 (n=2)" in csv["Reproduced"].tolist() and "61.0 $\\pm$ 1.4 (n=2)" in latex
    assert {"published", "mean", "std", "n", "diff"} <= set(csv.columns)


def test_readme_lists_every_metrics_file_and_how_to_cite(results, workspace, tmp_path):
    _build(tmp_path, results)
    readme = (tmp_path / "README.md").read_text()
    assert "Synthetic data, not comparable to the paper" in readme
    for path in results["metrics_file"].unique():
        assert f"`{path}`" in readme
    missing = next(line for line in readme.splitlines() if "vclr_k400_seed1_hmdb51.json" in line)
    assert "not run" in missing
    cite = readme.split("## How to cite")[1]
    commit = git_state()["commit"]
    assert "results/tiny/metrics/retrieval/vclr_k400_seed1_ucf101.json" in cite and "R@1 = 60.0 %" in cite
    assert commit in cite and workspace["checkpoint_md5"] in cite and workspace["index_md5"] in cite
    assert "[Video retrieval (UCF101, HMDB51)](retrieval.md)" in readme and "(figures/retrieval.png)" in readme
    assert "wall" not in readme.lower()


def test_write_table_empty_frame(tmp_path):
    frame = pd.DataFrame(columns=["Metric", "Reproduced", "mean"])
    paths = write_table(frame, tmp_path, "empty", "Empty", "")
    assert [path.name for path in paths] == ["empty.md", "empty.csv", "empty.tex"]
    assert "(no rows)" in paths[0].read_text() and paths[1].read_text() == "Metric,Reproduced,mean\n"


def test_report_builds_when_nothing_ran(tmp_path):
    results = collect_results(JOBS, tmp_path, "tiny", None)  # no record exists under tmp_path
    assert set(results["status"]) == {"not run"}
    tables = main_tables(results, load_published(PUBLISHED_FILE), TOLERANCE)
    statuses = set().union(*(set(table["Status"]) for table in tables.values()))
    assert statuses == {"not run", "recipe unpublished"}
    stems = [stem for _, stem in _build(tmp_path / "out", results)]
    assert stems == ["linear_probe", "retrieval", "finetune", "localization", "ablation_losses",
                     "ablation_segments"]
    assert "No number of profile tiny has been reproduced yet." in (tmp_path / "out" / "README.md").read_text()
    empty = collect_results([], tmp_path, "tiny", None)
    assert empty.empty and [stem for _, stem in _build(tmp_path / "none", empty)][-1] == "localization"


def test_write_table_tidy_frame_shows_every_column(results, tmp_path):
    tidy = ablation_table(results, {"losses": "all four"}, load_paper_ablations())
    markdown = write_table(tidy, tmp_path, "tidy", "Tidy", "note")[0].read_text().splitlines()
    assert _cells(markdown[4]) == list(tidy.columns)
    assert _cells(markdown[6])[:5] == ["losses", "all four", "vclr_k400", "ucf101", "R@1"]
