"""The released-weights converter on synthetic checkpoints in the authors' layout.

The layout is written out here from the authors' code (amazon-science/video-contrastive-learning,
models/resnet_mlp.py and utils/util.py save_checkpoint), independently of vclr.models.convert:
`model` = "module." + torchvision trunk keys + fc_{inter,intra,order,tsn}.{0,2} MLP heads of
(D -> D -> 128) + fc_order_classifier Linear(6 * 128, 4); `model_ema` = the same keys unprefixed;
`contrast` / `contrast_tsn` = {"params", "memory" [queue, 128]}; `opt` = an argparse.Namespace.
One test uses ResNet-50 shapes (in memory); the file and CLI tests use resnet_tiny to stay small.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from vclr.errors import VclrError
from vclr.evaluate.features import load_backbone
from vclr.models import convert
from vclr.models.backbones import build_backbone, copy_checked
from vclr.models.vclr import VclrModel

HEADS = ("fc_inter", "fc_intra", "fc_order", "fc_tsn")


def authors_network(backbone: str, seed: int, prefix: str, embed: int = 128, mlp: bool = True) -> dict:
    """One of their networks' state dicts: trunk (torchvision names) + heads, random values from `seed`."""
    torch.manual_seed(seed)
    trunk, dim = build_backbone(backbone)
    state = {k: v.clone() for k, v in trunk.state_dict().items()}
    for head in HEADS:
        if mlp:
            state.update({f"{head}.0.weight": torch.randn(dim, dim), f"{head}.0.bias": torch.randn(dim),
                          f"{head}.2.weight": torch.randn(embed, dim), f"{head}.2.bias": torch.randn(embed)})
        else:
            state.update({f"{head}.0.weight": torch.randn(embed, dim), f"{head}.0.bias": torch.randn(embed)})
    state.update({"fc_order_classifier.weight": torch.randn(4, embed * 6), "fc_order_classifier.bias": torch.randn(4)})
    return {prefix + key: value for key, value in state.items()}


def authors_checkpoint(backbone: str = "resnet_tiny", queue: int = 32) -> dict:
    return {"opt": argparse.Namespace(model_mlp=True, nce_k=queue, batch_size=32),
            "model": authors_network(backbone, 0, "module."), "model_ema": authors_network(backbone, 1, ""),
            "contrast": {"params": torch.tensor([-1]), "memory": torch.rand(queue, 128)},
            "contrast_tsn": {"params": torch.tensor([-1]), "memory": torch.rand(queue, 128)},
            "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 10}, "epoch": 400}


def test_resnet50_layout_maps_key_for_key():
    model = authors_network("resnet50", 0, "module.")
    converted = convert.convert_released({"model": model}, "resnet50")
    trunk, _ = build_backbone("resnet50")
    assert set(converted["backbone"]) == set(trunk.state_dict())
    assert torch.equal(converted["backbone"]["layer4.2.bn3.running_var"], model["module.layer4.2.bn3.running_var"])
    assert torch.equal(converted["backbone"]["layer1.0.downsample.0.weight"],
                       model["module.layer1.0.downsample.0.weight"])
    ours = converted["model"]
    assert torch.equal(ours["heads.segment.2.weight"], model["module.fc_tsn.2.weight"])
    assert torch.equal(ours["heads.order.0.bias"], model["module.fc_order.0.bias"])
    assert torch.equal(ours["order_classifier.weight"], model["module.fc_order_classifier.weight"])
    assert converted["momentum"] is None and converted["frame_queue"] is None


def _run(argv):
    parser = argparse.ArgumentParser()
    convert.configure_parser(parser)
    return convert.main(parser.parse_args([str(a) for a in argv]))


def test_cli_writes_a_backbone_that_features_accepts(tmp_path):
    checkpoint = authors_checkpoint()
    torch.save(checkpoint, tmp_path / "vclr_k400.pth")
    out, full = tmp_path / "backbone.pt", tmp_path / "vclr_model.pt"
    assert _run(["--checkpoint", tmp_path / "vclr_k400.pth", "--out", out, "--backbone", "resnet_tiny",
                 "--model-out", full]) == 0
    backbone = load_backbone(out, "resnet_tiny")  # what `vclr eval features --checkpoint` does
    assert torch.equal(backbone.conv1.weight, checkpoint["model"]["module.conv1.weight"])
    saved = torch.load(full, weights_only=True)
    assert saved["format"] == convert.RELEASED_FORMAT
    momentum = VclrModel(*build_backbone("resnet_tiny"))
    copy_checked(momentum, saved["momentum"], "momentum")
    assert torch.equal(momentum.heads["intra"][2].weight, checkpoint["model_ema"]["fc_intra.2.weight"])
    assert torch.equal(saved["frame_queue"], checkpoint["contrast"]["memory"])
    assert torch.equal(saved["segment_queue"], checkpoint["contrast_tsn"]["memory"])
    assert _run(["--checkpoint", tmp_path / "vclr_k400.pth", "--out", out, "--backbone", "resnet_tiny",
                 "--encoder", "momentum"]) == 0
    assert torch.equal(load_backbone(out, "resnet_tiny").conv1.weight, checkpoint["model_ema"]["conv1.weight"])


def test_bad_checkpoints_name_the_keys(tmp_path):
    good = authors_checkpoint()
    model = good["model"]
    cases = [
        ({"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}}, "no 'model' entry"),
        ({"model": {k: v for k, v in model.items() if k != "module.layer2.0.conv1.weight"}},
         r"missing \(1\): layer2.0.conv1.weight"),
        ({"model": {**model, "module.fc.weight": torch.zeros(3, 128)}}, r"unexpected \(1\): fc.weight"),
        ({"model": {**model, "conv1.weight": model["module.conv1.weight"]}}, "keys with and without 'module.'"),
        ({"model": {k: v for k, v in model.items() if not k.startswith("module.fc_tsn.2")}},
         "heads incomplete .*fc_tsn.2.weight, fc_tsn.2.bias"),
        ({"model": authors_network("resnet_tiny", 0, "module.", mlp=False)}, "heads incomplete"),
        ({"model": {k: v for k, v in model.items() if ".fc_" not in k}}, None),  # a bare trunk converts
    ]
    for checkpoint, message in cases:
        if message is None:
            assert convert.convert_released(checkpoint, "resnet_tiny")["model"] is None
            continue
        with pytest.raises(VclrError, match=message):
            convert.convert_released(checkpoint, "resnet_tiny", "ck.pth")
    with pytest.raises(VclrError, match="does not fit"):
        convert.convert_released(good, "resnet18")
    with pytest.raises(VclrError, match="no 'model_ema'"):
        convert.convert_released({"model": model}, "resnet_tiny", encoder="momentum")

    out = tmp_path / "backbone.pt"
    torch.save({"model": {k: v for k, v in model.items() if k != "module.bn1.weight"}}, tmp_path / "broken.pth")
    assert _status(tmp_path / "broken.pth", out) == 2
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert _status(tmp_path / "junk.pth", out) == 2
    torch.save({"model": model, "opt": _Unlisted()}, tmp_path / "pickled.pth")  # arbitrary objects: refused
    assert _status(tmp_path / "pickled.pth", out) == 2
    assert not out.exists()


class _Unlisted:
    pass


def _status(checkpoint, out):
    """Exit status as the CLI gives it (VclrError -> 2), without needing the command registered."""
    try:
        return _run(["--checkpoint", checkpoint, "--out", out, "--backbone", "resnet_tiny"])
    except VclrError:
        return 2
