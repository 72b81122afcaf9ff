"""Learning rate of the paper's setting: linear scaling, linear warm-up from lr/100, cosine to eta_min.

Stepped per iteration (not per epoch), as the reference implementation does.
"""

from __future__ import annotations

import math

from vclr.errors import VclrError


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule: base_lr is the rate for a global batch of 256."""
    return base_lr * global_batch / 256


def lr_at(iteration: int, iters_per_epoch: int, epochs: int, base_lr: float, warmup_epochs: float,
          eta_min: float = 1e-6) -> float:
    """Learning rate of 0-based global `iteration`; `base_lr` is the peak (already scaled) rate.

    Warm-up: base_lr/100 at iteration 0, rising linearly to base_lr at the end of `warmup_epochs`;
    then cosine from base_lr to eta_min at the last iteration's end (epochs * iters_per_epoch).
    """
    if iters_per_epoch <= 0 or epochs <= 0:
        raise VclrError(f"schedule needs positive iters_per_epoch and epochs, got {iters_per_epoch}, {epochs}")
    total = epochs * iters_per_epoch
    warmup = min(int(round(warmup_epochs * iters_per_epoch)), total)
    if iteration < warmup:
        start = base_lr / 100
        return start + (base_lr - start) * iteration / warmup
    progress = (iteration - warmup) / max(total - warmup, 1)
    return eta_min + (base_lr - eta_min) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
