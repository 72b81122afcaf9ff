"""Metrics records: DVC hashes equal to `dvc add`'s, every DESIGN.md field, atomic writes, bad records."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from vclr.config import config_hash, load_config
from vclr.errors import VclrError
from vclr.evaluate.record import (
    PACKAGE_DIR,
    REQUIRED_KEYS,
    dvc_dir_md5,
    dvc_file_md5,
    git_state,
    read_metrics_record,
    write_metrics_record,
)

CONFIG = PACKAGE_DIR.parent / "config" / "config.yaml"


def _index_dir(root: Path) -> Path:
    """A folder shaped like data/index/<dataset>, with a nested file and CRLF text (DVC 3: no dos2unix)."""
    (root / "sub").mkdir(parents=True)
    (root / "train.csv").write_bytes(b"video_id,label\r\nv1,0\r\n")
    (root / "summary.json").write_text('{"dataset": "ucf101"}\n')
    (root / "sub" / "a.bin").write_bytes(bytes(range(256)))
    (root / "sub.csv").write_text("sorts between 'sub/a.bin' and 'summary.json'\n")
    return root


def test_dvc_hashes_equal_dvc_add(tmp_path):
    dvc = shutil.which("dvc")
    if dvc is None:
        pytest.skip("dvc is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    index = _index_dir(repo / "index")
    (repo / "model.pt").write_bytes(b"\x00checkpoint\r\n" * 100)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "site")}
    for argv in (["init", "--no-scm", "-q"], ["add", "-q", "index", "model.pt"]):
        subprocess.run([dvc, *argv], cwd=repo, env=env, check=True, capture_output=True, timeout=120)
    recorded = {name: yaml.safe_load((repo / f"{name}.dvc").read_text())["outs"][0]["md5"]
                for name in ("index", "model.pt")}
    assert dvc_dir_md5(index) == recorded["index"] and recorded["index"].endswith(".dir")
    assert dvc_file_md5(repo / "model.pt") == recorded["model.pt"]
    assert recorded["model.pt"] == hashlib.md5((repo / "model.pt").read_bytes()).hexdigest()


def test_dir_hash_hand_computed(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_bytes(b"x")
    (tmp_path / "a").write_bytes(b"")
    (tmp_path / "empty").mkdir()  # empty folders do not count
    listing = (f'[{{"md5": "{hashlib.md5(b"").hexdigest()}", "relpath": "a"}}, '
               f'{{"md5": "{hashlib.md5(b"x").hexdigest()}", "relpath": "b/x"}}]')
    assert dvc_dir_md5(tmp_path) == hashlib.md5(listing.encode()).hexdigest() + ".dir"
    (tmp_path / "b" / ".snakemake_timestamp").write_bytes(b"")  # Snakemake's marker: not data
    assert dvc_dir_md5(tmp_path) == hashlib.md5(listing.encode()).hexdigest() + ".dir"


def _write(path, **changes):
    arguments = {"task": "retrieval", "dataset": "ucf101", "split": "test", "protocol": "knn_cosine_split1",
                 "metrics": {"recall": {"R@1": np.float64(0.5)}, "count": np.int64(4)}, "seed": 0,
                 "profile": "tiny", "config_path": CONFIG, "checkpoint": "random:seed=0", "index_dir": None,
                 "wall_time_s": 1.25, "extra": {"note": "test"}, **changes}
    return write_metrics_record(path, **arguments)


def test_record_has_every_field(tmp_path):
    index = _index_dir(tmp_path / "index")
    checkpoint = tmp_path / "backbone.pt"
    checkpoint.write_bytes(b"weights")
    out = tmp_path / "metrics" / "run.json"
    written = _write(out, checkpoint=checkpoint, index_dir=index)
    record = read_metrics_record(out)
    assert record == written
    for key in REQUIRED_KEYS:
        parent, _, child = key.partition(".")
        assert (child or parent) in (record[parent] if child else record), key
    assert record["metrics"] == {"recall": {"R@1": 0.5}, "count": 4}  # numpy scalars as plain JSON
    assert record["config"] == {"path": str(CONFIG.resolve()), "hash": config_hash(load_config(CONFIG))}
    assert record["checkpoint"]["dvc_md5"] == hashlib.md5(b"weights").hexdigest()
    assert record["data_index"]["dvc_md5"] == dvc_dir_md5(index)
    assert record["hardware"]["cpu_cores"] >= 1 and "torch" in record["hardware"]
    assert record["hardware"]["gpu_count"] == len(record["hardware"]["gpus"])
    assert record["wall_time_s"] == 1.25 and record["extra"] == {"note": "test"}
    assert record["code"]["commit"] is None or len(record["code"]["commit"]) == 40
    # a random init and no config are recorded as nulls with reasons
    bare = _write(out, config_path=None, profile=None)
    assert bare["config"] == {"path": None, "hash": None}
    assert bare["checkpoint"]["dvc_md5"] is None and "random" in bare["checkpoint"]["reason"]
    assert bare["data_index"]["dvc_md5"] is None and bare["data_index"]["reason"]


def test_record_input_errors(tmp_path):
    with pytest.raises(VclrError, match="profile 'paper' but .*config.yaml is profile 'tiny'"):
        _write(tmp_path / "a.json", profile="paper")
    with pytest.raises(VclrError, match="absent.pt: checkpoint not found"):
        _write(tmp_path / "a.json", checkpoint=tmp_path / "absent.pt")
    with pytest.raises(VclrError, match="'split' must be a non-empty string"):
        _write(tmp_path / "a.json", split="")
    assert not (tmp_path / "a.json").exists()


def test_no_file_on_failure_and_old_record_kept(tmp_path):
    out = tmp_path / "run.json"
    with pytest.raises(VclrError, match="run.json: metrics record is not valid JSON"):
        _write(out, metrics={"R@1": float("nan")})
    with pytest.raises(VclrError, match="not valid JSON"):
        _write(out, extra={"bad": object()})
    assert list(tmp_path.iterdir()) == []
    _write(out)
    before = out.read_bytes()
    with pytest.raises(VclrError):
        _write(out, metrics={"R@1": float("inf")})
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_git_state(tmp_path):
    assert git_state(tmp_path)["commit"] is None and git_state(tmp_path)["reason"]
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(git + ["init", "-q"], check=True)
    code = tmp_path / "pkg"
    code.mkdir()
    (code / "m.py").write_text("x = 1\n")
    (tmp_path / "results.json").write_text("{}\n")
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "c"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert git_state(code) == {"repo": str(tmp_path.resolve()), "commit": head, "dirty": False,
                               "dirty_scope": str(code.resolve()), "reason": None}
    (tmp_path / "results.json").write_text('{"changed": 1}\n')  # outputs outside the code: still clean
    assert git_state(code)["dirty"] is False
    (code / "new.py").write_text("")  # an untracked module is a code change
    assert git_state(code)["dirty"] is True


def test_read_rejects_bad_records(tmp_path):
    out = tmp_path / "run.json"
    _write(out)
    record = json.loads(out.read_text())
    for broken, message in (
        ({k: v for k, v in record.items() if k != "seed"}, "lacks key 'seed'"),
        ({**record, "checkpoint": {"path": "x"}}, "lacks key 'checkpoint.dvc_md5'"),
        ({**record, "format": "other"}, "key 'format'"),
        ({**record, "metrics": [1]}, "key 'metrics' must be an object"),
        ({**record, "data_index": {"path": None, "dvc_md5": None, "reason": ""}}, "without a 'data_index.reason'"),
    ):
        out.write_text(json.dumps(broken))
        with pytest.raises(VclrError, match=f"run.json: .*{message}"):
            read_metrics_record(out)
    out.write_text("{not json")
    with pytest.raises(VclrError, match="run.json: not valid JSON"):
        read_metrics_record(out)
    with pytest.raises(VclrError, match="absent.json: metrics record not found"):
        read_metrics_record(tmp_path / "absent.json")
