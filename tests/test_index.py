"""The index stage: split CSVs, summary counts on the real files, statuses, CLI, atomic rewrite."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vclr.cli import main as cli_main
from vclr.data.index import COLUMNS, IndexRow, build_index, read_split
from vclr.errors import VclrError

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "real_annotations"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real annotation files not at {REAL}")


def write(path: Path, text: str, newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))
    return path


def split_counts(summary: dict) -> dict[str, int]:
    return {name: counts["listed"] for name, counts in summary["splits"].items()}


# ----------------------------------------------------------------------------- real files, no frames


@needs_real
@pytest.mark.parametrize(
    "dataset, folder, split, classes, listed",
    [
        ("ucf101", "ucf101", 1, 101, {"train": 9537, "test": 3783}),
        ("ucf101", "ucf101", 2, 101, {"train": 9586, "test": 3734}),
        ("ucf101", "ucf101", 3, 101, {"train": 9624, "test": 3696}),
        ("hmdb51", "hmdb51", 1, 51, {"train": 3570, "test": 1530}),
        ("k400", "kinetics400", None, 400, {"val": 19906, "test": 38685}),
        ("k400", "kinetics400/cvdf_s3_annotations", None, 400, {"test": 39805}),
        ("ssv2", "ssv2", None, 174, {"val": 24777, "test": 27157}),
        ("anet", "activitynet", None, 200, {"train": 9649, "val": 4728, "test": 4851}),
    ],
)
def test_real_summary_counts(tmp_path, dataset, folder, split, classes, listed):
    summary = build_index(dataset, REAL / folder, None, split, tmp_path / "index")
    assert summary["dataset"] == dataset and summary["classes"] == classes
    assert split_counts(summary) == listed
    for name, counts in summary["splits"].items():  # no frames directory: everything is missing
        assert counts == {"listed": listed[name], "found": 0, "missing": listed[name], "undecodable": 0}
    assert json.loads((tmp_path / "index" / "summary.json").read_text()) == summary
    with open(tmp_path / "index" / "classes.csv", newline="") as handle:
        assert len(list(csv.reader(handle))) == classes + 1


@needs_real
def test_real_k400_test_without_labels_and_deepmind_validate(tmp_path):
    build_index("k400", REAL / "kinetics400", None, None, tmp_path / "top")
    test_rows = read_split(tmp_path / "top" / "test.csv")
    assert {row.label for row in test_rows} == {-1} and {row.label_name for row in test_rows} == {""}
    val_rows = read_split(tmp_path / "top" / "val.csv")
    labelled = next(row for row in val_rows if row.video_id == "-huT_p-r_zA_001989_001999")
    assert labelled.label_name == "massaging person's head"
    summary = build_index("k400", REAL / "kinetics400" / "deepmind_tarball_format_2022_snapshot", None, None,
                          tmp_path / "dm")
    assert split_counts(summary)["val"] == 18035


@needs_real
def test_real_ssv2_test_labels_from_answers(tmp_path):
    summary = build_index("ssv2", REAL / "ssv2" / "labels_lf_layout", None, None, tmp_path / "index")
    assert split_counts(summary) == {"val": 24777, "test": 27157}
    assert min(row.label for row in read_split(tmp_path / "index" / "test.csv")) == 0


@needs_real
def test_real_anet_segments_and_handstand_labels(tmp_path):
    build_index("anet", REAL / "activitynet", None, None, tmp_path / "anet")
    rows = {name: read_split(tmp_path / "anet" / f"{name}.csv") for name in ("train", "val", "test")}
    segments = {name: sum(len(row.segments) for row in split_rows) for name, split_rows in rows.items()}
    assert segments == {"train": 14859, "val": 7293, "test": 0}
    assert sum(segments.values()) == 22152
    assert all(row.duration is not None and row.duration > 0 for row in rows["train"])
    build_index("ucf101", REAL / "ucf101", None, 1, tmp_path / "ucf")
    quirky = [row for row in read_split(tmp_path / "ucf" / "train.csv") if "HandStandPushups" in row.video_id]
    assert len(quirky) == 100 and {(row.label, row.label_name) for row in quirky} == {(36, "HandstandPushups")}


# ----------------------------------------------------------------------------- statuses from a manifest


def make_ucf(root: Path) -> Path:
    lists = root / "ucfTrainTestlist"
    write(lists / "classInd.txt", "1 ApplyEyeMakeup\n2 HandstandPushups\n", "\r\n")
    write(lists / "trainlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n"
          "HandstandPushups/v_HandStandPushups_g08_c01.avi 2\nApplyEyeMakeup/v_ApplyEyeMakeup_g08_c02.avi 1\n", "\r\n")
    write(lists / "testlist01.txt", "HandstandPushups/v_HandStandPushups_g01_c01.avi\n", "\r\n")
    return root


def make_manifest(frames: Path, dataset: str, videos: dict[str, int], failed: list[str]) -> Path:
    """A contract-2 manifest.json written by hand (the shards themselves are not read by the index)."""
    manifest = {
        "format": "vclr-packed-frames/1",
        "dataset": dataset,
        "settings": {},
        "shards": ["shards/00000.vpk"],
        "videos": {key: {"shard": "shards/00000.vpk", "frames": n, "decoded": n, "width": 8, "height": 6}
                   for key, n in videos.items()},
        "failed": {key: {"source": f"x/{key}.avi", "reason": "moov atom not found"} for key in failed},
    }
    write(frames / "manifest.json", json.dumps(manifest))
    return frames


def test_found_missing_undecodable(tmp_path):
    frames = make_manifest(tmp_path / "frames", "ucf101",
                           {"v_HandStandPushups_g08_c01": 12, "v_Unlisted_g01_c01": 5},
                           ["v_ApplyEyeMakeup_g08_c02"])
    summary = build_index("ucf101", make_ucf(tmp_path / "raw"), frames, 1, tmp_path / "index")
    assert summary == {
        "dataset": "ucf101",
        "classes": 2,
        "splits": {
            "train": {"listed": 3, "found": 1, "missing": 1, "undecodable": 1},
            "test": {"listed": 1, "found": 0, "missing": 1, "undecodable": 0},
        },
    }
    text = (tmp_path / "index" / "train.csv").read_text()
    assert text.splitlines()[0] == ",".join(COLUMNS)
    rows = read_split(tmp_path / "index" / "train.csv")
    assert rows == [
        IndexRow("v_ApplyEyeMakeup_g08_c01", 0, "ApplyEyeMakeup", "missing", 0, "", None, []),
        IndexRow("v_HandStandPushups_g08_c01", 1, "HandstandPushups", "found", 12, "shards/00000.vpk", None, []),
        IndexRow("v_ApplyEyeMakeup_g08_c02", 0, "ApplyEyeMakeup", "undecodable", 0, "", None, []),
    ]
    assert (tmp_path / "index" / "classes.csv").read_text() == "index,name\n0,ApplyEyeMakeup\n1,HandstandPushups\n"


def test_manifest_of_another_dataset_is_refused(tmp_path):
    frames = make_manifest(tmp_path / "frames", "hmdb51", {}, [])
    with pytest.raises(VclrError, match=r"manifest\.json: key dataset is 'hmdb51', expected 'ucf101'"):
        build_index("ucf101", make_ucf(tmp_path / "raw"), frames, 1, tmp_path / "index")


def test_failed_rebuild_keeps_the_old_index(tmp_path):
    raw = make_ucf(tmp_path / "raw")
    build_index("ucf101", raw, None, 1, tmp_path / "index")
    before = {p.name: p.read_bytes() for p in (tmp_path / "index").iterdir()}
    write(raw / "ucfTrainTestlist" / "trainlist01.txt", "ApplyEyeMakeup/v_a.avi 1\nApplyEyeMakeup/v_b.avi x\n")
    with pytest.raises(VclrError, match=r"trainlist01\.txt:2: label 'x' is not an integer"):
        build_index("ucf101", raw, None, 1, tmp_path / "index")
    assert {p.name: p.read_bytes() for p in (tmp_path / "index").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "raw"]  # no temporary left behind


def test_anet_official_layout_index(tmp_path):
    database = {
        "aaa": {"subset": "training", "url": "u", "duration": 100.5, "resolution": "640x360",
                "annotations": [{"segment": [1.0, 20.25], "label": "Ballet"}, {"segment": [30, 40], "label": "Zumba"},
                                {"segment": [50, 60], "label": "Zumba"}]},
        "bbb": {"subset": "validation", "url": "u", "duration": 30, "resolution": "x",
                "annotations": [{"segment": [0.5, 3.0], "label": "Ballet"}]},
        "ccc": {"subset": "testing", "url": "u", "duration": 12.0, "resolution": "x", "annotations": []},
    }
    raw = write(tmp_path / "raw" / "activity_net.v1-3.min.json",
                json.dumps({"version": "VERSION 1.3", "taxonomy": [], "database": database})).parent
    frames = make_manifest(tmp_path / "frames", "anet", {"v_aaa": 40}, ["v_ccc"])
    summary = build_index("anet", raw, frames, None, tmp_path / "index")
    assert summary["classes"] == 2
    assert summary["splits"] == {
        "train": {"listed": 1, "found": 1, "missing": 0, "undecodable": 0},
        "val": {"listed": 1, "found": 0, "missing": 1, "undecodable": 0},
        "test": {"listed": 1, "found": 0, "missing": 0, "undecodable": 1},
    }
    [train] = read_split(tmp_path / "index" / "train.csv")
    assert train == IndexRow("v_aaa", 1, "Zumba", "found", 40, "shards/00000.vpk", 100.5,
                             [(1.0, 20.25, 0), (30.0, 40.0, 1), (50.0, 60.0, 1)])
    [test] = read_split(tmp_path / "index" / "test.csv")
    assert (test.label, test.duration, test.segments) == (-1, 12.0, [])
    with pytest.raises(VclrError, match="only to ucf101 and hmdb51"):
        build_index("anet", raw, frames, 2, tmp_path / "other")


@pytest.mark.parametrize(
    "line, words",
    [
        ("v,1,n,lost,0,,,", "status 'lost'"),
        ("v,one,n,found,3,s,,", "must be integers"),
        ("v,1,n,found,3,s,,[[1]]", "segments must be"),
        ("v,1,n,found,3,s", "expected 8 fields"),
    ],
)
def test_read_split_rejects_bad_rows(tmp_path, line, words):
    path = write(tmp_path / "train.csv", ",".join(COLUMNS) + "\nok,0,n,missing,0,,,\n" + line + "\n")
    with pytest.raises(VclrError) as error:
        read_split(path)
    assert "train.csv:3:" in str(error.value) and words in str(error.value)
    write(path, "video,label\n")
    with pytest.raises(VclrError, match=r"train\.csv:1: expected header"):
        read_split(path)


# ----------------------------------------------------------------------------- CLI


def test_cli_prints_table_and_writes_summary(tmp_path, capsys):
    raw = make_ucf(tmp_path / "raw")
    out = tmp_path / "index"
    code = cli_main(["data", "index", "--dataset", "ucf101", "--annotations", str(raw), "--split", "1",
                     "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ucf101: 2 classes" in printed
    assert [line.split() for line in printed.splitlines()[1:4]] == [
        ["split", "listed", "found", "missing", "undecodable"], ["train", "3", "0", "3", "0"],
        ["test", "1", "0", "1", "0"],
    ]
    assert json.loads((out / "summary.json").read_text())["splits"]["train"]["missing"] == 3


def test_cli_error_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vclr", "data", "index", "--dataset", "hmdb51", "--annotations", str(tmp_path),
         "--out", str(tmp_path / "index")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "looked for <class>_test_split1.txt in" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "index").exists()
