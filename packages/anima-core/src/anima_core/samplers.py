"""Inference samplers over any ``denoise_fn(x, sigma) -> x0 estimate`` of a rectified-flow model
(x_σ = (1 − σ)·x0 + σ·ε), and the flow sigma schedule ComfyUI uses for Anima."""

from __future__ import annotations

from typing import Callable, Optional

import torch

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]


def flow_shift(t, shift: float):
    return shift * t / (1.0 + (shift - 1.0) * t)


def simple_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """ComfyUI's "simple" schedule on ``ModelSamplingDiscreteFlow(shift)``: every (1000/steps)-th entry of the
    1000-entry shifted table, from σ = 1 down, then 0."""
    table = flow_shift(torch.arange(1, 1001, dtype=torch.float64) / 1000.0, shift)
    step = len(table) / steps
    sigmas = [float(table[-(1 + int(i * step))]) for i in range(steps)]
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


def _call(denoise_fn: DenoiseFn, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return denoise_fn(x, sigma.to(x.device).expand(x.shape[0]))


class EulerSampler:
    """Deterministic Euler on the probability-flow ODE: d = (x − x0) / σ, x ← x + d·(σ_next − σ)."""

    @torch.no_grad()
    def sample(self, denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
               callback: Optional[StepCallback] = None, **_: object) -> torch.Tensor:
        n = len(sigmas) - 1
        for i in range(n):
            x0 = _call(denoise_fn, x, sigmas[i])
            if callback is not None:
                callback(i, n, x0)
            if float(sigmas[i + 1]) == 0.0:
                x = x0
            else:
                d = (x - x0) / sigmas[i]
                x = x + d * (sigmas[i + 1] - sigmas[i])
        return x


def _er_noise_scaler(lam: torch.Tensor) -> torch.Tensor:
    return lam * (torch.exp(lam ** 0.3) + 10.0)


class ERSDESampler:
    """ER-SDE-Solver-3 (Cui et al., arXiv 2309.06169) as ComfyUI's ``sample_er_sde`` runs it on flow models:
    λ = σ / (1 − σ), α = 1 − σ, noise scaler λ·(exp(λ^0.3) + 10), stages 2 and 3 from 200-point integrals.

    A first σ of 1 (infinite λ) is moved to ``shift(1 − 1e-4)``, as ComfyUI's ``offset_first_sigma_for_snr``.
    """

    N_POINTS = 200

    def __init__(self, s_noise: float = 1.0, max_stage: int = 3) -> None:
        self.s_noise = s_noise
        self.max_stage = max_stage

    @torch.no_grad()
    def sample(self, denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
               generator: Optional[torch.Generator] = None, callback: Optional[StepCallback] = None,
               shift: float = 1.0, **_: object) -> torch.Tensor:
        sigmas = sigmas.to(torch.float32).cpu().clone()
        if len(sigmas) > 1 and float(sigmas[0]) >= 1.0:
            sigmas[0] = flow_shift(1.0 - 1e-4, shift)
        lambdas = sigmas / (1.0 - sigmas)
        points = torch.arange(self.N_POINTS, dtype=torch.float32)
        old_x0: Optional[torch.Tensor] = None
        old_d: Optional[torch.Tensor] = None
        n = len(sigmas) - 1
        for i in range(n):
            x0 = _call(denoise_fn, x, sigmas[i])
            if callback is not None:
                callback(i, n, x0)
            stage = min(self.max_stage, i + 1)
            if float(sigmas[i + 1]) == 0.0:
                x = x0
            else:
                lam_s, lam_t = lambdas[i], lambdas[i + 1]
                alpha_s, alpha_t = 1.0 - sigmas[i], 1.0 - sigmas[i + 1]
                r = _er_noise_scaler(lam_t) / _er_noise_scaler(lam_s)
                x = (alpha_t / alpha_s) * r * x + alpha_t * (1.0 - r) * x0
                if stage >= 2 and old_x0 is not None:
                    dt = lam_t - lam_s
                    step = -dt / self.N_POINTS
                    lam_pos = lam_t + points * step
                    scaled = _er_noise_scaler(lam_pos)
                    s = torch.sum(1.0 / scaled) * step
                    d = (x0 - old_x0) / (lam_s - lambdas[i - 1])
                    x = x + alpha_t * (dt + s * _er_noise_scaler(lam_t)) * d
                    if stage >= 3 and old_d is not None:
                        s_u = torch.sum((lam_pos - lam_s) / scaled) * step
                        u = (d - old_d) / ((lam_s - lambdas[i - 2]) / 2.0)
                        x = x + alpha_t * (dt ** 2 / 2.0 + s_u * _er_noise_scaler(lam_t)) * u
                    old_d = d
                if self.s_noise > 0:
                    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
                    std = torch.sqrt(torch.clamp(lam_t ** 2 - lam_s ** 2 * r ** 2, min=0.0))
                    x = x + alpha_t * noise * self.s_noise * std
            old_x0 = x0
        return x


def velocity_to_x0(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = x − σ·v for the velocity v = ε − x0 (ComfyUI's CONST model sampling)."""
    return x - sigma.view(-1, *([1] * (x.dim() - 1))) * v


__all__ = ["ERSDESampler", "EulerSampler", "flow_shift", "simple_sigmas", "velocity_to_x0"]
