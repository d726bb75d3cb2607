"""Options of timestep_sampler ``infonoise`` (no torch here: the CLI imports this module for ``--help``).

Letters in the descriptions are the reference's names (K, N_warm, M, B, β, N_min, c); the README explains the
defaults that differ from the reference (K, N_min, ``explore``) and why.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from anima_core.builtins.timesteps import LogitNormalOptions, ModeOptions, UniformOptions
from anima_core.options import TimestepSamplerOptions, field, ui
from pydantic import Field, model_validator

# The distribution sampled before the first refresh and whenever a refresh degrades: one of core's stateless
# samplers, written as that sampler's own config section ({type: logit_normal, shift: 3.0}).
BaseDistribution = Annotated[Union[LogitNormalOptions, UniformOptions, ModeOptions], Field(discriminator="type")]

AUTO_WARMUP_MIN, AUTO_WARMUP_FRACTION = 200, 0.2


class InfoNoiseOptions(TimestepSamplerOptions):
    type: Literal["infonoise"] = "infonoise"
    bins: int = field(32, "K: bins uniform in log σ (σ = t / (1 − t)) over [t_min, t_max].", ge=2, le=1024)
    t_min: float = field(0.001, "Lower end of the binned t range.", gt=0, lt=1, advanced=True)
    t_max: float = field(0.999, "Upper end of the binned t range.", gt=0, lt=1, advanced=True)
    warmup_steps: int = field(0, "N_warm: optimizer steps before the first refresh (0 = auto: max(200, 20% of "
                                 "the run)).", ge=0)
    refresh_every: int = field(100, "M: refresh the distribution every M optimizer steps after warm-up.", ge=1)
    fifo_size: int = field(256, "B: newest losses kept per bin.", ge=1, advanced=True)
    ema_beta: float = field(0.9, "β: weight of the NEW bin means in the profile's EMA (history 1, new 10, "
                                 "β 0.9 → 9.1).", ge=0, le=1, advanced=True)
    min_per_bin: int = field(8, "N_min: every bin needs this many losses before a refresh.", ge=1)
    gate_pivot: float = field(0.15, "c: σ where the low-noise gate σⁿ / (σⁿ + cⁿ) halves the profile "
                                    "(0 = the dynamic rule).", ge=0)
    gate_power: float = field(3.0, "n: exponent of the low-noise gate.", gt=0, advanced=True)
    onset_fraction: float = field(0.002, "p_onset: for c = 0, c is the last bin whose profile is ≥ p_onset × its "
                                         "maximum.", gt=0, lt=1, advanced=True)
    explore: float = field(0.25, "ε: share of every batch drawn log-uniformly over the bins still short of "
                                 "N_min losses (over all bins once none is): fills every bin, keeps every bin "
                                 "measured after activation.", ge=0, lt=1)
    base: BaseDistribution = Field(default_factory=LogitNormalOptions,
                                   description="Distribution used until the first refresh and after a degraded "
                                               "one (a core timestep_sampler section).",
                                   json_schema_extra=ui(advanced=True))

    @model_validator(mode="after")
    def _consistent(self) -> InfoNoiseOptions:
        if self.t_min >= self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must be below t_max ({self.t_max})")
        if self.min_per_bin > self.fifo_size:
            raise ValueError(f"min_per_bin ({self.min_per_bin}) must not exceed fifo_size ({self.fifo_size}): a bin "
                             f"never holds more than fifo_size losses, so no refresh would ever run")
        return self

    def resolved_warmup(self, total_steps: int | None) -> int:
        """N_warm, with the reference's auto rule for 0: max(200, int(0.2 × total steps (5000 if unknown)))."""
        if self.warmup_steps > 0:
            return self.warmup_steps
        return max(AUTO_WARMUP_MIN, int((total_steps or 5000) * AUTO_WARMUP_FRACTION))
