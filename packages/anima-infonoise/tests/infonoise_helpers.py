"""Shared helpers of the anima-infonoise tests: build a sampler from option overrides, and feed it losses that
give a chosen entropy-rate value in every bin."""

from __future__ import annotations

import torch
from anima_infonoise.options import InfoNoiseOptions
from anima_infonoise.sampler import InfoNoiseSampler


def make(total_steps: int | None = 1000, **options) -> InfoNoiseSampler:
    return InfoNoiseSampler(InfoNoiseOptions(**options), total_steps)


def bin_centre_t(sampler: InfoNoiseSampler) -> torch.Tensor:
    c = sampler.bins.centres
    return (c / (1 + c)).to(torch.float32)


def feed(sampler: InfoNoiseSampler, rate, repeats: int = 1) -> None:
    """Record, at every bin centre, the velocity MSE whose entropy-rate estimate is ``rate`` (a number or one
    value per bin), ``repeats`` times."""
    t = bin_centre_t(sampler).to(torch.float64)
    rate = torch.as_tensor(rate, dtype=torch.float64).expand(len(t))
    velocity_mse = rate / (1 - t) ** 2  # inverse of (1 − t)²·mse_v
    for _ in range(repeats):
        sampler.record(t.to(torch.float32), velocity_mse.to(torch.float32))
