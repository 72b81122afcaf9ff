"""Metrics records: one JSON per evaluation with everything that makes its numbers citable.

DESIGN.md ("Records that make a number citable"): task, dataset, split, protocol, metric values,
seed, profile, config hash, git commit, DVC hash of the checkpoint and of the data index, hardware,
wall time. The DVC hashes are computed the way DVC 3 computes them (md5 of a file's bytes; for a
directory, md5 of DVC's JSON listing of {md5, relpath} sorted by relpath, plus ".dir"), so a record
can be matched against dvc.lock or fetched with `dvc pull` / `dvc get` without DVC running here.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from vclr.errors import VclrError
from vclr.io_utils import atomic_write_text

RECORD_FORMAT = "vclr-metrics/1"
SNAKEMAKE_MARKER = ".snakemake_timestamp"  # Snakemake's file in every directory output (a time, not data)
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the vclr package: the code behind the numbers
# Every record has these keys; the nested ones as "parent.child".
REQUIRED_KEYS = (
    "format", "task", "dataset", "split", "protocol", "metrics", "seed", "profile",
    "config", "config.path", "config.hash",
    "code", "code.commit", "code.dirty", "code.reason",
    "checkpoint", "checkpoint.path", "checkpoint.dvc_md5", "checkpoint.reason",
    "data_index", "data_index.path", "data_index.dvc_md5", "data_index.reason",
    "hardware", "wall_time_s", "created", "extra",
)


def dvc_file_md5(path: str | os.PathLike) -> str:
    """DVC 3's hash of a file: the md5 of its bytes (DVC 2's dos2unix text normalisation is gone)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def dvc_dir_md5(path: str | os.PathLike) -> str:
    """DVC 3's hash of a directory (what `dvc add DIR` writes into DIR.dvc as `md5`).

    The md5 of json.dumps([{"md5": <file md5>, "relpath": <posix path>}, ...] sorted by relpath,
    sort_keys=True) with ".dir" appended. Only files count (empty folders do not, as in DVC), and not
    Snakemake's time marker in directory outputs: a record must not depend on which executor ran.
    """
    root = Path(path)
    entries = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name == SNAKEMAKE_MARKER:
                continue
            file = Path(folder) / name
            entries.append({"md5": dvc_file_md5(file), "relpath": file.relative_to(root).as_posix()})
    entries.sort(key=lambda entry: entry["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"


def dvc_hash(path: str | os.PathLike | None, what: str) -> dict:
    """{"path", "dvc_md5", "reason"} of a file or directory; dvc_md5 is null (with a reason) when
    there is nothing to hash: no path, or a random initialisation ("random" / "random:seed=N")."""
    if path is None:
        return {"path": None, "dvc_md5": None, "reason": f"no {what}"}
    if str(path) == "random" or str(path).startswith("random:"):
        return {"path": str(path), "dvc_md5": None, "reason": "random initialisation, no file"}
    resolved = Path(path).resolve()
    if resolved.is_dir():
        return {"path": str(resolved), "dvc_md5": dvc_dir_md5(resolved), "reason": None}
    if resolved.is_file():
        return {"path": str(resolved), "dvc_md5": dvc_file_md5(resolved), "reason": None}
    raise VclrError(f"{path}: {what} not found (cannot hash it for the metrics record)")


def _git(directory: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(directory), *argv], check=False, capture_output=True, text=True,
                          timeout=60)


def git_state(directory: str | os.PathLike = PACKAGE_DIR) -> dict:
    """{"repo", "commit", "dirty", "reason"} of the checkout holding `directory`.

    `dirty` covers `directory` only (tracked changes and untracked, non-ignored files): the code. The
    rest of the checkout holds outputs the pipeline itself rewrites (results/), which would otherwise
    mark every record dirty. Not a checkout (or no git): commit and dirty null, reason says why.
    """
    directory = Path(directory).resolve()
    try:
        top = _git(directory, "rev-parse", "--show-toplevel")
        head = _git(directory, "rev-parse", "HEAD") if top.returncode == 0 else top
    except FileNotFoundError:
        return {"repo": None, "commit": None, "dirty": None, "reason": "git is not installed"}
    except subprocess.TimeoutExpired:
        return {"repo": None, "commit": None, "dirty": None, "reason": "git timed out"}
    if head.returncode != 0:
        reason = (head.stderr.strip().splitlines() or ["git rev-parse failed"])[-1]
        return {"repo": None, "commit": None, "dirty": None, "reason": f"{directory}: {reason}"}
    status = _git(directory, "status", "--porcelain", "--", ".")
    return {"repo": top.stdout.strip(), "commit": head.stdout.strip(),
            "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None,
            "dirty_scope": str(directory),
            "reason": None if status.returncode == 0 else f"git status failed: {status.stderr.strip()}"}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_info() -> dict:
    """CPU model and cores, GPU names and count, torch / CUDA / cuDNN versions, Python, OS."""
    import torch

    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": _cpu_model(), "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(), "gpu_count": len(gpus), "gpus": gpus,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "python": platform.python_version(), "platform": platform.platform(),
    }


