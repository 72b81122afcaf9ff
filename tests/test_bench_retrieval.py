"""`vclr bench retrieval` runs on small shapes and reports both sides (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from vclr import cli


# the scaled probe runs use 400 classes (Kinetics) on few samples, which scikit-learn remarks on
@pytest.mark.filterwarnings("ignore:The number of unique classes is greater than 50%")
def test_bench_retrieval_smoke(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "retrieval", "--queries", "40", "--gallery", "120", "--dim", "32", "--rounds", "2",
            "--probe-widths", "4,8", "--probe-target", "3200", "--out-json", str(out)]
    assert cli.main(argv) == 0
    results = json.loads(out.read_text())
    retrieval = results["retrieval"]
    assert set(retrieval["median_seconds"]) == {"ours", "sklearn"}
    assert retrieval["top_k_agreement"] > 0.99  # both sides rank the same gallery videos
    probe = results["linear_probe"]
    # Kinetics' shape scaled down: rows per feature kept (3200 / 32 = 100)
    assert [(m["n"], m["d"]) for m in probe["measured"]] == [(400, 4), (800, 8)] and probe["estimated_seconds"] > 0
    assert all(len(m["iterations"]) == probe["timed_classes"] for m in probe["measured"])
