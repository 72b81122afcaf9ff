"""The published numbers the report compares against: two versioned CSV files, checked row by row.

published_results.csv holds the paper's headline numbers with their sources (a copy of
spec/reference_results.csv); paper_ablations.csv is the slot for the paper's ablation values, which
could not be obtained (header only until someone fills it). Values are in percent. An edited file
with a malformed row is an error that names the file, the line and the column.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pandas as pd

from vclr.errors import VclrError

PACKAGE_DIR = Path(__file__).resolve().parent
PUBLISHED_FILE = PACKAGE_DIR / "published_results.csv"
PAPER_ABLATIONS_FILE = PACKAGE_DIR / "paper_ablations.csv"

PUBLISHED_COLUMNS = ("task", "dataset", "protocol", "backbone", "pretrain_data", "pretrain_epochs", "metric",
                     "value", "source")
ABLATION_COLUMNS = ("axis", "label", "dataset", "metric", "value", "source")
# The four table groups, in the published file's task names (the evaluation job's "localize" is
# "localization" here).
TASKS = ("linear_probe", "retrieval", "finetune", "localization")
FINETUNE_ARCHS = ("tsn", "tsm")


def protocol_arch(task: str, protocol: str) -> str | None:
    """The fine-tuning architecture of a published row: its protocol's prefix (tsm_8seg -> tsm);
    None for the other tasks, whose protocols name no architecture."""
    return protocol.split("_", 1)[0] if task == "finetune" else None


def _rows(path: Path, columns: tuple[str, ...]):
    """(line number, {column: text}) of every non-blank row, after an exact header check."""
    if not path.is_file():
        raise VclrError(f"{path}: file not found")
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(cell.strip() for cell in header) != columns:
            raise VclrError(f"{path}:1: header must be exactly {','.join(columns)}; got "
                            f"{','.join(header) if header else '(empty file)'}")
        for cells in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(columns):
                raise VclrError(f"{path}:{line}: {len(cells)} columns, expected {len(columns)} "
                                f"({','.join(columns)})")
            yield line, {name: cell.strip() for name, cell in zip(columns, cells)}


def _number(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise VclrError(f"{path}:{line}: column {column!r}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise VclrError(f"{path}:{line}: column {column!r}: {text!r} is not a finite number")
    return value


def _required(path: Path, line: int, row: dict, columns: tuple[str, ...]) -> None:
    for column in columns:
        if not row[column]:
            raise VclrError(f"{path}:{line}: column {column!r} is empty")


def load_published(path: str | os.PathLike = PUBLISHED_FILE) -> pd.DataFrame:
    """The published results as a frame with PUBLISHED_COLUMNS, in file order (value: float in
    percent, pretrain_epochs: int). Every row is checked: known task, the text columns non-empty,
    numeric value, integer epochs, a fine-tuning protocol starting with tsn_/tsm_, no two rows for
    one (task, dataset, protocol, pretrain_data, metric)."""
    path = Path(path)
    records, seen = [], {}
    for line, row in _rows(path, PUBLISHED_COLUMNS):
        if row["task"] not in TASKS:
            raise VclrError(f"{path}:{line}: column 'task': {row['task']!r} is not one of {', '.join(TASKS)}")
        _required(path, line, row, ("dataset", "protocol", "backbone", "pretrain_data", "metric", "source"))
        value = _number(path, line, "value", row["value"])
        try:
            epochs = int(row["pretrain_epochs"])
        except ValueError:
            raise VclrError(f"{path}:{line}: column 'pretrain_epochs': {row['pretrain_epochs']!r} is not an "
                            f"integer") from None
        if row["task"] == "finetune" and protocol_arch("finetune", row["protocol"]) not in FINETUNE_ARCHS:
            raise VclrError(f"{path}:{line}: column 'protocol': a fine-tuning protocol starts with "
                            f"{' or '.join(a + '_' for a in FINETUNE_ARCHS)}, got {row['protocol']!r}")
        key = (row["task"], row["dataset"], row["protocol"], row["pretrain_data"], row["metric"])
        if key in seen:
            raise VclrError(f"{path}:{line}: the same task, dataset, protocol, pretrain_data and metric as "
                            f"line {seen[key]}")
        seen[key] = line
        records.append({**row, "value": value, "pretrain_epochs": epochs})
    frame = pd.DataFrame(records, columns=list(PUBLISHED_COLUMNS))
    return frame.astype({"value": float, "pretrain_epochs": int})


def load_paper_ablations(path: str | os.PathLike = PAPER_ABLATIONS_FILE) -> pd.DataFrame:
    """The paper's ablation values (ABLATION_COLUMNS; value: float in percent); a header-only file
    gives an empty frame. Rows are checked like load_published's."""
    path = Path(path)
    records, seen = [], {}
    for line, row in _rows(path, ABLATION_COLUMNS):
        _required(path, line, row, ("axis", "label", "dataset", "metric", "source"))
        value = _number(path, line, "value", row["value"])
        key = (row["axis"], row["label"], row["dataset"], row["metric"])
        if key in seen:
            raise VclrError(f"{path}:{line}: the same axis, label, dataset and metric as line {seen[key]}")
        seen[key] = line
        records.append({**row, "value": value})
    return pd.DataFrame(records, columns=list(ABLATION_COLUMNS)).astype({"value": float})
