"""Training noise: plain Gaussian, or with offset or pyramid structure (``train.noise``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_noise(latents: torch.Tensor, kind: str = "none", *, offset: float = 0.0, pyramid_iterations: int = 6,
               pyramid_discount: float = 0.35, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise like ``latents`` (B, C, T, H, W) or (B, C, H, W).

    offset: adds ``offset · N(0,1)`` per sample and channel. pyramid: adds bilinearly upsampled noise of
    2×, 4×, ... smaller sides, weighted discount^(level), then rescales to unit std.
    """
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)

    noise = randn(*latents.shape)
    b, c = latents.shape[:2]
    spatial = latents.shape[2:]
    if kind == "offset" and offset > 0:
        noise = noise + offset * randn(b, c, *([1] * len(spatial)))
    elif kind == "pyramid":
        h, w = spatial[-2:]
        lead = spatial[:-2]
        flat = noise.reshape(b, -1, h, w)
        cur = flat.clone()
        for i in range(pyramid_iterations):
            r = 2 ** (i + 1)
            sh, sw = max(h // r, 1), max(w // r, 1)
            extra = randn(b, flat.shape[1], sh, sw)
            cur = cur + F.interpolate(extra, size=(h, w), mode="bilinear", align_corners=False) * (
                pyramid_discount ** (i + 1))
            if min(sh, sw) <= 1:
                break
        noise = (cur / cur.std().clamp(min=1e-6)).reshape(b, c, *lead, h, w)
    elif kind not in ("none", "offset"):
        raise ValueError(f"unknown noise type {kind!r}")
    return noise
