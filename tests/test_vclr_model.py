"""VCLR model, momentum encoder, queues, shuffle-BN hooks and the MoCo v2 import (tiny, CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vclr.errors import VclrError
from vclr.models.backbones import TinyResNet, build_backbone, load_moco_v2
from vclr.models.vclr import (
    HEADS, FeatureQueue, MomentumEncoder, Vclr, VclrModel, single_process_shuffle, single_process_unshuffle,
)
from vclr.train.losses import vclr_loss

BATCH, CROP, SEGMENTS = 4, 32, 3


def tiny_model(seed: int = 0) -> VclrModel:
    torch.manual_seed(seed)
    backbone, dim = build_backbone("resnet_tiny")
    return VclrModel(backbone, dim, num_segments=SEGMENTS)


def random_batch(seed: int = 1, batch: int = BATCH) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    frames = {name: torch.randn(batch, 3, CROP, CROP, generator=generator) for name in ("xq", "x1", "x2", "x3")}
    tuples = {name: torch.randn(batch, SEGMENTS, 3, CROP, CROP, generator=generator)
              for name in ("query_tuple", "key_tuple")}
    return {**frames, **tuples, "order_label": torch.randint(0, 4, (batch,), generator=generator)}


def identity_shuffle(x):
    return x, None


def identity_unshuffle(y, state):
    return y


@pytest.fixture(autouse=True)
def isolated_rng():
    """Tests seed the global RNG; keep that from leaking into other test files."""
    with torch.random.fork_rng(devices=[]):
        yield


def test_step_output_shapes_and_targets():
    vclr = Vclr(tiny_model(), queue_size=16, segment_queue_size=8)
    batch = random_batch()
    out = vclr(batch)
    b = BATCH
    expected = {
        "inter_logits": (3 * b, 1 + 16), "inter_targets": (3 * b,),
        "intra_logits": (2 * b, 2), "intra_targets": (2 * b,),
        "segment_logits": (b, 1 + 8), "segment_targets": (b,),
        "order_logits": (b, 4), "order_targets": (b,),
        "frame_keys": (3 * b, 128), "segment_keys": (b, 128),
    }
    assert {key: tuple(value.shape) for key, value in out.items()} == expected
    for key in ("inter_targets", "intra_targets", "segment_targets"):
        assert torch.all(out[key] == 0)
    assert torch.equal(out["order_targets"], batch["order_label"])
    assert not out["frame_keys"].requires_grad and not out["segment_keys"].requires_grad


def test_heads_are_l2_normalised_and_moco_shaped():
    model = tiny_model()
    features = torch.randn(5, 128) * 7
    for head in HEADS:
        assert torch.allclose(model.embed(head, features).norm(dim=-1), torch.ones(5), atol=1e-5)
    encoded = model.encode(torch.randn(1, 2, 3, CROP, CROP), torch.randn(2, SEGMENTS, 3, CROP, CROP))
    assert encoded["order"].shape == (2, SEGMENTS, 128) and encoded["segment"].shape == (2, 128)
    for value in encoded.values():
        assert torch.allclose(value.norm(dim=-1), torch.ones(value.shape[:-1]), atol=1e-5)
    assert model.order_classifier.in_features == 6 * 128 and model.order_classifier.out_features == 4
    # The paper's ResNet-50 heads have MoCo v2's MLP shapes, so its fc.0/fc.2 map onto them.
    backbone, dim = build_backbone("resnet50")
    big = VclrModel(backbone, dim)
    assert dim == 2048 and big.backbone(torch.randn(1, 3, 64, 64)).shape == (1, 2048)
    for head in big.heads.values():
        assert head[0].weight.shape == (2048, 2048) and head[2].weight.shape == (128, 2048)


def test_backbones_feature_dims_and_unknown_name():
    trunk, dim = build_backbone("resnet18")
    assert dim == 512 and trunk(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert {"conv1.weight", "bn1.running_mean", "layer4.0.conv1.weight"} <= set(trunk.state_dict())
    with pytest.raises(VclrError, match="unknown backbone 'vgg'"):
        build_backbone("vgg")


def test_backbone_pretrained_state_dict_loads(tmp_path):
    source, _ = build_backbone("resnet_tiny")
    path = tmp_path / "trunk.pth"
    torch.save({"state_dict": {**source.state_dict(), "fc.weight": torch.zeros(10, 128)}}, path)
    loaded, _ = build_backbone("resnet_tiny", pretrained=path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_momentum_update_formula_exact():
    query = nn.Sequential(nn.Linear(2, 1, bias=True), nn.BatchNorm1d(1))
    with torch.no_grad():
        query[0].weight.copy_(torch.tensor([[1.0, -2.0]]))
        query[0].bias.fill_(4.0)
    momentum = MomentumEncoder(query)
    with torch.no_grad():
        query[0].weight.copy_(torch.tensor([[3.0, 2.0]]))
        query[0].bias.fill_(0.0)
        query[1].running_mean.fill_(5.0)
    momentum.update(query, alpha=0.75)
    key = momentum.encoder
    assert torch.equal(key[0].weight, torch.tensor([[1.5, -1.0]]))  # 0.75*1 + 0.25*3, 0.75*-2 + 0.25*2
    assert torch.equal(key[0].bias, torch.tensor([3.0]))
    assert torch.equal(key[1].running_mean, torch.tensor([5.0]))  # buffers copied, not averaged
    momentum.update(query, alpha=0.5)
    assert torch.equal(key[0].weight, torch.tensor([[2.25, 0.5]]))
    assert key[0].weight.requires_grad is False


def test_momentum_encoder_modes_and_no_grads():
    vclr = Vclr(tiny_model(), queue_size=8)
    vclr.train()
    batch_norms = [m for m in vclr.momentum.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    others = [m for m in vclr.momentum.encoder.modules() if not isinstance(m, nn.BatchNorm2d)]
    assert batch_norms and all(m.training for m in batch_norms)
    assert others and not any(m.training for m in others)
    assert all(m.training for m in vclr.model.modules())
    assert not any(p.requires_grad for p in vclr.momentum.parameters())
    vclr.eval()
    assert not any(m.training for m in vclr.momentum.modules())
    vclr.train()
    assert all(m.training for m in batch_norms) and not vclr.momentum.encoder.training

    out = vclr(random_batch())
    total, _ = vclr_loss(out)
    total.backward()
    assert all(p.grad is None for p in vclr.momentum.parameters())
    assert vclr.model.backbone.conv1.weight.grad.abs().sum() > 0
    assert vclr.model.order_classifier.weight.grad.abs().sum() > 0
    for head in HEADS:
        assert vclr.model.heads[head][2].weight.grad.abs().sum() > 0, head


def test_keys_come_from_momentum_encoder_and_queries_from_model():
    vclr = Vclr(tiny_model(), queue_size=8)
    with torch.no_grad():  # a key-side head that outputs zeros makes every positive logit 0
        vclr.momentum.encoder.heads["inter"][2].weight.zero_()
        vclr.momentum.encoder.heads["inter"][2].bias.zero_()
        vclr.model.heads["segment"][2].weight.zero_()
        vclr.model.heads["segment"][2].bias.zero_()
    out = vclr(random_batch())
    assert torch.all(out["frame_keys"] == 0) and torch.all(out["inter_logits"][:, 0] == 0)
    assert out["inter_logits"][:, 1:].abs().sum() > 0  # the query inter head is intact
    assert torch.all(out["segment_logits"] == 0)  # query segment embedding is zero
    assert out["segment_keys"].abs().sum() > 0  # key segment embedding is not


def test_intra_rows_share_the_positive_and_segment_is_order_invariant():
    vclr = Vclr(tiny_model(), queue_size=8)
    batch = random_batch()
    out = vclr(batch, identity_shuffle, identity_unshuffle)
    intra = out["intra_logits"]
    assert torch.equal(intra[:BATCH, 0], intra[BATCH:, 0])  # q.x1 in both rows
    assert not torch.allclose(intra[:BATCH, 1], intra[BATCH:, 1])  # q.x2 vs q.x3
    permuted = dict(batch, query_tuple=batch["query_tuple"][:, [2, 0, 1]], key_tuple=batch["key_tuple"][:, [1, 2, 0]])
    out_permuted = vclr(permuted, identity_shuffle, identity_unshuffle)
    # segment = head(mean of the K features): tuple order does not matter; the order classifier sees it.
    assert torch.allclose(out["segment_logits"], out_permuted["segment_logits"], atol=1e-5)
    assert not torch.allclose(out["order_logits"], out_permuted["order_logits"], atol=1e-5)


def test_shuffle_hooks_are_used_and_single_process_shuffle_inverts():
    x = torch.arange(10.0).unsqueeze(1)
    shuffled, state = single_process_shuffle(x)
    assert sorted(shuffled.squeeze(1).tolist()) == x.squeeze(1).tolist()
    assert torch.equal(single_process_unshuffle(shuffled, state), x)
    calls = []

    def reverse(x):
        calls.append(x.shape[0])
        return x.flip(0), "token"

    def unreverse(y, state):
        assert state == "token"
        return y.flip(0)

    vclr = Vclr(tiny_model(), queue_size=8)
    batch = random_batch()
    shuffled = vclr(batch, reverse, unreverse)
    assert calls == [3 * BATCH + SEGMENTS * BATCH]  # x1, x2, x3 and the key tuple in one pass
    # One process: BN sees the same set of images either way, so un-permuted keys are unchanged.
    plain = vclr(batch, identity_shuffle, identity_unshuffle)
    for key in ("frame_keys", "segment_keys", "order_logits"):
        assert torch.allclose(shuffled[key], plain[key], atol=1e-5), key


def test_channels_last_and_autocast():
    vclr = Vclr(tiny_model(), queue_size=8)
    batch = random_batch()
    reference = vclr(batch, identity_shuffle, identity_unshuffle)
    vclr_cl = vclr.to(memory_format=torch.channels_last)
    batch_cl = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in batch.items()}
    out = vclr_cl(batch_cl, identity_shuffle, identity_unshuffle)
    for key in ("inter_logits", "segment_logits", "order_logits"):
        assert torch.allclose(out[key], reference[key], atol=1e-4), key
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vclr(batch)
        total, terms = vclr_loss(out)
    assert torch.isfinite(total) and set(terms) == {"inter", "intra", "segment", "order"}
    vclr.enqueue(out)
    assert vclr.frame_queue.queue.dtype == torch.float32


def test_missing_batch_entry_is_an_error():
    vclr = Vclr(tiny_model(), queue_size=8)
    batch = random_batch()
    del batch["key_tuple"]
    with pytest.raises(VclrError, match="key_tuple"):
        vclr(batch)


def test_queue_init_fifo_wrap_and_batch_multiple():
    queue = FeatureQueue(6, dim=2, generator=torch.Generator().manual_seed(0))
    bound = 1 / (2 / 3) ** 0.5
    assert queue.queue.abs().max() <= bound and queue.queue.min() < 0 < queue.queue.max()
    assert FeatureQueue(4096, 128).queue.abs().max() <= 1 / (128 / 3) ** 0.5
    rows = [torch.full((3, 2), float(i)) for i in range(1, 4)]
    queue.enqueue(rows[0])
    assert int(queue.pointer) == 3 and torch.equal(queue.queue[:3], rows[0])
    queue.enqueue(rows[1])
    assert int(queue.pointer) == 0 and torch.equal(queue.queue, torch.cat(rows[:2]))
    queue.enqueue(rows[2])  # wraps: the oldest entries (batch 1) are overwritten first
    assert int(queue.pointer) == 3 and torch.equal(queue.queue, torch.cat([rows[2], rows[1]]))
    with pytest.raises(VclrError, match="not a multiple of the key batch 4"):
        queue.enqueue(torch.zeros(4, 2))


def test_vclr_enqueue_order_and_queues_in_state_dict():
    # Queue 8 is a multiple of the batch (4), not of the 3B = 12 frame keys: chunks of B go in.
    vclr = Vclr(tiny_model(), queue_size=8, segment_queue_size=4)
    out = vclr(random_batch())
    vclr.enqueue(out)
    keys = out["frame_keys"]
    assert int(vclr.frame_queue.pointer) == (3 * BATCH) % 8
    assert torch.equal(vclr.frame_queue.queue[:4], keys[8:12])  # x3 keys overwrote x1 keys
    assert torch.equal(vclr.frame_queue.queue[4:], keys[4:8])
    assert torch.equal(vclr.segment_queue.queue, out["segment_keys"])
    state = vclr.state_dict()
    assert {"frame_queue.queue", "frame_queue.pointer", "segment_queue.queue", "segment_queue.pointer"} <= set(state)
    restored = Vclr(tiny_model(seed=5), queue_size=8, segment_queue_size=4)
    restored.load_state_dict(state)
    assert int(restored.frame_queue.pointer) == 4 and torch.equal(restored.frame_queue.queue, vclr.frame_queue.queue)
    with pytest.raises(VclrError, match="multiple"):
        Vclr(tiny_model(), queue_size=6).enqueue(out)


def moco_checkpoint(model: VclrModel, path, trunk: nn.Module | None = None) -> dict:
    """The ImageNet MoCo v2 layout: DDP-prefixed encoder_q/encoder_k, the MLP as fc.0/fc.2, queue."""
    trunk = trunk or model.backbone
    torch.manual_seed(11)
    mlp = {"fc.0.weight": torch.randn(128, 128), "fc.0.bias": torch.randn(128),
           "fc.2.weight": torch.randn(128, 128), "fc.2.bias": torch.randn(128)}
    encoder = {**{k: torch.randn_like(v) if v.is_floating_point() else v for k, v in trunk.state_dict().items()}, **mlp}
    state = {f"module.encoder_q.{k}": v for k, v in encoder.items()}
    state.update({f"module.encoder_k.{k}": v.clone() for k, v in encoder.items()})
    state.update({"module.queue": torch.randn(128, 65536 // 512), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    optimizer = {"state": {}, "param_groups": []}
    torch.save({"epoch": 200, "arch": "resnet_tiny", "state_dict": state, "optimizer": optimizer}, path)
    return encoder


def test_moco_v2_import_round_trip(tmp_path):
    model = tiny_model()
    path = tmp_path / "moco_v2_200ep_pretrain.pth.tar"
    encoder = moco_checkpoint(model, path)
    copied = load_moco_v2(path, model)
    assert copied["backbone"] == len(model.backbone.state_dict()) and all(copied[h] == 4 for h in HEADS)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, encoder[key]), key
    for head in HEADS:
        assert torch.equal(model.heads[head][0].weight, encoder["fc.0.weight"])
        assert torch.equal(model.heads[head][2].bias, encoder["fc.2.bias"])
    vclr = Vclr(model, queue_size=8)  # the momentum encoder starts from the imported weights
    assert torch.equal(vclr.momentum.encoder.backbone.conv1.weight, encoder["conv1.weight"])


@pytest.mark.parametrize("other, message", [
    (TinyResNet(widths=(8, 16, 32, 64)), "shape mismatch .*conv1.weight"),
    (TinyResNet(blocks=(2, 1, 1, 1)), "unexpected .*layer1.1."),
])
def test_moco_v2_wrong_architecture(tmp_path, other, message):
    model = tiny_model()
    path = tmp_path / "other.pth.tar"
    moco_checkpoint(model, path, trunk=other)
    with pytest.raises(VclrError, match=message):
        load_moco_v2(path, model)


def test_moco_v2_missing_keys_and_not_moco(tmp_path):
    model = tiny_model()
    path = tmp_path / "moco.pth.tar"
    moco_checkpoint(model, path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["state_dict"]["module.encoder_q.layer2.0.bn1.weight"]
    torch.save(checkpoint, path)
    with pytest.raises(VclrError, match=r"missing \(1\): layer2.0.bn1.weight"):
        load_moco_v2(path, tiny_model())
    torch.save({"state_dict": model.backbone.state_dict()}, path)
    with pytest.raises(VclrError, match="not a MoCo checkpoint"):
        load_moco_v2(path, model)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(VclrError, match="junk.pth"):
        load_moco_v2(tmp_path / "junk.pth", model)


def test_optimisation_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    vclr = Vclr(tiny_model(), queue_size=64, generator=torch.Generator().manual_seed(0))
    vclr.train()
    batch = random_batch(batch=8)
    optimizer = torch.optim.SGD([p for p in vclr.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for _ in range(20):
        total, _ = vclr_loss(vclr(batch))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        vclr.momentum_update(0.99)
        losses.append(float(total.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
