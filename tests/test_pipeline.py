"""The tiny profile end to end, from a fresh copy of the checkout, under Snakemake and under DVC."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from conftest import copy_checkout, run
from vclr.config import load_config
from vclr.data import DATASETS

pytestmark = pytest.mark.pipeline

TINY = load_config(Path(__file__).resolve().parents[1] / "config/config.yaml")
DATA = Path(TINY["paths"]["data"])


def _digest_tree(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*")) if path.is_file() and path.name != ".snakemake_timestamp"
    }


def test_snakemake_builds_every_dataset_index(tiny_pipeline):
    for dataset in DATASETS:
        summary = json.loads((tiny_pipeline / DATA / "index" / dataset / "summary.json").read_text())
        assert summary["dataset"] == dataset
        assert summary["classes"] == TINY["datasets"][dataset]["synthetic"]["classes"]
        for split, counts in summary["splits"].items():
            assert counts["listed"] > 0, (dataset, split)
            # every generated video is decodable, so everything listed is found
            assert counts["found"] == counts["listed"] and counts["missing"] == 0, (dataset, split)
        manifest = json.loads((tiny_pipeline / DATA / "frames" / dataset / "manifest.json").read_text())
        assert manifest["failed"] == {}
        assert len(manifest["shards"]) <= TINY["datasets"][dataset]["extract"]["shards"]


def test_kinetics_stand_in_has_exactly_the_asked_frames(tiny_pipeline):
    manifest = json.loads((tiny_pipeline / DATA / "frames" / "k400" / "manifest.json").read_text())
    asked = TINY["datasets"]["k400"]["extract"]["num_frames"]
    assert {video["frames"] for video in manifest["videos"].values()} == {asked}


def test_snakemake_rerun_has_nothing_to_do(tiny_pipeline):
    result = run([sys.executable, "-m", "snakemake", "-n", "all_tables"], cwd=tiny_pipeline)
    assert "Nothing to be done" in result.stdout + result.stderr


def test_dvc_repro_builds_the_same_files(tiny_pipeline, tmp_path):
    checkout = copy_checkout(tmp_path / "tiny_dvc")
    run(["dvc", "repro"], cwd=checkout)
    for dataset in DATASETS:
        for stage in ("raw", "frames", "index"):
            ours = _digest_tree(checkout / DATA / stage / dataset)
            theirs = _digest_tree(tiny_pipeline / DATA / stage / dataset)
            assert ours == theirs, f"dvc repro and snakemake differ in {stage}/{dataset}"
    status = run(["dvc", "status", "dvc.yaml"], cwd=checkout)
    assert "up to date" in status.stdout
