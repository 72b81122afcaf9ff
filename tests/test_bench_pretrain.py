"""`vclr bench pretrain` smoke test: runs a step or two on tiny shapes and writes its JSON (no timing asserts)."""

from __future__ import annotations

import json

from vclr import cli
from vclr.bench.pretrain import STEP_SETTINGS
from vclr.train.pretrain import DEFAULT_SETTINGS

TINY = ["bench", "pretrain", "--device", "cpu", "--backbone", "resnet_tiny", "--batch", "4", "--crop", "32",
        "--segments", "3", "--queue-size", "16", "--rounds", "1", "--steps", "1", "--warmup", "0"]


def test_bench_pretrain_writes_results(tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main([*TINY, "--modes", "fp32_eager,bf16_channels_last", "--loop-mode", "fp32_eager",
                     "--loop-steps", "1", "--loop-workers", "0", "--loop-augment", "batched",
                     "--loop-prefetch", "0,2", "--out-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["torch_threads"] >= 1
    assert result["shapes"] == {"backbone": "resnet_tiny", "batch": 4, "crop": 32, "segments": 3,
                                "queue_size": 16, "preset": "cpu"}
    assert set(result["synthetic"]) == {"fp32_eager", "bf16_channels_last"}
    for entry in result["synthetic"].values():
        assert len(entry["rounds"]) == 1 and entry["videos_per_s"] > 0 and entry["first_step_s"] > 0
    assert result["synthetic"]["fp32_eager"]["ratio_to_fp32_eager"] == 1.0
    assert [loop["prefetch"] for loop in result["loops"]] == [0, 2]
    for loop in result["loops"]:
        assert loop["mode"] == "fp32_eager" and loop["augment"] == "batched"
        assert loop["steps_timed"] == 1 and loop["videos_per_s"] > 0
        assert loop["steps_logged"] == 2  # the epoch's first step (loader start-up) is run but not timed
        assert loop["fraction_of_synthetic"] == loop["videos_per_s"] / result["synthetic"]["fp32_eager"]["videos_per_s"]
    # the same batches either way: the same loss after the same steps
    assert result["loops"][0]["last_loss"] == result["loops"][1]["last_loss"]


def test_bench_pretrain_rejects_bad_shapes(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bad_queue = [*TINY[:TINY.index("--queue-size")], "--queue-size", "18", "--out-json", str(out)]
    assert cli.main(bad_queue) == 2
    assert "--queue-size 18 is not a multiple of --batch 4" in capsys.readouterr().err
    assert cli.main([*TINY, "--modes", "fp16", "--out-json", str(out)]) == 2
    assert "--modes" in capsys.readouterr().err and not out.exists()
    assert cli.main([*TINY, "--loop-prefetch", "1,x", "--out-json", str(out)]) == 2
    assert "--loop-prefetch '1,x'" in capsys.readouterr().err and not out.exists()


def test_step_settings_match_the_training_loop():
    assert STEP_SETTINGS == {key: DEFAULT_SETTINGS[key] for key in STEP_SETTINGS}