def config_provenance(config_path: str | os.PathLike | None) -> tuple[dict, dict | None]:
    """({"path", "hash"}, the loaded config or None): vclr.config.config_hash of the validated file."""
    if config_path is None:
        return {"path": None, "hash": None}, None
    from vclr.config import config_hash, load_config

    config = load_config(config_path)
    return {"path": str(Path(config_path).resolve()), "hash": config_hash(config)}, config


def _json_default(value):
    if getattr(value, "ndim", 0) == 0 and callable(getattr(value, "item", None)):  # numpy/torch scalars
        return value.item()
    tolist = getattr(value, "tolist", None)  # numpy arrays, tensors
    if callable(tolist):
        return tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_metrics_record(path: str | os.PathLike, *, task: str, dataset: str, split: str, protocol: str,
                         metrics: dict, seed: int | None, profile: str | None,
                         config_path: str | os.PathLike | None, checkpoint: str | os.PathLike | None,
                         index_dir: str | os.PathLike | None, wall_time_s: float,
                         extra: dict | None = None) -> dict:
    """Write one metrics record to `path` atomically (nothing is written if anything fails) and
    return it. `checkpoint`: file, "random[:seed=N]" or None; `index_dir`: the dataset's index folder
    (data/index/<dataset>) or None. A config whose `profile` differs from `profile` is an error."""
    for name, value in (("task", task), ("dataset", dataset), ("split", split), ("protocol", protocol)):
        if not isinstance(value, str) or not value:
            raise VclrError(f"{path}: record field {name!r} must be a non-empty string, got {value!r}")
    if not isinstance(metrics, dict) or not metrics:
        raise VclrError(f"{path}: record field 'metrics' must be a non-empty mapping")
    config, loaded = config_provenance(config_path)
    if loaded is not None and profile is not None and loaded.get("profile") != profile:
        raise VclrError(f"{path}: profile {profile!r} but {config_path} is profile {loaded.get('profile')!r}")
    record = {
        "format": RECORD_FORMAT, "task": task, "dataset": dataset, "split": split, "protocol": protocol,
        "metrics": metrics, "seed": seed, "profile": profile, "config": config, "code": git_state(),
        "checkpoint": dvc_hash(checkpoint, "checkpoint"), "data_index": dvc_hash(index_dir, "data index"),
        "hardware": hardware_info(), "wall_time_s": float(wall_time_s),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "extra": extra or {},
    }
    try:  # serialise fully before opening the file: a bad value leaves no file behind
        text = json.dumps(record, indent=2, allow_nan=False, default=_json_default) + "\n"
    except (TypeError, ValueError) as error:
        raise VclrError(f"{path}: metrics record is not valid JSON ({error}; NaN/inf are not allowed)") from None
    atomic_write_text(path, text)
    return json.loads(text)


def read_metrics_record(path: str | os.PathLike) -> dict:
    """Load a metrics record; VclrError naming the file and the first missing or malformed key."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VclrError(f"{path}: metrics record not found") from None
    except ValueError as error:
        raise VclrError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise VclrError(f"{path}: a metrics record is a JSON object, got {type(record).__name__}")
    for key in REQUIRED_KEYS:
        parent, _, child = key.partition(".")
        holder = record if not child else record.get(parent)
        if not isinstance(holder, dict) or (child or parent) not in holder:
            raise VclrError(f"{path}: metrics record lacks key {key!r}")
    if record["format"] != RECORD_FORMAT:
        raise VclrError(f"{path}: key 'format': {RECORD_FORMAT!r} expected, got {record['format']!r}")
    for key in ("task", "dataset", "split", "protocol", "created"):
        if not isinstance(record[key], str) or not record[key]:
            raise VclrError(f"{path}: key {key!r} must be a non-empty string")
    for key in ("metrics", "hardware", "extra"):
        if not isinstance(record[key], dict):
            raise VclrError(f"{path}: key {key!r} must be an object")
    if not isinstance(record["wall_time_s"], (int, float)) or not math.isfinite(record["wall_time_s"]):
        raise VclrError(f"{path}: key 'wall_time_s' must be a number")
    for part in ("checkpoint", "data_index"):
        if record[part]["dvc_md5"] is None and not record[part]["reason"]:
            raise VclrError(f"{path}: key '{part}.dvc_md5' is null without a '{part}.reason'")
    if record["code"]["commit"] is None and not record["code"]["reason"]:
        raise VclrError(f"{path}: key 'code.commit' is null without a 'code.reason'")
    return record


def add_provenance_arguments(parser, protocol_help: str) -> None:
    """The flags every metrics-writing command shares (what the record needs beyond its inputs)."""
    parser.add_argument("--config", type=Path, help="the profile's config file (its hash goes in the record; "
                                                    "--seed and --profile default to its values)")
    parser.add_argument("--seed", type=int, help="seed of the run behind these features (default: the config's)")
    parser.add_argument("--profile", help="profile name (default: the config's)")
    parser.add_argument("--dataset", help="dataset name (default: the index's summary.json)")
    parser.add_argument("--split", help="evaluated split (default: the name of the test features' index CSV)")
    parser.add_argument("--protocol", help=protocol_help)


def run_identity(config_path: str | os.PathLike | None, seed: int | None, profile: str | None) -> tuple:
    """(seed, profile): the given values, else the config's, else None."""
    _, config = config_provenance(config_path)
    config = config or {}
    return (config.get("seed") if seed is None else seed), (config.get("profile") if profile is None else profile)


