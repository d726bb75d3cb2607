"""Optimizer ``prodigy``: prodigyopt's Prodigy (Mishchenko & Defazio), which estimates the step size d itself; lr
is a multiplier of that estimate (1.0 unless you know why)."""

from __future__ import annotations

from typing import Literal, Optional

from anima_core.options import OptimizerOptions, field
from anima_core.specs import VariantSpec


class ProdigyOptions(OptimizerOptions):
    type: Literal["prodigy"] = "prodigy"
    lr: float = field(1.0, "Multiplier of the estimated step size d (keep 1.0).", gt=0)
    betas: tuple[float, float] = field((0.9, 0.999), "Adam β1, β2.", advanced=True)
    d_coef: float = field(1.0, "Scales the estimated d (< 1 smaller steps, > 1 larger).", gt=0)
    use_bias_correction: bool = field(True, "Adam-style bias correction of d (the reference's default).")
    safeguard_warmup: bool = field(False, "Avoid overestimating d during lr warm-up.", advanced=True)
    growth_rate: Optional[float] = field(None, "Max factor d may grow by per step (None = unlimited).", gt=1,
                                         advanced=True)
    decouple: bool = field(True, "AdamW-style decoupled weight decay.", advanced=True)
    weight_decay: float = field(0.0, "Weight decay.", ge=0)
    slice_p: int = field(1, "Estimate d on every p-th element (memory saving; 11 is common).", ge=1,
                         advanced=True)


def build(options: ProdigyOptions, param_groups):
    from prodigyopt import Prodigy

    return Prodigy(param_groups, lr=options.lr, betas=options.betas, d_coef=options.d_coef,
                   use_bias_correction=options.use_bias_correction, safeguard_warmup=options.safeguard_warmup,
                   growth_rate=float("inf") if options.growth_rate is None else options.growth_rate, decouple=options.decouple, weight_decay=options.weight_decay,
                   slice_p=options.slice_p)


PRODIGY = VariantSpec(name="prodigy", options=ProdigyOptions, build=build, capabilities=frozenset({"adaptive_lr"}),
                      description="Prodigy (prodigyopt): Adam with an estimated step size; lr is a multiplier.")
