"""The four VCLR loss terms and their switchable weighted sum (spec/method.md, "Losses").

Contrastive terms are InfoNCE: cross-entropy with the positive logit at index 0, the logits (raw
cosine similarities from vclr.models.vclr) divided by a temperature. Switching a term off (weight
0) removes it from the total exactly; the ablations are sets of switched-on terms:
SeCo baseline = {inter, intra}; + segment; + order (full VCLR).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from vclr.errors import VclrError

LOSS_TERMS = ("inter", "intra", "segment", "order")
CONTRASTIVE_TERMS = ("inter", "intra", "segment")
DEFAULT_TEMPERATURE = 0.1


def info_nce(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean cross-entropy of `logits / temperature` [N, 1 + negatives] with the positive at column 0."""
    if temperature <= 0:
        raise VclrError(f"temperature must be positive, got {temperature}")
    targets = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float() / temperature, targets)


def inter_loss(outputs: Mapping[str, torch.Tensor], temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """L_inter: 3B rows (x1, x2, x3 keys as positives of q) against the frame queue."""
    return info_nce(outputs["inter_logits"], temperature)


def intra_loss(outputs: Mapping[str, torch.Tensor], temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """L_intra: 2B rows [q.x1, q.x2] and [q.x1, q.x3] (same-frame view positive)."""
    return info_nce(outputs["intra_logits"], temperature)


def segment_loss(outputs: Mapping[str, torch.Tensor], temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """L_segment: query-tuple vs key-tuple video embedding against the segment queue."""
    return info_nce(outputs["segment_logits"], temperature)


def order_loss(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """L_order: 4-way cross-entropy of the order classifier."""
    return F.cross_entropy(outputs["order_logits"].float(), outputs["order_targets"])


def _per_term(values: Mapping[str, float] | float, name: str, default: float) -> dict[str, float]:
    if isinstance(values, (int, float)):
        return dict.fromkeys(LOSS_TERMS, float(values))
    unknown = sorted(set(values) - set(LOSS_TERMS))
    if unknown:
        raise VclrError(f"unknown loss term in {name}: {', '.join(unknown)} (known: {', '.join(LOSS_TERMS)})")
    return {term: float(values.get(term, default)) for term in LOSS_TERMS}


def vclr_loss(outputs: Mapping[str, torch.Tensor], weights: Mapping[str, float] | float = 1.0,
              temperatures: Mapping[str, float] | float = DEFAULT_TEMPERATURE,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, {term: detached value}) over the switched-on terms.

    weights: {term: weight}; a term absent or with weight 0 (False) is off and not computed.
    A float applies to every term. temperatures: {term: T} or one T (unused by `order`).
    A non-finite term raises VclrError naming it (the caller adds the step).
    """
    weights = _per_term(weights, "weights", 0.0)
    temperatures = _per_term(temperatures, "temperatures", DEFAULT_TEMPERATURE)
    compute = {
        "inter": lambda: inter_loss(outputs, temperatures["inter"]),
        "intra": lambda: intra_loss(outputs, temperatures["intra"]),
        "segment": lambda: segment_loss(outputs, temperatures["segment"]),
        "order": lambda: order_loss(outputs),
    }
    values = {term: compute[term]() for term in LOSS_TERMS if weights[term]}
    # One host sync for the check (not one per term): on a GPU each sync stalls the step's launches.
    if values and not torch.isfinite(torch.stack([value.detach().float() for value in values.values()])).all():
        term, value = next((term, value) for term, value in values.items() if not torch.isfinite(value))
        raise VclrError(f"loss term {term!r} is not finite ({value.item()})")
    total, terms = None, {}
    for term, value in values.items():
        terms[term] = value.detach()
        total = weights[term] * value if total is None else total + weights[term] * value
    if total is None:
        raise VclrError(f"every loss term is switched off (weights: {dict(weights)})")
    return total, terms