def identity_from_args(args) -> dict:
    """The add_provenance_arguments values, as keywords of write_feature_evaluation."""
    return {"config_path": args.config, "seed": args.seed, "profile": args.profile, "dataset": args.dataset,
            "split": args.split, "protocol": args.protocol}


def write_feature_evaluation(train_path: str | os.PathLike, test_path: str | os.PathLike,
                             out: str | os.PathLike, metrics_fn, *, task: str,
                             protocol: str | Callable[[dict], str], config_path: str | os.PathLike | None = None,
                             seed: int | None = None, profile: str | None = None, dataset: str | None = None,
                             split: str | None = None) -> dict:
    """metrics_fn(train_features, train_labels, test_features, test_labels, class_names) on two feature
    files (vclr eval features), written to `out` as a metrics record; returns the record.

    The checkpoint and data index come from the features' provenance: the checkpoint must still be the
    file the features were extracted from (its sha256), both splits must come from one index folder.
    dataset defaults to the index's summary.json, split to the test index CSV's name, seed and profile
    to the config's; `protocol` may be a function of the test file's provenance. The two files'
    provenance goes under extra.train / extra.test.
    """
    from vclr.evaluate.feature_files import file_sha256, load_feature_pair

    started = time.perf_counter()
    train, test, names = load_feature_pair(train_path, test_path)
    try:
        metrics = metrics_fn(train["features"], train["labels"], test["features"], test["labels"], names)
    except VclrError as error:
        raise VclrError(f"{train_path} / {test_path}: {error}") from None
    wall_time_s = time.perf_counter() - started

    provenance = test["provenance"]
    checkpoint = provenance.get("checkpoint")
    expected = provenance.get("checkpoint_sha256")
    if expected is not None:
        if not Path(checkpoint).is_file():
            raise VclrError(f"{test_path}: its checkpoint {checkpoint} is gone; the record needs its hash")
        if file_sha256(checkpoint) != expected:
            raise VclrError(f"{test_path}: checkpoint {checkpoint} changed since these features were extracted "
                            f"(sha256 differs); extract them again")
    indexes = {}
    for name, path, source in (("train", train_path, train), ("test", test_path, test)):
        named = source["provenance"].get("index")
        if named is not None and not Path(named).is_file():
            raise VclrError(f"{path}: the index CSV it was extracted from, {named}, is not there (the record "
                            f"hashes its folder)")
        indexes[name] = Path(named).resolve() if named is not None else None
    index_dirs = {index.parent for index in indexes.values() if index is not None}
    if len(index_dirs) > 1:
        raise VclrError(f"{train_path} and {test_path}: features from two index folders "
                        f"({', '.join(sorted(map(str, index_dirs)))})")
    index_dir = index_dirs.pop() if index_dirs else None
    if dataset is None and index_dir is not None and (index_dir / "summary.json").is_file():
        dataset = json.loads((index_dir / "summary.json").read_text(encoding="utf-8")).get("dataset")
    if not dataset:
        raise VclrError(f"{test_path}: no dataset name in its index's summary.json; pass --dataset")
    split = split or (indexes["test"].stem if indexes["test"] is not None else None)
    if not split:
        raise VclrError(f"{test_path}: its provenance names no index CSV; pass --split")
    seed, profile = run_identity(config_path, seed, profile)
    if callable(protocol):
        protocol = protocol(provenance)
    extra = {"train": {"file": str(Path(train_path).resolve()), **train["provenance"]},
             "test": {"file": str(Path(test_path).resolve()), **test["provenance"]}}
    return write_metrics_record(out, task=task, dataset=dataset, split=split, protocol=protocol, metrics=metrics,
                                seed=seed, profile=profile, config_path=config_path, checkpoint=checkpoint,
                                index_dir=index_dir, wall_time_s=wall_time_s, extra=extra)
