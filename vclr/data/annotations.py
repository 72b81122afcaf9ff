"""Parsers for the official annotation files of the five datasets (contract 1).

Each parser reads an annotations directory and returns one `Annotations`: the class names in the
dataset's own order and, per split, the listed videos with their label. Every defect in the input
raises `VclrError` naming the file and the line (or the JSON key / entry index), because a silently
dropped or mislabelled line would corrupt every number computed downstream.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from collections.abc import Iterator
from pathlib import Path

from vclr.errors import VclrError

DATASETS = ("k400", "ucf101", "hmdb51", "ssv2", "anet")
SPLIT_ORDER = ("train", "val", "test")  # the order splits are reported in


@dataclass(frozen=True)
class Entry:
    """One listed video. label is -1 (and label_name "") when the split file has no label."""

    key: str
    label: int
    label_name: str
    duration: float | None = None  # seconds; ActivityNet only
    segments: tuple[tuple[float, float, int], ...] = ()  # (start_s, end_s, label index); ActivityNet only


@dataclass(frozen=True)
class Annotations:
    dataset: str
    classes: tuple[str, ...]
    splits: dict[str, list[Entry]] = field(default_factory=dict)


def parse_annotations(dataset: str, annotations_dir: str | Path, split: int | None = None) -> Annotations:
    """Parse `dataset`'s official files in `annotations_dir`.

    `split` (1..3) selects the official train/test split of ucf101 and hmdb51 (default 1); the other
    datasets have a single official partition, so giving one there is an error.
    """
    annotations_dir = Path(annotations_dir)
    if not annotations_dir.is_dir():
        raise VclrError(f"annotations directory {annotations_dir} does not exist")
    if dataset in ("ucf101", "hmdb51"):
        split = 1 if split is None else split
        if split not in (1, 2, 3):
            raise VclrError(f"{dataset}: --split must be 1, 2 or 3, got {split}")
        return parse_ucf101(annotations_dir, split) if dataset == "ucf101" else parse_hmdb51(annotations_dir, split)
    if split is not None:
        raise VclrError(f"{dataset} has one official partition; --split applies only to ucf101 and hmdb51")
    if dataset == "k400":
        return parse_k400(annotations_dir)
    if dataset == "ssv2":
        return parse_ssv2(annotations_dir)
    if dataset == "anet":
        return parse_anet(annotations_dir)
    raise VclrError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------- shared helpers


def _find_file(directories: list[Path], names: list[str], required: bool = True) -> Path | None:
    """The first of `names` that exists in the first directory holding any of them."""
    for directory in directories:
        for name in names:
            if (directory / name).is_file():
                return directory / name
    if not required:
        return None
    looked = " or ".join(str(d) for d in directories)
    raise VclrError(f"missing annotation file: looked for {', '.join(names)} in {looked}")


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise VclrError(f"{path}: not UTF-8 text (byte {error.start})") from None


def _lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, line without CR/LF) for each non-blank line; an empty file is an error."""
    numbered = [(number, line.rstrip("\r")) for number, line in enumerate(_read_text(path).split("\n"), 1)]
    numbered = [(number, line) for number, line in numbered if line.strip()]
    if not numbered:
        raise VclrError(f"{path}: empty annotation file")
    return numbered


