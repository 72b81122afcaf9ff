"""`vclr bench features` smoke test: tiny shapes, one round, the generated packed-JPEG run of both extraction
paths (no timing asserts)."""

from __future__ import annotations

import argparse
import json

import pytest

from vclr.bench import features
from vclr.errors import VclrError

TINY = ["--device", "cpu", "--backbone", "resnet_tiny", "--num-frames", "4", "--crop", "32", "--frame-size",
        "40x48", "--batch-size", "8", "--videos", "3", "--rounds", "1", "--workers", "0"]


def _run(argv):
    parser = argparse.ArgumentParser()
    features.configure_parser(parser)
    return features.main(parser.parse_args([str(a) for a in argv]))


def test_bench_features_writes_results(tmp_path):
    out = tmp_path / "bench.json"
    assert _run([*TINY, "--generate", "3", "--out-json", out]) == 0
    result = json.loads(out.read_text())
    assert result["videos_per_batch"] == 2 and result["frame_height_width"] == [40, 48]
    for mode in ("forward", "path", "crops"):
        entry = result["synthetic"][mode]
        assert len(entry["rounds"]) == 1 and entry["videos_per_s"] > 0
        assert entry["frames_per_s"] == entry["videos_per_s"] * 4
    e2e = result["end_to_end"]
    assert e2e["videos"] == 3 and e2e["frame_width_height"] == [48, 40] and e2e["mean_jpeg_bytes"] > 0
    for path in ("batched", "batched_no_prefetch", "per_frame"):  # side by side, one round each
        assert len(e2e[path]["rounds"]) == 1 and e2e[path]["videos_per_s"] > 0
    # on a CPU `vclr eval features` runs without prefetching (extract_features' default there)
    assert e2e["default_path"] == "batched_no_prefetch"
    assert e2e["videos_per_s"] == e2e["batched_no_prefetch"]["videos_per_s"]
    assert e2e["speedup"] == e2e["batched_no_prefetch"]["videos_per_s"] / e2e["per_frame"]["videos_per_s"]
    assert e2e["prefetch_speedup"] == e2e["batched"]["videos_per_s"] / e2e["batched_no_prefetch"]["videos_per_s"]


def test_bench_features_rejects_bad_arguments(tmp_path):
    out = tmp_path / "bench.json"
    with pytest.raises(VclrError, match="--frame-size"):
        _run([*TINY, "--frame-size", "40", "--out-json", out])
    with pytest.raises(VclrError, match="give both or neither"):
        _run([*TINY, "--frames", tmp_path, "--out-json", out])
    assert not out.exists()
