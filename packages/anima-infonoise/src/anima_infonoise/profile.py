"""The math of InfoNoise, free of state: bins in log σ, the per-sample entropy-rate estimate from a velocity MSE,
the gated profile, its CDF and inverse-CDF sampling. All in float64.

σ = t / (1 − t) is the noise-to-signal ratio of x_t / (1 − t) = x0 + σ·ε (rectified flow x_t = (1 − t)·x0 + t·ε).
The README derives :func:`entropy_rate_from_velocity_mse`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SIGMA_FLOOR = 1e-8
TINY = 1e-30  # below this a profile or its normaliser counts as zero


@dataclass(frozen=True)
class Bins:
    """``k`` bins uniform in log σ between the σ of ``t_min`` and of ``t_max``."""

    k: int
    t_min: float
    t_max: float

    @property
    def edges(self) -> torch.Tensor:
        """k + 1 edges in log σ."""
        lo, hi = math.log(self.t_min / (1 - self.t_min)), math.log(self.t_max / (1 - self.t_max))
        return torch.linspace(lo, hi, self.k + 1, dtype=torch.float64)

    @property
    def width(self) -> float:
        e = self.edges
        return float(e[1] - e[0])

    @property
    def centres(self) -> torch.Tensor:
        """σ at each bin's centre: the geometric mean of its edges."""
        e = self.edges
        return torch.exp(0.5 * (e[:-1] + e[1:]))

    def index(self, t: torch.Tensor) -> torch.Tensor:
        """The bin of each t; t beyond the range falls in the first or last bin."""
        t = t.to(torch.float64)
        log_sigma = torch.log(torch.clamp(t / torch.clamp(1 - t, min=SIGMA_FLOOR), min=SIGMA_FLOOR))
        return torch.searchsorted(self.edges[1:-1].contiguous(), log_sigma.contiguous())


def entropy_rate_from_velocity_mse(t: torch.Tensor, velocity_mse: torch.Tensor) -> torch.Tensor:
    """Per-sample estimate of the entropy rate −dH(x0 | x_t)/d log σ from the velocity MSE at t.

    x0 = x_t − t·v, so the clean-sample error is t²·(velocity error) and mmse_x0(σ)/σ² = (1 − t)²·mmse_v(t).
    """
    t = t.to(torch.float64)
    return (1 - t) ** 2 * velocity_mse.to(torch.float64)


def pivot(profile: torch.Tensor, centres: torch.Tensor, gate_pivot: float, onset_fraction: float) -> float:
    """The gate's c: ``gate_pivot``, or for 0 the centre of the last bin whose profile is ≥ onset × its maximum."""
    if gate_pivot > 0:
        return gate_pivot
    above = torch.nonzero(profile / profile.max() >= onset_fraction).flatten()
    return float(centres[int(above[-1])])


def gated(profile: torch.Tensor, centres: torch.Tensor, c: float, power: float) -> torch.Tensor:
    """The profile times the low-noise gate σⁿ / (σⁿ + cⁿ), clipped at 0."""
    s = centres ** power
    return torch.clamp(profile * s / (s + c ** power), min=0.0)


def cdf_of(density: torch.Tensor, width: float) -> torch.Tensor | None:
    """k + 1 CDF values of a piecewise-constant density over the bins (None if it has no mass)."""
    z = float((density * width).sum())
    if not z >= TINY:
        return None
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(density * width / z, 0)])
    cdf[-1] = 1.0
    return torch.clamp(cdf, 0.0, 1.0)


def inverse_cdf(u: torch.Tensor, cdf: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """log σ for uniforms u in [0, 1): piecewise-linear inverse of the CDF (bins without mass are never hit)."""
    u = u.to(torch.float64)
    k = torch.clamp(torch.searchsorted(cdf, u, right=True) - 1, 0, len(cdf) - 2)
    lo, hi = cdf[k], cdf[k + 1]
    frac = torch.where(hi > lo, (u - lo) / torch.clamp(hi - lo, min=TINY), torch.zeros_like(u))
    return edges[k] + frac * (edges[k + 1] - edges[k])


def t_of_log_sigma(log_sigma: torch.Tensor) -> torch.Tensor:
    """t = σ / (1 + σ) = sigmoid(log σ)."""
    return torch.sigmoid(log_sigma)
