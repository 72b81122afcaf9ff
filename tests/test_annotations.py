"""Annotation parsers: counts on the real official files, quirks, and every kind of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vclr.data.annotations import k400_key, parse_annotations
from vclr.errors import VclrError

REAL = Path(__file__).resolve().parents[2] / "shared" / "real_annotations"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real annotation files not at {REAL}")


def counts(annotations) -> dict[str, int]:
    return {split: len(entries) for split, entries in annotations.splits.items()}


# ----------------------------------------------------------------------------- real files


@needs_real
@pytest.mark.parametrize("split, train, test", [(1, 9537, 3783), (2, 9586, 3734), (3, 9624, 3696)])
def test_ucf101_real_counts(split, train, test):
    annotations = parse_annotations("ucf101", REAL / "ucf101", split)
    assert len(annotations.classes) == 101
    assert counts(annotations) == {"train": train, "test": test}


@needs_real
def test_ucf101_real_handstand_pushups_quirk():
    annotations = parse_annotations("ucf101", REAL / "ucf101", 1)
    assert annotations.classes[36] == "HandstandPushups"
    quirky = [e for e in annotations.splits["train"] if e.key.startswith("v_HandStandPushups_")]
    assert len(quirky) == 100  # SOURCES.md: 100 train lines in split 1
    assert {(e.label, e.label_name) for e in quirky} == {(36, "HandstandPushups")}
    assert all(e.label == 36 for e in annotations.splits["test"] if e.key.startswith("v_HandStandPushups_"))
    first = annotations.splits["train"][0]
    assert (first.key, first.label, first.label_name) == ("v_ApplyEyeMakeup_g08_c01", 0, "ApplyEyeMakeup")


@needs_real
def test_hmdb51_real_counts():
    annotations = parse_annotations("hmdb51", REAL / "hmdb51", 1)
    assert len(annotations.classes) == 51
    assert annotations.classes == tuple(sorted(annotations.classes))
    assert counts(annotations) == {"train": 3570, "test": 1530}
    first = annotations.splits["train"][0]
    assert (first.key, first.label_name) == ("April_09_brush_hair_u_nm_np1_ba_goo_0", "brush_hair")


@needs_real
def test_k400_real_top_level():
    annotations = parse_annotations("k400", REAL / "kinetics400")
    assert len(annotations.classes) == 400
    assert counts(annotations) == {"val": 19906, "test": 38685}
    assert {e.label for e in annotations.splits["test"]} == {-1}
    assert "massaging person's head" in annotations.classes
    assert "hurling (sport)" in annotations.classes
    first = annotations.splits["val"][0]
    assert (first.key, first.label_name) == ("0wR5jVB-WPk_000417_000427", "abseiling")


@needs_real
def test_k400_real_cvdf_and_deepmind_layouts():
    cvdf = parse_annotations("k400", REAL / "kinetics400" / "cvdf_s3_annotations")
    assert counts(cvdf) == {"test": 39805}
    assert len(cvdf.classes) == 400 and min(e.label for e in cvdf.splits["test"]) == 0
    deepmind = parse_annotations("k400", REAL / "kinetics400" / "deepmind_tarball_format_2022_snapshot")
    assert counts(deepmind)["val"] == 18035
    assert len(deepmind.classes) == 400


@needs_real
@pytest.mark.parametrize("layout, labelled_test", [("", False), ("labels_lf_layout", True)])
def test_ssv2_real(layout, labelled_test):
    annotations = parse_annotations("ssv2", REAL / "ssv2" / layout)
    assert len(annotations.classes) == 174
    assert annotations.classes[0] == "Approaching something with your camera"
    assert counts(annotations) == {"val": 24777, "test": 27157}
    first = annotations.splits["val"][0]
    assert (first.key, first.label_name) == ("74225", "Spinning something that quickly stops spinning")
    test_labels = {e.label for e in annotations.splits["test"]}
    if labelled_test:
        assert len(test_labels) == 174
        by_key = {e.key: e.label_name for e in annotations.splits["test"]}
        assert by_key["208583"] == "Moving something closer to something"
    else:
        assert test_labels == {-1}


@needs_real
def test_anet_real_bsn_files():
    annotations = parse_annotations("anet", REAL / "activitynet")
    assert len(annotations.classes) == 200
    assert annotations.classes[:2] == ("Applying sunscreen", "Arm wrestling")  # action_name.csv order
    assert counts(annotations) == {"train": 9649, "val": 4728, "test": 4851}
    segments = {split: sum(len(e.segments) for e in entries) for split, entries in annotations.splits.items()}
    assert segments == {"train": 14859, "val": 7293, "test": 0}
    video = next(e for e in annotations.splits["val"] + annotations.splits["train"] if e.key == "v_QOlSCBRmfWY")
    assert video.duration == pytest.approx(82.73)
    assert video.segments[0][:2] == pytest.approx((6.195294851794072, 77.73085420904837))
    assert annotations.classes[video.segments[0][2]] == "Ballet" == video.label_name
    assert {e.label for e in annotations.splits["test"]} == {-1}


# ----------------------------------------------------------------------------- small hand-made copies


def write(path: Path, text: str, newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))
    return path


def make_ucf(root: Path, newline: str = "\r\n") -> Path:
    lists = root / "ucfTrainTestlist"
    write(lists / "classInd.txt", "1 ApplyEyeMakeup\n2 HandstandPushups\n", newline)
    write(
        lists / "trainlist01.txt",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nHandstandPushups/v_HandStandPushups_g08_c01.avi 2\n",
        newline,
    )
    write(lists / "testlist01.txt", "HandstandPushups/v_HandStandPushups_g01_c01.avi\n", newline)
    return root


@pytest.mark.parametrize("newline", ["\r\n", "\n"])
def test_ucf101_small_crlf_and_lf(tmp_path, newline):
    annotations = parse_annotations("ucf101", make_ucf(tmp_path, newline))
    assert annotations.classes == ("ApplyEyeMakeup", "HandstandPushups")
    train, test = annotations.splits["train"], annotations.splits["test"]
    assert [(e.key, e.label, e.label_name) for e in train] == [
        ("v_ApplyEyeMakeup_g08_c01", 0, "ApplyEyeMakeup"),
        ("v_HandStandPushups_g08_c01", 1, "HandstandPushups"),
    ]
    assert [(e.key, e.label) for e in test] == [("v_HandStandPushups_g01_c01", 1)]


@pytest.mark.parametrize(
    "file, text, line, words",
    [
        ("trainlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi\n", 1, "path and label"),
        ("trainlist01.txt", "ApplyEyeMakeup/v_a.avi 1\nApplyEyeMakeup/v_b.avi one\n", 2, "not an integer"),
        ("trainlist01.txt", "ApplyEyeMakeup/v_a.avi 3\n", 1, "out of range"),
        ("trainlist01.txt", "ApplyEyeMakeup/v_a.avi 0\n", 1, "out of range"),
        ("trainlist01.txt", "ApplyEyeMakeup/v_a.avi 2\n", 1, "folder"),
        ("trainlist01.txt", "ApplyEyeMakeup/v_a.avi 1\nBoxing/v_Boxing_g01.avi 1\n", 2, "unknown class"),
        ("trainlist01.txt", "ApplyEyeMakeup/v_a.avi 1\nApplyEyeMakeup/v_a.avi 1\n", 2, "listed twice"),
        ("testlist01.txt", "ApplyEyeMakeup/v_a.avi 1 extra\n", 1, "a path"),
        ("testlist01.txt", "v_a.avi\n", 1, "<ClassName>/<video>.avi"),
        ("classInd.txt", "1 ApplyEyeMakeup\n3 HandstandPushups\n", 2, "class index 2"),
        ("classInd.txt", "1 Apply Eye Makeup\n", 1, "<index> <ClassName>"),
    ],
)
def test_ucf101_bad_lines(tmp_path, file, text, line, words):
    root = make_ucf(tmp_path)
    write(root / "ucfTrainTestlist" / file, text, "\r\n")
    with pytest.raises(VclrError) as error:
        parse_annotations("ucf101", root)
    message = str(error.value)
    assert f"{file}:{line}:" in message and words in message


def test_ucf101_files_at_top_level_and_missing_and_empty(tmp_path):
    root = make_ucf(tmp_path / "a")
    flat = tmp_path / "flat"
    shutil.copytree(root / "ucfTrainTestlist", flat)
    assert counts(parse_annotations("ucf101", flat)) == {"train": 2, "test": 1}
    (flat / "testlist01.txt").unlink()
    with pytest.raises(VclrError, match=r"looked for testlist01\.txt in .*flat"):
        parse_annotations("ucf101", flat)
    write(flat / "testlist01.txt", "\r\n")
    with pytest.raises(VclrError, match=r"testlist01\.txt: empty"):
        parse_annotations("ucf101", flat)
    with pytest.raises(VclrError, match=r"classInd\.txt in .*empty_dir"):
        (tmp_path / "empty_dir").mkdir()
        parse_annotations("ucf101", tmp_path / "empty_dir")
    with pytest.raises(VclrError, match="split must be 1, 2 or 3"):
        parse_annotations("ucf101", flat, 4)


def make_hmdb(root: Path) -> Path:
    splits = root / "testTrainMulti_7030_splits"
    write(splits / "wave_test_split1.txt", "w_a.avi 1 \nw_b.avi 2 \nw_c.avi 0 \n")
    write(splits / "clap_test_split1.txt", "c_#a(1).avi 2 \nc_b.avi 1 \n")
    return root


def test_hmdb51_small(tmp_path):
    annotations = parse_annotations("hmdb51", make_hmdb(tmp_path))
    assert annotations.classes == ("clap", "wave")
    assert [(e.key, e.label) for e in annotations.splits["train"]] == [("c_b", 0), ("w_a", 1)]
    assert [(e.key, e.label) for e in annotations.splits["test"]] == [("c_#a(1)", 0), ("w_b", 1)]
    flat = tmp_path / "flat"
    shutil.copytree(tmp_path / "testTrainMulti_7030_splits", flat)
    assert counts(parse_annotations("hmdb51", flat)) == {"train": 2, "test": 2}
    with pytest.raises(VclrError, match=r"<class>_test_split2\.txt in"):
        parse_annotations("hmdb51", flat, 2)


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("w_a.avi 1 \nw_b.avi 3 \n", 2, "not 0, 1 or 2"),
        ("w_a.avi 1 \nw_b.avi\n", 2, "expected '<video>.avi <0|1|2>'"),
        ("w_a.avi 1 \nw_b.mp4 1\n", 2, ".avi"),
        ("c_b.avi 1 \n", 1, "listed twice"),
    ],
)
def test_hmdb51_bad_lines(tmp_path, text, line, words):
    root = make_hmdb(tmp_path)
    write(root / "testTrainMulti_7030_splits" / "wave_test_split1.txt", text)
    with pytest.raises(VclrError) as error:
        parse_annotations("hmdb51", root)
    assert f"wave_test_split1.txt:{line}:" in str(error.value) and words in str(error.value)


def test_hmdb51_empty_file(tmp_path):
    root = make_hmdb(tmp_path)
    write(root / "testTrainMulti_7030_splits" / "wave_test_split1.txt", "")
    with pytest.raises(VclrError, match=r"wave_test_split1\.txt: empty"):
        parse_annotations("hmdb51", root)


K400_HEADER = "label,youtube_id,time_start,time_end,split,is_cc\n"


def test_k400_small_quoting_and_keys(tmp_path):
    write(tmp_path / "validate.csv", K400_HEADER + '"massaging person\'s head",-huT_p-r_zA,1989,1999,val,0\n'
          '"hurling (sport)",034KeIezQZ8,0,10,val,0\nabseiling,x,5,15,val,1\n', "\r\n")
    write(tmp_path / "kinetics_test.csv", "youtube_id,time_start,time_end,split\nzz,1,11,test\n")
    write(tmp_path / "sub" / "train.csv", K400_HEADER + "ignored,y,0,10,train,0\n")  # only the top level counts
    annotations = parse_annotations("k400", tmp_path)
    assert annotations.classes == ("abseiling", "hurling (sport)", "massaging person's head")
    assert [(e.key, e.label) for e in annotations.splits["val"]] == [
        ("-huT_p-r_zA_001989_001999", 2), ("034KeIezQZ8_000000_000010", 1), ("x_000005_000015", 0)
    ]
    assert [(e.key, e.label, e.label_name) for e in annotations.splits["test"]] == [("zz_000001_000011", -1, "")]
    assert k400_key("abc", 7, 1234567) == "abc_000007_1234567"


@pytest.mark.parametrize(
    "text, line, words",
    [
        (K400_HEADER + "a,x,1,11,val,0\na,y,1,11,val\n", 3, "expected 6 fields"),
        (K400_HEADER + "a,x,1.5,11,val,0\n", 2, "integers"),
        (K400_HEADER + '"a b",x,1,11,val,0\n,y,1,11,val,0\n', 3, "empty label"),
        (K400_HEADER + "a,x,1,11,val,0\na,x,1,11,val,0\n", 3, "listed twice"),
        ("label,video,start,end\na,x,1,11\n", 1, "header lacks youtube_id"),
    ],
)
def test_k400_bad_lines(tmp_path, text, line, words):
    write(tmp_path / "validate.csv", text)
    with pytest.raises(VclrError) as error:
        parse_annotations("k400", tmp_path)
    assert f"validate.csv:{line}:" in str(error.value) and words in str(error.value)


def test_k400_missing_and_empty(tmp_path):
    with pytest.raises(VclrError, match=r"looked for train\.csv.*kinetics-400_val\.csv.* in "):
        parse_annotations("k400", tmp_path)
    write(tmp_path / "test.csv", "")
    with pytest.raises(VclrError, match=r"test\.csv: empty"):
        parse_annotations("k400", tmp_path)
    write(tmp_path / "test.csv", "youtube_id,time_start,time_end,split\n")
    with pytest.raises(VclrError, match=r"test\.csv: no rows"):
        parse_annotations("k400", tmp_path)
    with pytest.raises(VclrError, match="only to ucf101 and hmdb51"):
        parse_annotations("k400", tmp_path, 1)


def make_ssv2(root: Path, answers: str | None = None) -> Path:
    write(root / "labels.json", json.dumps({"Pushing something": "1", "Putting something on something": "0"}))
    write(root / "validation.json", json.dumps([
        {"id": "5", "label": "pushing a cup", "template": "Pushing [something]", "placeholders": ["a cup"]},
        {"id": "7", "label": "putting a on b", "template": "Putting [something] on [something]", "placeholders": []},
    ]), "\r\n")
    write(root / "test.json", json.dumps([{"id": "9"}, {"id": "11"}]))
    if answers is not None:
        write(root / "test-answers.csv", answers)
    return root


def test_ssv2_small(tmp_path):
    answers = "9;Pushing something\n11;Putting something on something\n"
    annotations = parse_annotations("ssv2", make_ssv2(tmp_path, answers))
    assert annotations.classes == ("Putting something on something", "Pushing something")
    assert [(e.key, e.label) for e in annotations.splits["val"]] == [("5", 1), ("7", 0)]
    assert [(e.key, e.label) for e in annotations.splits["test"]] == [("9", 1), ("11", 0)]


@pytest.mark.parametrize(
    "file, text, words",
    [
        ("validation.json", json.dumps([{"id": "5", "template": "Pushing [something]"},
                                        {"id": "6", "template": "Pulling [something]"}]), "entry 1 (id 6)"),
        ("validation.json", json.dumps([{"id": "5"}]), "entry 0 (id 5): missing 'template'"),
        ("validation.json", json.dumps({"5": "Pushing something"}), "expected a non-empty JSON list"),
        ("validation.json", "[\n{\"id\": 1,\n", "validation.json:3: invalid JSON"),
        ("test.json", json.dumps([{"id": "9"}, {"id": "9"}]), "entry 1: video '9' is listed twice"),
        ("test.json", json.dumps([{"name": "9"}]), "entry 0: expected an object with an 'id'"),
        ("labels.json", json.dumps({"Pushing something": "x"}), "key 'Pushing something': id 'x'"),
        ("labels.json", json.dumps({"A": "0", "B": "2"}), "without gaps"),
        ("labels.json", json.dumps(["Pushing something"]), "expected a non-empty object"),
    ],
)
def test_ssv2_bad_json(tmp_path, file, text, words):
    write(make_ssv2(tmp_path) / file, text)
    with pytest.raises(VclrError) as error:
        parse_annotations("ssv2", tmp_path)
    assert file in str(error.value) and words in str(error.value)


@pytest.mark.parametrize(
    "answers, words",
    [
        ("9;Pushing something\n11\n", "test-answers.csv:2: expected '<id>;<template>'"),
        ("9;Pushing something\n11;Pulling something\n", "test-answers.csv:2: unknown class"),
        ("9;Pushing something\n", "entry 1: id 11 has no line"),
    ],
)
def test_ssv2_bad_answers(tmp_path, answers, words):
    make_ssv2(tmp_path, answers)
    with pytest.raises(VclrError) as error:
        parse_annotations("ssv2", tmp_path)
    assert words in str(error.value)


def test_ssv2_missing_files(tmp_path):
    with pytest.raises(VclrError, match=r"looked for labels\.json, something-something-v2-labels\.json in"):
        parse_annotations("ssv2", tmp_path)
    write(tmp_path / "labels.json", json.dumps({"A": "0"}))
    with pytest.raises(VclrError, match=r"looked for train\.json.*something-something-v2-test\.json in"):
        parse_annotations("ssv2", tmp_path)


def anet_official(database: dict) -> str:
    return json.dumps({"version": "VERSION 1.3", "taxonomy": [], "database": database})


ANET_DATABASE = {
    "aaa": {"subset": "training", "url": "u", "duration": 100.5, "resolution": "640x360",
            "annotations": [{"segment": [1.0, 20.0], "label": "Ballet"},
                            {"segment": [30, 40.5], "label": "Zumba"},
                            {"segment": [50, 60], "label": "Zumba"}]},
    "bbb": {"subset": "validation", "url": "u", "duration": 30, "resolution": "x",
            "annotations": [{"segment": [0.5, 3.0], "label": "Ballet"}]},
    "ccc": {"subset": "testing", "url": "u", "duration": 12.0, "resolution": "x", "annotations": []},
}


def test_anet_official_json(tmp_path):
    write(tmp_path / "activity_net.v1-3.min.json", anet_official(ANET_DATABASE))
    annotations = parse_annotations("anet", tmp_path)
    assert annotations.classes == ("Ballet", "Zumba")
    train = annotations.splits["train"][0]
    assert (train.key, train.label, train.label_name, train.duration) == ("v_aaa", 1, "Zumba", 100.5)
    assert train.segments == ((1.0, 20.0, 0), (30.0, 40.5, 1), (50.0, 60.0, 1))
    assert [(e.key, e.label, e.duration) for e in annotations.splits["test"]] == [("v_ccc", -1, 12.0)]
    write(tmp_path / "action_name.csv", "action\nZumba\nBallet\nTango\n")
    assert parse_annotations("anet", tmp_path).classes == ("Zumba", "Ballet", "Tango")


def test_anet_classes_come_from_the_taxonomy_leaves_also_when_unused(tmp_path):
    taxonomy = [
        {"nodeId": 0, "nodeName": "Root", "parentId": None, "parentName": None},
        {"nodeId": 1, "nodeName": "Dancing", "parentId": 0, "parentName": "Root"},
        {"nodeId": 2, "nodeName": "Zumba", "parentId": 1, "parentName": "Dancing"},
        {"nodeId": 3, "nodeName": "Ballet", "parentId": 1, "parentName": "Dancing"},
        {"nodeId": 4, "nodeName": "Tango", "parentId": 1, "parentName": "Dancing"},
    ]
    document = {"version": "VERSION 1.3", "taxonomy": taxonomy, "database": ANET_DATABASE}
    write(tmp_path / "activity_net.v1-3.min.json", json.dumps(document))
    assert parse_annotations("anet", tmp_path).classes == ("Ballet", "Tango", "Zumba")
    document["taxonomy"] = taxonomy[:3]  # Ballet is used but not a leaf any more
    write(tmp_path / "activity_net.v1-3.min.json", json.dumps(document))
    with pytest.raises(VclrError, match=r"activity_net\.v1-3\.min\.json: labels missing from the taxonomy"):
        parse_annotations("anet", tmp_path)


@pytest.mark.parametrize(
    "database, words",
    [
        ({"aaa": {"subset": "train", "duration": 1, "annotations": []}}, "key database.aaa: subset 'train'"),
        ({"aaa": {"subset": "testing", "duration": "1", "annotations": []}}, "key database.aaa: 'duration'"),
        ({"aaa": {"subset": "training", "duration": 9, "annotations": [{"segment": [1], "label": "B"}]}},
         "key database.aaa: annotations[0]"),
        ({}, "non-empty 'database'"),
    ],
)
def test_anet_official_bad(tmp_path, database, words):
    write(tmp_path / "activity_net.v1-3.min.json", anet_official(database))
    with pytest.raises(VclrError) as error:
        parse_annotations("anet", tmp_path)
    assert "activity_net.v1-3.min.json" in str(error.value) and words in str(error.value)


def test_anet_bsn_bad_and_missing(tmp_path):
    with pytest.raises(VclrError, match=r"looked for activity_net\.v1-3\.min\.json .*video_info_new\.csv\) in"):
        parse_annotations("anet", tmp_path)
    write(tmp_path / "anet_anno_action.json", json.dumps({"v_a": {"duration_second": 3.0, "annotations": []}}))
    write(tmp_path / "video_info_new.csv", "video,numFrame,seconds,fps,rfps,subset,featureFrame\n"
          "v_a,1,3.0,30,30,testing,1\nv_b,1,3.0,30,30,testing,1\n")
    with pytest.raises(VclrError, match=r"video_info_new\.csv:3: video v_b has no object"):
        parse_annotations("anet", tmp_path)
    write(tmp_path / "video_info_new.csv", "video,numFrame,seconds,fps,rfps,subset,featureFrame\n"
          "v_a,1,3.0,30,30,testing\n")
    with pytest.raises(VclrError, match=r"video_info_new\.csv:2: expected 7 fields"):
        parse_annotations("anet", tmp_path)
    write(tmp_path / "video_info_new.csv", "video,numFrame,seconds,fps,rfps,subset,featureFrame\n"
          "v_a,1,3.0,30,30,testing,1\n")
    write(tmp_path / "action_name.csv", "name\nBallet\n")
    with pytest.raises(VclrError, match=r"action_name\.csv:1: expected the header 'action'"):
        parse_annotations("anet", tmp_path)


def test_unknown_dataset_and_missing_dir(tmp_path):
    with pytest.raises(VclrError, match="unknown dataset"):
        parse_annotations("kinetics", tmp_path)
    with pytest.raises(VclrError, match="does not exist"):
        parse_annotations("k400", tmp_path / "nope")
