"""The MoCo v2-layout stand-in (vclr train moco-standin): trained by L_inter alone, written in MoCo
v2's layout, and loaded by `init: moco_v2` through the real file's code path."""

from __future__ import annotations

import torch
import pytest

from test_pretrain import write_tiny_data
from vclr import cli
from vclr.errors import VclrError
from vclr.models.backbones import MOCO_TRUNK_PREFIX, build_backbone, load_moco_v2
from vclr.models.vclr import VclrModel
from vclr.train.checkpoint import load_checkpoint
from vclr.train.moco_standin import moco_v2_state


def _standin_args(index, frames, out, weights, *extra: str) -> list[str]:
    return ["train", "moco-standin", "--index", str(index), "--frames", str(frames), "--out", str(out),
            "--weights", str(weights), "--backbone", "resnet_tiny", "--epochs", "2", "--batch-size", "4",
            "--queue-size", "16", "--crop", "32", "--seed", "1", "--device", "cpu", *extra]


def test_standin_trains_inter_only_and_loads_as_moco_v2(tmp_path):
    index, frames = write_tiny_data(tmp_path / "data")
    out, weights = tmp_path / "standin", tmp_path / "moco_v2_200ep_pretrain.pth.tar"
    assert cli.main(_standin_args(index, frames, out, weights)) == 0

    training = load_checkpoint(out / "checkpoint_last.pt")
    assert training["config"]["losses"] == ["inter"] and training["step"] == 4  # 8 videos / 4, 2 epochs
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    assert saved["arch"] == "resnet_tiny" and saved["standin"]["steps"] == 4
    assert all(key.startswith(MOCO_TRUNK_PREFIX) for key in saved["state_dict"])

    # the code path of the real file: trunk into the backbone, the MLP into every head
    trunk, dim = build_backbone("resnet_tiny")
    model = VclrModel(trunk, dim, num_segments=3)
    load_moco_v2(weights, model)
    trained = training["vclr"]
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, trained[f"model.backbone.{key}"]), key
    for name, head in model.heads.items():
        for key, value in head.state_dict().items():
            assert torch.equal(value, trained[f"model.heads.inter.{key}"]), (name, key)
    # and it is not a fresh init: training moved the trunk
    fresh, _ = build_backbone("resnet_tiny")
    assert any(not torch.equal(value, fresh.state_dict()[key])
               for key, value in model.backbone.state_dict().items() if value.is_floating_point())


def test_standin_refuses_other_losses_and_a_non_vclr_state(tmp_path, capsys):
    argv = _standin_args(tmp_path / "i.csv", tmp_path, tmp_path / "o", tmp_path / "w", "--losses", "inter,order")
    assert cli.main(argv) == 2
    assert "instance discrimination only ('inter'), got 'inter,order'" in capsys.readouterr().err
    with pytest.raises(VclrError, match="model.heads.inter"):
        moco_v2_state({"model.backbone.conv1.weight": torch.zeros(1)}, "some.pt")
