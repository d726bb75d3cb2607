"""Per-sample loss weights over the flow time t (``train.loss_weighting``)."""

from __future__ import annotations

import math

import torch

T_EPS = 1e-4


def loss_weight(t: torch.Tensor, scheme: str, *, min_snr_gamma: float = 5.0, detail_inv_t_min: float = 1.0,
                detail_inv_t_max: float = 5.0, cap_ratio: float = 0.0) -> torch.Tensor:
    """Weights of shape [B] for the batch's t; SNR = ((1 − t)/t)² for x_t = (1 − t)·x0 + t·ε."""
    tc = t.clamp(T_EPS, 1.0 - T_EPS)
    if scheme == "none":
        return torch.ones_like(tc)
    if scheme == "min_snr":
        snr = ((1.0 - tc) / tc) ** 2
        w = torch.clamp(min_snr_gamma / snr, max=1.0)
    elif scheme == "detail_inv_t":
        w = torch.clamp(1.0 / tc, detail_inv_t_min, detail_inv_t_max)
    elif scheme == "cosmap":
        w = 2.0 / (math.pi * torch.clamp(1.0 - 2.0 * tc + 2.0 * tc * tc, min=1e-4))
    else:
        raise ValueError(f"unknown loss weighting scheme {scheme!r}")
    if cap_ratio > 1.0:
        w = torch.clamp(w, max=float(w.min().clamp(min=1e-4)) * cap_ratio)
    return w


def broadcast_to(weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] weights reshaped to multiply a per-element loss of shape (B, ...)."""
    return weight.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)
