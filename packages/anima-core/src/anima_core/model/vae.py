"""The Qwen-Image VAE (Wan2.1 architecture, 16 latent channels, 8× spatial) as diffusers'
``AutoencoderKLQwenImage``, with Anima's per-channel latent normalisation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anima_core.model.checkpoint import CheckpointError, SafetensorsFile, describe_component

FIELD = "model.vae"
EXPECTED = "the Qwen-Image VAE (e.g. qwen_image_vae.safetensors, Wan2.1 key layout)"


def infer_vae_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``AutoencoderKLQwenImage`` config of a diffusers-layout VAE state dict."""
    base = sd["encoder.conv_in.weight"].shape[0]
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    levels: list[list[int]] = [[]]
    temporal: list[bool] = []
    for i in blocks:
        if f"encoder.down_blocks.{i}.resample.1.weight" in sd:
            temporal.append(f"encoder.down_blocks.{i}.time_conv.weight" in sd)
            levels.append([])
        else:
            levels[-1].append(sd[f"encoder.down_blocks.{i}.conv2.weight"].shape[0])
    return {
        "base_dim": base,
        "z_dim": sd["post_quant_conv.weight"].shape[0],
        "dim_mult": [lvl[-1] // base for lvl in levels],
        "num_res_blocks": len(levels[0]),
        "attn_scales": [],
        "temperal_downsample": temporal,
    }


class AnimaVAE(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) ⇄ normalised latents (B, 16, 1, H/8, W/8), z = (μ − mean) / std."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.register_buffer("mean", torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.dtype).unsqueeze(2)
        mu = self.vae.encode(x).latent_dist.mode()  # the posterior mode: deterministic, as sd-scripts
        return ((mu.float() - self.mean) / self.std)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents if latents.dim() == 5 else latents.unsqueeze(2)
        raw = z.float() * self.std + self.mean
        images = self.vae.decode(raw.to(self.dtype)).sample
        return images[:, :, 0].float().clamp(-1.0, 1.0)


def load_vae(path: Path | str, *, dtype: torch.dtype | str = torch.float32) -> AnimaVAE:
    """``model.vae``: the single file in the Wan2.1 layout, or a diffusers folder (root or its vae/), built on the
    meta device and read tensor by tensor into ``dtype``, frozen."""
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from anima_core.model import fp8
    from anima_core.model.meta_load import build_empty, fill_from_file, from_pretrained_safetensors, rename_map
    from anima_core.model.models import resolve_dtype

    path, dtype = Path(path), resolve_dtype(dtype)
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").exists() else path
        if not (folder / "config.json").exists():
            raise CheckpointError(f"{FIELD}: {path} is a directory without a diffusers VAE config.json "
                                  f"(expected {EXPECTED} or a diffusers vae/ folder)")
        vae = from_pretrained_safetensors(AutoencoderKLQwenImage, folder, FIELD)
        fp8.cast_floating_(vae, dtype)
    else:
        st = SafetensorsFile(path, FIELD, EXPECTED)
        raw = st.meta_state_dict()
        if "encoder.conv1.weight" in raw and "decoder.conv1.weight" in raw:
            key_map = rename_map(convert_wan_vae_to_diffusers, raw)
        elif "encoder.conv_in.weight" in raw:
            key_map = {k: k for k in raw}  # already diffusers layout in one file
        else:
            raise CheckpointError(f"{FIELD}: expected {EXPECTED}, found {describe_component(raw)} in {path}")
        sd = {k: raw[v] for k, v in key_map.items()}
        try:
            config = infer_vae_config(sd)
        except KeyError as exc:
            raise CheckpointError(f"{FIELD}: {path} looks like a VAE but lacks {exc} (truncated or another "
                                  f"architecture?)") from None
        vae = build_empty(lambda: AutoencoderKLQwenImage(**config))
        fill_from_file(vae, st, key_map, dtype)
    vae.requires_grad_(False)
    return AnimaVAE(vae.eval())
