"""Core loss variants ``mse`` and ``huber``; each returns the per-element loss."""

from __future__ import annotations

from typing import Literal

from anima_core.options import LossOptions, field
from anima_core.specs import VariantSpec


class MSEOptions(LossOptions):
    type: Literal["mse"] = "mse"


class HuberOptions(LossOptions):
    type: Literal["huber"] = "huber"
    delta: float = field(0.15, "Constant δ: quadratic below it, linear above.", gt=0)


class MSELoss:
    def compute(self, pred, target, t):
        import torch.nn.functional as F

        return F.mse_loss(pred, target, reduction="none")


class HuberLoss:
    def __init__(self, delta: float) -> None:
        self.delta = delta

    def compute(self, pred, target, t):
        import torch

        diff = pred - target
        absd = diff.abs()
        # Strict "<": |x| == δ takes the linear branch (the reference's convention).
        return torch.where(absd < self.delta, 0.5 * diff * diff, self.delta * (absd - 0.5 * self.delta))


MSE = VariantSpec(name="mse", options=MSEOptions, build=lambda options: MSELoss(),
                  description="Mean squared error on the velocity.")
HUBER = VariantSpec(name="huber", options=HuberOptions, build=lambda options: HuberLoss(options.delta),
                    description="Huber loss with a constant δ.")
