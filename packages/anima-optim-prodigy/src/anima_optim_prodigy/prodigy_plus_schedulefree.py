"""Optimizer ``prodigy_plus_schedulefree``: Prodigy + ScheduleFree (prodigy-plus-schedule-free). Schedule-free:
no lr schedule (only ``constant``), and the weights to sample and save are the averaged ones, which core selects
with the optimizer's ``eval()`` (declared through the ``schedule_free`` capability)."""

from __future__ import annotations

from typing import Literal

from anima_core.options import OptimizerOptions, field
from anima_core.specs import VariantSpec, error, warning


class ProdigyPlusScheduleFreeOptions(OptimizerOptions):
    type: Literal["prodigy_plus_schedulefree"] = "prodigy_plus_schedulefree"
    lr: float = field(1.0, "Multiplier of the estimated step size d (keep 1.0).", gt=0)
    betas: tuple[float, float] = field((0.9, 0.99), "β1, β2.", advanced=True)
    d_coef: float = field(1.0, "Scales the estimated d.", gt=0)
    d_limiter: bool = field(True, "Limit how fast d grows (with d_coef < 1 it can keep d at its start value).")
    prodigy_steps: int = field(0, "Stop adapting d after this many steps (0 = never).", ge=0)
    schedulefree_c: float = field(0.0, "ScheduleFree averaging constant (0 = the library's default rule).", ge=0,
                                  advanced=True)
    split_groups: bool = field(True, "A separate d per param group.", advanced=True)
    split_groups_mean: bool = field(False, "Use the mean d of all groups.", advanced=True)
    use_speed: bool = field(False, "The library's SPEED d estimate.", advanced=True)
    fused_back_pass: bool = field(False, "Step inside backward (not supported by anima's loop).", advanced=True)
    use_stableadamw: bool = field(True, "StableAdamW update clipping.", advanced=True)
    weight_decay: float = field(0.0, "Weight decay.", ge=0)


def build(options: ProdigyPlusScheduleFreeOptions, param_groups):
    from prodigyplus import ProdigyPlusScheduleFree

    return ProdigyPlusScheduleFree(
        param_groups, lr=options.lr, betas=options.betas, d_coef=options.d_coef, d_limiter=options.d_limiter,
        prodigy_steps=options.prodigy_steps, schedulefree_c=options.schedulefree_c,
        split_groups=options.split_groups, split_groups_mean=options.split_groups_mean,
        use_speed=options.use_speed, fused_back_pass=options.fused_back_pass,
        use_stableadamw=options.use_stableadamw, weight_decay=options.weight_decay)


def validate(options: ProdigyPlusScheduleFreeOptions, config):
    if options.d_limiter and options.d_coef < 1:
        yield warning("optimizer.d_coef", f"d_coef {options.d_coef} < 1 with d_limiter on can keep d stuck at its "
                                          f"start value (nothing trains); set d_limiter: false or d_coef >= 1")
    if options.fused_back_pass:
        yield error("optimizer.fused_back_pass", "the fused backward pass needs a training loop that steps inside "
                                                 "backward; anima's loop does not")


PRODIGY_PLUS_SCHEDULEFREE = VariantSpec(
    name="prodigy_plus_schedulefree", options=ProdigyPlusScheduleFreeOptions, build=build, validate=validate,
    capabilities=frozenset({"adaptive_lr", "schedule_free"}),
    description="Prodigy + ScheduleFree: no lr schedule, averaged weights are sampled and saved.")
