"""Core lr_scheduler variants ``constant``, ``cosine`` and ``cosine_with_restarts``, each with linear warm-up.

All three are ``torch.optim.lr_scheduler.LambdaLR`` over the pure factor functions below (one lambda per param
group, so ``eta_min`` is the same absolute floor for groups with different base lrs). ``CosineAnnealingWarmRestarts``
is not used because it only accepts an integer period multiplier.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

from anima_core.options import LRSchedulerOptions, field
from anima_core.specs import VariantSpec


class ConstantOptions(LRSchedulerOptions):
    type: Literal["constant"] = "constant"


class CosineOptions(LRSchedulerOptions):
    type: Literal["cosine"] = "cosine"
    eta_min: float = field(0.0, "Final learning rate (absolute).", ge=0)


class CosineWithRestartsOptions(LRSchedulerOptions):
    type: Literal["cosine_with_restarts"] = "cosine_with_restarts"
    period: Optional[int] = field(None, "Steps of the first cycle (default: a quarter of the post-warm-up steps).",
                                  ge=1)
    period_mult: float = field(1.0, "Each cycle is this many times longer than the previous one.", ge=1.0)
    eta_min: float = field(0.0, "Learning rate at the bottom of each cycle (absolute).", ge=0)


def warmup_factor(step: int, warmup: int) -> float:
    """Linear warm-up: 0 at step 0, reaching 1 at ``warmup``."""
    return step / warmup if step < warmup else 1.0


def cosine_factor(step: int, warmup: int, total: int, floor: float) -> float:
    if step < warmup:
        return warmup_factor(step, warmup)
    p = min(max((step - warmup) / max(1, total - warmup), 0.0), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def restarts_factor(step: int, warmup: int, period: float, mult: float, floor: float) -> float:
    if step < warmup:
        return warmup_factor(step, warmup)
    pos, length = float(step - warmup), float(period)
    while pos >= length:
        pos -= length
        length *= mult
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * pos / length))


def _floors(optimizer, eta_min: float) -> list[float]:
    return [min(1.0, eta_min / g["lr"]) if g["lr"] > 0 else 0.0 for g in optimizer.param_groups]


def _lambda_lr(optimizer, factors):
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lr_lambda=factors)


def _constant(options: ConstantOptions, optimizer, total_steps: int):
    w = options.warmup_steps
    return _lambda_lr(optimizer, lambda step: warmup_factor(step, w))


def _cosine(options: CosineOptions, optimizer, total_steps: int):
    w = min(options.warmup_steps, total_steps)
    return _lambda_lr(optimizer, [
        (lambda step, m=m: cosine_factor(step, w, total_steps, m)) for m in _floors(optimizer, options.eta_min)])


def _restarts(options: CosineWithRestartsOptions, optimizer, total_steps: int):
    w = min(options.warmup_steps, total_steps)
    period = options.period or max(1, (total_steps - w) // 4)
    return _lambda_lr(optimizer, [
        (lambda step, m=m: restarts_factor(step, w, period, options.period_mult, m))
        for m in _floors(optimizer, options.eta_min)])


CONSTANT = VariantSpec(name="constant", options=ConstantOptions, build=_constant,
                       description="Constant learning rate after linear warm-up.")
COSINE = VariantSpec(name="cosine", options=CosineOptions, build=_cosine,
                     description="Cosine decay to eta_min over the run, after linear warm-up.")
COSINE_WITH_RESTARTS = VariantSpec(name="cosine_with_restarts", options=CosineWithRestartsOptions, build=_restarts,
                                   description="Cosine cycles (period × period_mult each time), after warm-up.")
