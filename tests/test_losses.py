"""InfoNCE, the four VCLR terms, their switches and the non-finite check."""

from __future__ import annotations

import math

import pytest
import torch

from vclr.errors import VclrError
from vclr.train.losses import LOSS_TERMS, info_nce, intra_loss, order_loss, vclr_loss


def fake_outputs(batch: int = 2, queue: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def sims(*shape):
        return torch.rand(*shape, generator=generator) * 2 - 1

    return {
        "inter_logits": sims(3 * batch, 1 + queue),
        "intra_logits": sims(2 * batch, 2),
        "segment_logits": sims(batch, 1 + queue),
        "order_logits": torch.randn(batch, 4, generator=generator),
        "order_targets": torch.tensor([3, 1][:batch]),
    }


def test_info_nce_hand_computed_2x3():
    logits = torch.tensor([[1.0, 0.5, -1.0], [0.2, 0.4, 0.1]])
    temperature = 0.5
    row1 = -2.0 + math.log(math.exp(2.0) + math.exp(1.0) + math.exp(-2.0))
    row2 = -0.4 + math.log(math.exp(0.4) + math.exp(0.8) + math.exp(0.2))
    assert info_nce(logits, temperature).item() == pytest.approx((row1 + row2) / 2, rel=1e-6)
    assert info_nce(logits, 1.0).item() != pytest.approx((row1 + row2) / 2, rel=1e-3)
    with pytest.raises(VclrError, match="temperature"):
        info_nce(logits, 0.0)


def test_intra_rows_positive_is_first_column():
    # rows [q.x1, q.x2] and [q.x1, q.x3]: the same-frame view (column 0) is the positive.
    outputs = {"intra_logits": torch.tensor([[0.3, 0.1], [0.3, 0.4]])}
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0))) / 2
    assert intra_loss(outputs, 0.1).item() == pytest.approx(expected, rel=1e-5)
    swapped = {"intra_logits": outputs["intra_logits"].flip(1)}
    assert intra_loss(swapped, 0.1).item() == pytest.approx(
        (math.log(1 + math.exp(2.0)) + math.log(1 + math.exp(-1.0))) / 2, rel=1e-5)


def test_order_loss_is_four_way_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    outputs = {"order_logits": logits, "order_targets": torch.tensor([0, 3])}
    expected = -2.0 + math.log(math.exp(2.0) + 3) - 1.0 + math.log(math.exp(1.0) + 3)
    assert order_loss(outputs).item() == pytest.approx(expected / 2, rel=1e-6)


def test_each_switch_changes_the_total_by_exactly_its_term():
    outputs = fake_outputs()
    weights = {"inter": 1.0, "intra": 0.5, "segment": 2.0, "order": 1.0}
    total, terms = vclr_loss(outputs, weights, temperatures=0.1)
    assert set(terms) == set(LOSS_TERMS)
    assert total.item() == pytest.approx(sum(weights[t] * terms[t].item() for t in LOSS_TERMS), rel=1e-6)
    for term in LOSS_TERMS:
        reduced, reduced_terms = vclr_loss(outputs, {**weights, term: 0.0}, temperatures=0.1)
        assert term not in reduced_terms
        assert (total - reduced).item() == pytest.approx(weights[term] * terms[term].item(), rel=1e-5, abs=1e-6)
    seco, seco_terms = vclr_loss(outputs, {"inter": 1, "intra": 1})  # absent terms are off
    assert set(seco_terms) == {"inter", "intra"}
    assert seco.item() == pytest.approx(terms["inter"].item() + terms["intra"].item(), rel=1e-6)


def test_temperatures_per_term():
    outputs = fake_outputs()
    _, default = vclr_loss(outputs)
    _, changed = vclr_loss(outputs, temperatures={"segment": 0.5})
    assert changed["segment"].item() != pytest.approx(default["segment"].item(), rel=1e-3)
    assert changed["inter"].item() == pytest.approx(default["inter"].item())


def test_switch_errors():
    with pytest.raises(VclrError, match="unknown loss term in weights: tsn"):
        vclr_loss(fake_outputs(), {"inter": 1, "tsn": 1})
    with pytest.raises(VclrError, match="switched off"):
        vclr_loss(fake_outputs(), {"inter": 0})


@pytest.mark.parametrize("term", LOSS_TERMS)
def test_non_finite_term_is_named(term):
    outputs = fake_outputs()
    outputs[f"{term}_logits"][0, 1] = float("nan")
    with pytest.raises(VclrError, match=f"loss term '{term}' is not finite"):
        vclr_loss(outputs)
    others = {t: 1.0 for t in LOSS_TERMS if t != term}
    total, _ = vclr_loss(outputs, others)  # a switched-off term is not computed, so not checked
    assert torch.isfinite(total)