def _load_json(path: Path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise VclrError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from None


def _check_unique(seen: dict[str, str], key: str, where: str) -> None:
    if key in seen:
        raise VclrError(f"{where}: video {key!r} is listed twice (first at {seen[key]})")
    seen[key] = where


# ----------------------------------------------------------------------------- UCF101


def parse_ucf101(annotations_dir: Path, split: int) -> Annotations:
    """ucfTrainTestlist/{classInd,trainlist0N,testlist0N}.txt (or the same files directly in the dir).

    The label comes from classInd via the folder part of each path, so the official files' spelling
    `HandstandPushups/v_HandStandPushups_...` is labelled HandstandPushups while the key keeps the
    file's own spelling (it is the video file's stem).
    """
    directories = [annotations_dir / "ucfTrainTestlist", annotations_dir]
    class_file = _find_file(directories, ["classInd.txt"])
    classes: list[str] = []
    for number, line in _lines(class_file):
        fields = line.split()
        if len(fields) != 2:
            raise VclrError(f"{class_file}:{number}: expected '<index> <ClassName>', got {line!r}")
        if fields[0] != str(len(classes) + 1):
            raise VclrError(f"{class_file}:{number}: expected class index {len(classes) + 1}, got {fields[0]!r}")
        classes.append(fields[1])
    index_of = {name: i for i, name in enumerate(classes)}

    splits: dict[str, list[Entry]] = {}
    seen: dict[str, str] = {}
    for split_name, stem in (("train", "trainlist"), ("test", "testlist")):
        path = _find_file([class_file.parent], [f"{stem}{split:02d}.txt"])
        entries = []
        for number, line in _lines(path):
            where = f"{path}:{number}"
            fields = line.split()
            # trainlists carry a 1-based label; official testlists do not (some copies add one)
            allowed = (2,) if split_name == "train" else (1, 2)
            if len(fields) not in allowed:
                wanted = "path and label" if split_name == "train" else "a path"
                raise VclrError(f"{where}: expected {wanted}, got {line!r}")
            parts = fields[0].split("/")
            if len(parts) != 2 or not parts[1].endswith(".avi"):
                raise VclrError(f"{where}: expected '<ClassName>/<video>.avi', got {fields[0]!r}")
            folder, filename = parts
            if folder not in index_of:
                raise VclrError(f"{where}: unknown class {folder!r} (not in {class_file.name})")
            label = index_of[folder]
            if len(fields) == 2:
                try:
                    given = int(fields[1])
                except ValueError:
                    raise VclrError(f"{where}: label {fields[1]!r} is not an integer") from None
                if not 1 <= given <= len(classes):
                    raise VclrError(f"{where}: label {given} out of range 1..{len(classes)}")
                if given - 1 != label:
                    raise VclrError(f"{where}: label {given} is {classes[given - 1]!r} but the folder is {folder!r}")
            key = filename[: -len(".avi")]
            _check_unique(seen, key, where)
            entries.append(Entry(key, label, classes[label]))
        splits[split_name] = entries
    return Annotations("ucf101", tuple(classes), splits)


# ----------------------------------------------------------------------------- HMDB51


HMDB_SPLIT_DIR = "testTrainMulti_7030_splits"


def parse_hmdb51(annotations_dir: Path, split: int) -> Annotations:
    """testTrainMulti_7030_splits/<class>_test_split<N>.txt: '<video>.avi <0|1|2> ' (1 train, 2 test, 0 unused)."""
    suffix = f"_test_split{split}.txt"
    files: list[Path] = []
    for directory in (annotations_dir / HMDB_SPLIT_DIR, annotations_dir):
        files = sorted(p for p in directory.glob(f"*{suffix}") if p.is_file()) if directory.is_dir() else []
        if files:
            break
    if not files:
        raise VclrError(
            f"missing annotation files: looked for <class>{suffix} in "
            f"{annotations_dir / HMDB_SPLIT_DIR} or {annotations_dir}"
        )
    classes = sorted(p.name[: -len(suffix)] for p in files)
    index_of = {name: i for i, name in enumerate(classes)}
    splits: dict[str, list[Entry]] = {"train": [], "test": []}
    seen: dict[str, str] = {}
    for path in files:
        label = index_of[path.name[: -len(suffix)]]
        for number, line in _lines(path):
            where = f"{path}:{number}"
            fields = line.split()
            if len(fields) != 2:
                raise VclrError(f"{where}: expected '<video>.avi <0|1|2>', got {line!r}")
            if fields[1] not in ("0", "1", "2"):
                raise VclrError(f"{where}: split code {fields[1]!r} is not 0, 1 or 2")
            if not fields[0].endswith(".avi"):
                raise VclrError(f"{where}: expected a .avi file name, got {fields[0]!r}")
            key = fields[0][: -len(".avi")]
            _check_unique(seen, key, where)
            if fields[1] != "0":
                splits["train" if fields[1] == "1" else "test"].append(Entry(key, label, classes[label]))
    return Annotations("hmdb51", tuple(classes), splits)


# ----------------------------------------------------------------------------- Kinetics-400

# Recognised file names per split, in order of preference: CVDF / DeepMind tarball, then the 2017
# release names used by the ActivityNet crawler.
K400_FILES = {
    "train": ["train.csv", "kinetics-400_train.csv", "kinetics_train.csv"],
    "val": ["validate.csv", "val.csv", "kinetics-400_val.csv", "kinetics_val.csv"],
    "test": ["test.csv", "kinetics-400_test.csv", "kinetics_test.csv"],
}


def k400_key(youtube_id: str, time_start: int, time_end: int) -> str:
    return f"{youtube_id}_{time_start:06d}_{time_end:06d}"


def parse_k400(annotations_dir: Path) -> Annotations:
    """{train,validate,test}.csv (or kinetics-400_*/kinetics_* names) at the top level of the dir.

    Class names are the sorted unique labels of all files; a file without a label column (the 2017
    test list) gives label -1.
    """
    found = {split: _find_file([annotations_dir], names, required=False) for split, names in K400_FILES.items()}
    if not any(found.values()):
        names = [name for names in K400_FILES.values() for name in names]
        raise VclrError(f"missing annotation files: looked for {', '.join(names)} in {annotations_dir}")
    rows_by_split = {split: _read_k400_csv(path) for split, path in found.items() if path is not None}
    classes = sorted({label for rows in rows_by_split.values() for _, _, label in rows if label})
    index_of = {name: i for i, name in enumerate(classes)}
    splits = {}
    seen: dict[str, str] = {}
    for split, rows in rows_by_split.items():
        entries = []
        for where, key, label in rows:
            _check_unique(seen, key, where)
            entries.append(Entry(key, index_of[label], label) if label else Entry(key, -1, ""))
        splits[split] = entries
    return Annotations("k400", tuple(classes), splits)


def _csv_records(path: Path, required: list[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """("file:line", {column: value}) per non-empty row of a headed CSV (quoted fields via csv).

    The header must name every `required` column; a row with another field count is an error.
    """
    reader = csv.reader(_read_text(path).splitlines(keepends=True))
    header = next(reader, None)
    if header is None:
        raise VclrError(f"{path}: empty annotation file")
    missing = [name for name in required if name not in header]
    if missing:
        raise VclrError(f"{path}:1: header lacks {', '.join(missing)} (got {','.join(header)})")
    for fields in reader:
        where = f"{path}:{reader.line_num}"
        if not fields:
            continue
        if len(fields) != len(header):
            raise VclrError(f"{where}: expected {len(header)} fields ({','.join(header)}), got {len(fields)}")
        yield where, dict(zip(header, fields))


def _read_k400_csv(path: Path) -> list[tuple[str, str, str]]:
    """(location, key, label or "") per row, using the csv module for quoted labels."""
    rows = []
    for where, record in _csv_records(path, ["youtube_id", "time_start", "time_end"]):
        try:
            start, end = int(record["time_start"]), int(record["time_end"])
        except ValueError:
            raise VclrError(f"{where}: time_start/time_end must be integers") from None
        if not record["youtube_id"]:
            raise VclrError(f"{where}: empty youtube_id")
        label = record.get("label", "")
        if "label" in record and not label:
            raise VclrError(f"{where}: empty label")
        rows.append((where, k400_key(record["youtube_id"], start, end), label))
    if not rows:
        raise VclrError(f"{path}: no rows after the header")
    return rows


# ----------------------------------------------------------------------------- Something-Something v2

SSV2_FILES = {
    "labels": ["labels.json", "something-something-v2-labels.json"],
    "train": ["train.json", "something-something-v2-train.json"],
    "val": ["validation.json", "something-something-v2-validation.json"],
    "test": ["test.json", "something-something-v2-test.json"],
}


def _strip_brackets(template: str) -> str:
    return template.replace("[", "").replace("]", "")


def parse_ssv2(annotations_dir: Path) -> Annotations:
    """labels.json ({template: "id"}), {train,validation,test}.json; test labels from test-answers.csv."""
    directories = [annotations_dir, annotations_dir / "labels"]
    labels_path = _find_file(directories, SSV2_FILES["labels"])
    labels = _load_json(labels_path)
    if not isinstance(labels, dict) or not labels:
        raise VclrError(f"{labels_path}: expected a non-empty object {{template: id}}")
    by_id: dict[int, str] = {}
    for template, value in labels.items():
        try:
            class_id = int(value)
        except (TypeError, ValueError):
            raise VclrError(f"{labels_path}: key {template!r}: id {value!r} is not an integer") from None
        if class_id in by_id:
            raise VclrError(f"{labels_path}: key {template!r}: id {class_id} also used by {by_id[class_id]!r}")
        by_id[class_id] = template
    if sorted(by_id) != list(range(len(by_id))):
        raise VclrError(f"{labels_path}: ids must be 0..{len(by_id) - 1} without gaps")
    classes = tuple(by_id[i] for i in range(len(by_id)))
    index_of = {name: i for i, name in enumerate(classes)}

    splits: dict[str, list[Entry]] = {}
    seen: dict[str, str] = {}
    for split in ("train", "val", "test"):
        path = _find_file([labels_path.parent], SSV2_FILES[split], required=False)
        if path is None:
            continue
        items = _load_json(path)
        if not isinstance(items, list) or not items:
            raise VclrError(f"{path}: expected a non-empty JSON list of entries")
        answers = _read_ssv2_answers(path.parent / "test-answers.csv", index_of) if split == "test" else {}
        entries = []
        for position, item in enumerate(items):
            where = f"{path}: entry {position}"
            if not isinstance(item, dict) or not isinstance(item.get("id"), (str, int)):
                raise VclrError(f"{where}: expected an object with an 'id'")
            key = str(item["id"])
            _check_unique(seen, key, where)
            if split == "test":
                if answers and key not in answers:
                    raise VclrError(f"{where}: id {key} has no line in {path.parent / 'test-answers.csv'}")
                label = answers.get(key, -1)
            else:
                template = item.get("template")
                if not isinstance(template, str):
                    raise VclrError(f"{where} (id {key}): missing 'template'")
                name = _strip_brackets(template)
                if name not in index_of:
                    raise VclrError(f"{where} (id {key}): template {template!r} is not in {labels_path.name}")
                label = index_of[name]
            entries.append(Entry(key, label, classes[label] if label >= 0 else ""))
        splits[split] = entries
    if not splits:
        names = [name for split in ("train", "val", "test") for name in SSV2_FILES[split]]
        raise VclrError(f"missing annotation files: looked for {', '.join(names)} in {labels_path.parent}")
    return Annotations("ssv2", classes, splits)


def _read_ssv2_answers(path: Path, index_of: dict[str, int]) -> dict[str, int]:
    """test-answers.csv ('<id>;<template>' per line, no header) -> {id: label}; {} when absent."""
    if not path.is_file():
        return {}
    answers = {}
    for number, line in _lines(path):
        fields = line.split(";")
        if len(fields) != 2 or not fields[0].strip():
            raise VclrError(f"{path}:{number}: expected '<id>;<template>', got {line!r}")
        name = _strip_brackets(fields[1].strip())
        if name not in index_of:
            raise VclrError(f"{path}:{number}: unknown class {fields[1]!r}")
        answers[fields[0].strip()] = index_of[name]
    return answers


# ----------------------------------------------------------------------------- ActivityNet v1.3

ANET_OFFICIAL = "activity_net.v1-3.min.json"
ANET_SUBSETS = {"training": "train", "validation": "val", "testing": "test"}


def parse_anet(annotations_dir: Path) -> Annotations:
    """The official database JSON, or else the BSN/BMN files (anet_anno_action.json + video_info_new.csv).

    Keys are `v_<youtube_id>`. A video's label is its most frequent segment label (11 of the real
    videos mix two related classes); unannotated (test) videos get -1.
    """
    official = annotations_dir / ANET_OFFICIAL
    bsn_json, bsn_csv = annotations_dir / "anet_anno_action.json", annotations_dir / "video_info_new.csv"
    leaves: list[str] = []
    if official.is_file():
        videos, leaves = _read_anet_official(official)
    elif bsn_json.is_file() and bsn_csv.is_file():
        videos = _read_anet_bsn(bsn_json, bsn_csv)
    else:
        raise VclrError(
            f"missing annotation files: looked for {ANET_OFFICIAL} (or anet_anno_action.json with "
            f"video_info_new.csv) in {annotations_dir}"
        )
    action_names = annotations_dir / "action_name.csv"
    used = {label for _, _, _, segments, _ in videos for _, _, label in segments}
    if action_names.is_file():
        classes = _read_action_names(action_names)
        unknown = used - set(classes)
        if unknown:
            raise VclrError(f"{action_names}: lacks labels used in the annotations: {sorted(unknown)[:5]}")
    elif leaves:  # the official taxonomy names every class, also one no video of a split uses
        classes = sorted(leaves)
        unknown = used - set(classes)
        if unknown:
            raise VclrError(f"{official}: labels missing from the taxonomy's leaves: {sorted(unknown)[:5]}")
    else:
        classes = sorted(used)
    index_of = {name: i for i, name in enumerate(classes)}
    splits: dict[str, list[Entry]] = {}
    seen: dict[str, str] = {}
    for key, subset, duration, segments, where in videos:
        _check_unique(seen, key, where)
        indexed = tuple((start, end, index_of[label]) for start, end, label in segments)
        if indexed:
            counts = Counter(label for _, _, label in indexed)
            top = max(counts.values())
            label = next(label for _, _, label in indexed if counts[label] == top)
            entry = Entry(key, label, classes[label], duration, indexed)
        else:
            entry = Entry(key, -1, "", duration, ())
        splits.setdefault(subset, []).append(entry)
    ordered = {split: splits[split] for split in SPLIT_ORDER if split in splits}
    return Annotations("anet", tuple(classes), ordered)


def _anet_segments(annotations, where: str) -> list[tuple[float, float, str]]:
    if not isinstance(annotations, list):
        raise VclrError(f"{where}: 'annotations' must be a list")
    segments = []
    for i, annotation in enumerate(annotations):
        segment = annotation.get("segment") if isinstance(annotation, dict) else None
        label = annotation.get("label") if isinstance(annotation, dict) else None
        if (
            not isinstance(segment, list)
            or len(segment) != 2
            or not all(isinstance(t, (int, float)) for t in segment)
            or not isinstance(label, str)
        ):
            raise VclrError(f"{where}: annotations[{i}] must be {{segment: [start_s, end_s], label}}")
        segments.append((float(segment[0]), float(segment[1]), label))
    return segments


def _taxonomy_leaves(taxonomy, path: Path) -> list[str]:
    """Names of the taxonomy's leaf nodes (the 200 classes of v1.3); [] when there is none."""
    if taxonomy is None:
        return []
    if not isinstance(taxonomy, list) or not all(
        isinstance(node, dict) and "nodeId" in node and "nodeName" in node for node in taxonomy
    ):
        raise VclrError(f"{path}: key taxonomy: expected a list of {{nodeId, nodeName, parentId, ...}}")
    parents = {node.get("parentId") for node in taxonomy}
    return [node["nodeName"] for node in taxonomy if node["nodeId"] not in parents]


def _read_anet_official(path: Path) -> tuple[list[tuple[str, str, float, list, str]], list[str]]:
    data = _load_json(path)
    database = data.get("database") if isinstance(data, dict) else None
    if not isinstance(database, dict) or not database:
        raise VclrError(f"{path}: expected an object with a non-empty 'database' object")
    videos = []
    for youtube_id, info in database.items():
        where = f"{path}: key database.{youtube_id}"
        if not isinstance(info, dict):
            raise VclrError(f"{where}: expected an object")
        subset = info.get("subset")
        if subset not in ANET_SUBSETS:
            raise VclrError(f"{where}: subset {subset!r} is not one of {', '.join(ANET_SUBSETS)}")
        duration = info.get("duration")
        if not isinstance(duration, (int, float)):
            raise VclrError(f"{where}: 'duration' must be a number")
        segments = _anet_segments(info.get("annotations", []), where)
        videos.append((f"v_{youtube_id}", ANET_SUBSETS[subset], float(duration), segments, where))
    return videos, _taxonomy_leaves(data.get("taxonomy"), path)


def _read_anet_bsn(json_path: Path, csv_path: Path) -> list[tuple[str, str, float, list, str]]:
    data = _load_json(json_path)
    if not isinstance(data, dict) or not data:
        raise VclrError(f"{json_path}: expected a non-empty object keyed by v_<youtube_id>")
    videos = []
    for where, record in _csv_records(csv_path, ["video", "subset"]):
        key, subset = record["video"], record["subset"]
        if subset not in ANET_SUBSETS:
            raise VclrError(f"{where}: subset {subset!r} is not one of {', '.join(ANET_SUBSETS)}")
        info = data.get(key)
        json_where = f"{json_path}: key {key}"
        if not isinstance(info, dict):
            raise VclrError(f"{where}: video {key} has no object in {json_path.name}")
        duration = info.get("duration_second")
        if not isinstance(duration, (int, float)):
            raise VclrError(f"{json_where}: 'duration_second' must be a number")
        segments = _anet_segments(info.get("annotations", []), json_where)
        videos.append((key, ANET_SUBSETS[subset], float(duration), segments, where))
    if not videos:
        raise VclrError(f"{csv_path}: no rows after the header")
    return videos


def _read_action_names(path: Path) -> list[str]:
    lines = _lines(path)
    if lines[0][1].strip() != "action":
        raise VclrError(f"{path}:{lines[0][0]}: expected the header 'action'")
    names = [line.strip() for _, line in lines[1:]]
    if len(set(names)) != len(names):
        raise VclrError(f"{path}: a class name is listed twice")
    return names
