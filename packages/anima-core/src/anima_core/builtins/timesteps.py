"""Core timestep_sampler variants ``uniform``, ``logit_normal`` and ``mode``.

t is the rectified-flow time (σ fed to the DiT): x_t = (1 − t)·x0 + t·ε. ``shift`` maps t → s·t / (1 + (s − 1)·t)
(s > 1 moves mass to high noise, as ComfyUI's and sd-scripts' discrete flow shift).
"""

from __future__ import annotations

from typing import Literal

from anima_core.options import TimestepSamplerOptions, field
from anima_core.specs import VariantSpec

T_MIN, T_MAX = 1e-4, 1.0 - 1e-4


class UniformOptions(TimestepSamplerOptions):
    type: Literal["uniform"] = "uniform"
    shift: float = field(1.0, "Flow shift applied to the draw.", gt=0)


class LogitNormalOptions(TimestepSamplerOptions):
    type: Literal["logit_normal"] = "logit_normal"
    mean: float = field(0.0, "Mean of the normal before the sigmoid.")
    std: float = field(1.0, "Std of the normal before the sigmoid.", gt=0)
    shift: float = field(1.0, "Flow shift applied to the logit-normal draw (< 1 favours low noise).", gt=0)
    uniform_mix_prob: float = field(0.0, "Per sample, the probability of drawing plain uniform t instead "
                                         "(the reference's mixed_uniform_* modes).", ge=0, le=1, advanced=True)


class ModeOptions(TimestepSamplerOptions):
    type: Literal["mode"] = "mode"
    mode_scale: float = field(1.29, "SD3 mode-sampling scale s.")
    shift: float = field(1.0, "Flow shift applied to the draw.", gt=0)


def shift_t(t, s: float):
    return t if s == 1.0 else s * t / (1.0 + (s - 1.0) * t)


class TimestepDistribution:
    """A stateless sampler: ``draw(n, generator)`` gives t before clamping."""

    def __init__(self, draw) -> None:
        self._draw = draw

    def sample(self, batch_size: int, generator=None):
        return self._draw(batch_size, generator).clamp(T_MIN, T_MAX)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    def status(self) -> dict:
        return {}


def _uniform(options: UniformOptions, total_steps: int | None = None):
    import torch

    return TimestepDistribution(lambda n, g: shift_t(torch.rand(n, generator=g), options.shift))


def _logit_normal(options: LogitNormalOptions, total_steps: int | None = None):
    import torch

    def draw(n, g):
        t = shift_t(torch.sigmoid(options.mean + options.std * torch.randn(n, generator=g)), options.shift)
        if options.uniform_mix_prob > 0:
            pick_uniform = torch.rand(n, generator=g) < options.uniform_mix_prob
            t = torch.where(pick_uniform, torch.rand(n, generator=g), t)
        return t

    return TimestepDistribution(draw)


def _mode(options: ModeOptions, total_steps: int | None = None):
    import math

    import torch

    def draw(n, g):
        # SD3's mode sampling on a uniform u (the reference feeds sigmoid(normal) here, which is not SD3's rule).
        u = torch.rand(n, generator=g)
        t = 1.0 - u - options.mode_scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
        return shift_t(t, options.shift)

    return TimestepDistribution(draw)


UNIFORM = VariantSpec(name="uniform", options=UniformOptions, build=_uniform, description="t ~ U(0, 1), shifted.")
LOGIT_NORMAL = VariantSpec(name="logit_normal", options=LogitNormalOptions, build=_logit_normal,
                           description="t = sigmoid(N(mean, std)), shifted (sd-scripts' default 'sigmoid').")
MODE = VariantSpec(name="mode", options=ModeOptions, build=_mode, description="SD3 mode sampling, shifted.")
