"""Core inference_sampler variants ``euler`` and ``er_sde``."""

from __future__ import annotations

from typing import Literal

from anima_core.options import InferenceSamplerOptions, field
from anima_core.specs import VariantSpec


class EulerOptions(InferenceSamplerOptions):
    type: Literal["euler"] = "euler"


class ERSDEOptions(InferenceSamplerOptions):
    type: Literal["er_sde"] = "er_sde"
    s_noise: float = field(1.0, "Scale of the fresh noise added each step (0 = deterministic).", ge=0)
    max_stage: int = field(3, "Solver order (1 = Euler-like, 3 = ComfyUI's default).", ge=1, le=3)


def _euler(options: EulerOptions):
    from anima_core.samplers import EulerSampler

    return EulerSampler()


def _er_sde(options: ERSDEOptions):
    from anima_core.samplers import ERSDESampler

    return ERSDESampler(s_noise=options.s_noise, max_stage=options.max_stage)


EULER = VariantSpec(name="euler", options=EulerOptions, build=_euler,
                    description="Deterministic Euler on the flow ODE.")
ER_SDE = VariantSpec(name="er_sde", options=ERSDEOptions, build=_er_sde,
                     description="ComfyUI's Extended Reverse-Time SDE solver (ER-SDE-Solver-3), Anima's default.")
