"""Core optimizer variant ``adamw``."""

from __future__ import annotations

from typing import Literal

from anima_core.options import OptimizerOptions, field
from anima_core.specs import VariantSpec


class AdamWOptions(OptimizerOptions):
    type: Literal["adamw"] = "adamw"
    betas: tuple[float, float] = field((0.9, 0.999), "Adam β1, β2.", advanced=True)
    eps: float = field(1e-8, "Adam ε.", gt=0, advanced=True)
    weight_decay: float = field(0.01, "Decoupled weight decay.", ge=0)


def _build(options: AdamWOptions, param_groups):
    import torch

    return torch.optim.AdamW(param_groups, lr=options.lr, betas=options.betas, eps=options.eps,
                             weight_decay=options.weight_decay)


ADAMW = VariantSpec(name="adamw", options=AdamWOptions, build=_build, description="torch.optim.AdamW.")
