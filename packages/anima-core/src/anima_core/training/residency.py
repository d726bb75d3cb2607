"""Where the frozen VAE and text encoder live once the caches are filled.

Rule: after the latent cache is filled, the VAE leaves the device for host memory (it is needed again only to
decode previews and the one VAE round-trip check, for which it comes back for the call). With
``cache_text_encoder`` the text encoder leaves the device too: to host memory when previews need it to encode
their prompts, and freed altogether when there are no preview prompts. Without the text cache the text encoder
encodes every batch, so it stays on the device.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

import torch

from anima_core.training.context import TrainingContext

HOST = torch.device("cpu")


def _release_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def after_caching(ctx: TrainingContext) -> None:
    cfg, mods = ctx.config, ctx.models
    mods.vae.to(HOST)
    if cfg.dataset.cache_text_encoder:
        if cfg.sample.prompts:
            mods.text.qwen.to(HOST)
        else:
            mods.text.qwen = None  # nothing will encode text again in this run
    _release_device_memory()


@contextlib.contextmanager
def on_device(ctx: TrainingContext) -> Iterator[None]:
    """The VAE and text encoder on the training device for the duration (previews, the round-trip check), and back
    where they were afterwards."""
    device = ctx.bootstrap.device
    mods = ctx.models
    parts = [m for m in (mods.vae, mods.text.qwen) if m is not None]
    homes = [next(m.parameters()).device for m in parts]
    for m in parts:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(parts, homes):
            m.to(home)
        if any(home != device for home in homes):
            _release_device_memory()
