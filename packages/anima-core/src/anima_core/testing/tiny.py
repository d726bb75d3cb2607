"""A tiny Anima model set, random but deterministic, written in the official file formats so tests exercise the
real loaders.

Files written by :func:`write_tiny_model_set` (names as ``split_files/`` of circlestone-labs/Anima, shrunk):

- ``anima-tiny.safetensors``: DiT + LLM adapter in one file, original key layout under ``net.``
  (``net.blocks.0.self_attn.q_proj.weight``, ``net.x_embedder.proj.1.weight`` of shape [64, 68],
  ``net.llm_adapter.blocks.0…``), metadata ``{"format": "pt"}``. No ``pos_embedder``/``accum_*`` buffers, as in
  the released files (as far as is known).
- ``qwen_3_tiny.safetensors``: the Qwen3 decoder stack with ``model.*`` keys and no ``lm_head`` (tied), as
  ``qwen_3_06b_base.safetensors``. **No config.json**: the loader infers the shape fields from the tensors, and
  the rest (rope theta 1e6, RMS eps 1e-6, …) are Qwen3-0.6B constants, which :data:`QWEN3_FIXED` repeats here.
- ``qwen_image_vae_tiny.safetensors``: the VAE in the original Wan2.1 layout (``encoder.conv1``,
  ``encoder.downsamples.N.residual.K``, ``decoder.upsamples.N``, ``conv1``/``conv2``), made by inverting diffusers'
  ``convert_wan_vae_to_diffusers``.
- ``qwen_tokenizer/`` and ``t5_tokenizer/``: ``save_pretrained`` folders (see :mod:`anima_core.testing.tokenizers`).

Shapes keep what the real models' wiring depends on: 16 latent channels (+1 zero mask channel at the patch embed,
so its input is (16+1)·2·2 = 68), patch (1, 2, 2), Qwen3's query width ≠ its hidden size (as 2048 vs 1024), the
adapter's source dim (Qwen hidden, 48) ≠ its model dim (32), and embedding tables with more rows than tokenizer
entries (as 32128 vs 32100 for T5). The VAE keeps the real ``dim_mult``/``num_res_blocks``/temporal layout
because diffusers' Wan converter hard-codes the decoder's block indices (3 resnets per up block, the shortcut at
``upsamples.4``) and mis-maps any other layout.

Weights are re-drawn from a ``torch.Generator`` seeded per component (all distinct, none zero-initialised, so a
swapped or dropped tensor changes outputs); the global RNG is left untouched. Same seed → byte-identical files.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anima_core.model.names import original_anima_state_dict
from anima_core.testing.tokenizers import build_qwen_tokenizer, build_t5_tokenizer, write_tokenizers

TRANSFORMER_FILE = "anima-tiny.safetensors"
TEXT_ENCODER_FILE = "qwen_3_tiny.safetensors"
VAE_FILE = "qwen_image_vae_tiny.safetensors"
QWEN_TOKENIZER_DIR = "qwen_tokenizer"
T5_TOKENIZER_DIR = "t5_tokenizer"
METADATA = {"format": "pt"}

LATENT_CHANNELS = 16  # the VAE's z_dim; never shrink it

# Qwen3-0.6B values that tensor shapes do not carry (sd-scripts configs/qwen3_06b/config.json).
QWEN3_FIXED = {"rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960,
               "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False}


def _round_up(n: int, multiple: int = 32) -> int:
    return -(-n // multiple) * multiple


@functools.lru_cache(maxsize=1)
def _vocab_rows() -> tuple[int, int]:
    """Embedding rows for Qwen and T5: the tokenizer sizes rounded up, as the real tables are padded."""
    return _round_up(len(build_qwen_tokenizer())), _round_up(len(build_t5_tokenizer()))


def tiny_configs() -> dict[str, dict[str, Any]]:
    """Constructor kwargs: ``dit`` (CosmosTransformer3DModel), ``adapter`` (AnimaTextConditioner), ``qwen``
    (Qwen3Config) and ``vae`` (AutoencoderKLQwenImage). Fresh dicts on every call."""
    qwen_rows, t5_rows = _vocab_rows()
    qwen_hidden = 48
    model_dim = 32
    configs = {
        # The 17-channel construction: the zero mask channel comes in as condition_mask, so diffusers never needs
        # torchvision; weight shapes equal the standard (in_channels=16, concat_padding_mask=True) model's.
        "dit": {"in_channels": LATENT_CHANNELS + 1, "out_channels": LATENT_CHANNELS, "num_attention_heads": 2,
                "attention_head_dim": 32, "num_layers": 2, "mlp_ratio": 4.0, "text_embed_dim": model_dim,
                "adaln_lora_dim": 16, "patch_size": (1, 2, 2), "rope_scale": (1.0, 4.0, 4.0),
                "extra_pos_embed_type": None, "concat_padding_mask": False},
        "adapter": {"source_dim": qwen_hidden, "target_dim": model_dim, "model_dim": model_dim, "num_layers": 2,
                    "num_attention_heads": 2, "mlp_ratio": 4.0, "target_vocab_size": t5_rows,
                    "use_self_attention": True},
        "qwen": {"vocab_size": qwen_rows, "hidden_size": qwen_hidden, "intermediate_size": 3 * qwen_hidden,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                 **QWEN3_FIXED},
        "vae": {"base_dim": 8, "z_dim": LATENT_CHANNELS, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                "attn_scales": [], "temperal_downsample": [False, True, True]},
    }
    return copy.deepcopy(configs)


def _randomise(module: nn.Module, seed: int) -> None:
    """Every parameter drawn afresh: scaled normal for weights, 1 ± noise for norm gains, small biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("bias"):
                param.copy_(0.02 * noise)
            elif param.dim() == 1 or name.endswith("gamma"):  # RMSNorm weights, Wan's RMS_norm gamma
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(noise / math.sqrt(param[0].numel()))


def build_tiny_modules(seed: int = 0) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """``(dit, adapter, qwen, vae)``: ``CosmosTransformer3DModel``, ``AnimaTextConditioner``, ``Qwen3Model`` and
    ``AutoencoderKLQwenImage`` with :func:`tiny_configs`, fp32, eval mode, weights fixed by ``seed``."""
    from diffusers import AnimaTextConditioner, AutoencoderKLQwenImage, CosmosTransformer3DModel
    from transformers import Qwen3Config, Qwen3Model

    cfg = tiny_configs()
    with torch.random.fork_rng(devices=[]):  # the constructors' own init draws from the global RNG
        modules = (CosmosTransformer3DModel(**cfg["dit"]), AnimaTextConditioner(**cfg["adapter"]),
                   Qwen3Model(Qwen3Config(**cfg["qwen"])), AutoencoderKLQwenImage(**cfg["vae"]))
    for index, module in enumerate(modules):
        _randomise(module, seed * 16 + index)
        module.float().eval()
    return modules


# diffusers resnet parameter → Wan ``residual.K`` / ``shortcut`` (inverse of convert_wan_vae_to_diffusers)
_WAN_RESNET = (("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."), ("norm2.gamma", "residual.3.gamma"),
               ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))


def _wan_resnet(rest: str) -> str:
    for ours, wan in _WAN_RESNET:
        if rest.startswith(ours):
            return wan + rest[len(ours):]
    raise KeyError(rest)


def wan_vae_state_dict(diffusers_vae_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ``AutoencoderKLQwenImage`` state dict in the original Wan2.1 layout (``qwen_image_vae.safetensors``).

    The decoder's flat ``upsamples`` list holds, per level, ``num_res_blocks + 1`` resnets then the upsampler."""
    sd = dict(diffusers_vae_state_dict)
    resnets_per_level = 1 + max(int(m.group(1)) for k in sd
                                if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k)))
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        part, _, rest = key.partition(".")
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            new = ("conv1." if part == "quant_conv" else "conv2.") + rest
        elif part not in ("encoder", "decoder"):
            raise KeyError(f"unknown VAE key {key!r}")
        elif m := re.fullmatch(r"conv_in\.(.+)", rest):
            new = f"{part}.conv1.{m.group(1)}"
        elif rest == "norm_out.gamma":
            new = f"{part}.head.0.gamma"
        elif m := re.fullmatch(r"conv_out\.(.+)", rest):
            new = f"{part}.head.2.{m.group(1)}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
            new = f"{part}.middle.{2 * int(m.group(1))}.{_wan_resnet(m.group(2))}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
            new = f"{part}.middle.1.{m.group(1)}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest):
            inner = m.group(2)
            inner = inner if inner.startswith(("resample.", "time_conv.")) else _wan_resnet(inner)
            new = f"encoder.downsamples.{m.group(1)}.{inner}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
            index = int(m.group(1)) * (resnets_per_level + 1) + int(m.group(2))
            new = f"decoder.upsamples.{index}.{_wan_resnet(m.group(3))}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
            index = int(m.group(1)) * (resnets_per_level + 1) + resnets_per_level
            new = f"decoder.upsamples.{index}.{m.group(2)}"
        else:
            raise KeyError(f"unknown VAE key {key!r}")
        out[new] = tensor
    return out


@dataclass(frozen=True)
class TinyModelSet:
    """Paths of a written tiny model set and the constructor kwargs of its modules (see :func:`tiny_configs`)."""

    transformer: Path
    text_encoder: Path
    vae: Path
    qwen_tokenizer: Path
    t5_tokenizer: Path
    dit_config: dict[str, Any]
    adapter_config: dict[str, Any]
    qwen_config: dict[str, Any]
    vae_config: dict[str, Any]


def _save(tensors: Mapping[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: (v if dtype is None else v.to(dtype)).detach().contiguous() for k, v in tensors.items()},
              str(path), metadata=METADATA)


def write_model_files(directory: Path, dit: nn.Module, adapter: nn.Module, qwen: nn.Module, vae: nn.Module, *,
                      names: Mapping[str, str] | None = None, dtype: torch.dtype | None = None,
                      corpus: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Write modules as an official-format model set into ``directory``; returns the paths by
    :class:`TinyModelSet` field name. ``names`` overrides file/folder names (keys: the field names), ``dtype``
    casts the DiT+adapter and Qwen3 tensors (the VAE stays fp32), ``corpus`` builds the tokenizers from other text
    (:data:`anima_core.testing.tokenizers.CORPUS` by default)."""
    from anima_core.testing.tokenizers import CORPUS

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chosen = {"transformer": TRANSFORMER_FILE, "text_encoder": TEXT_ENCODER_FILE, "vae": VAE_FILE,
              "qwen_tokenizer": QWEN_TOKENIZER_DIR, "t5_tokenizer": T5_TOKENIZER_DIR, **(names or {})}
    paths = {key: directory / name for key, name in chosen.items()}
    _save(original_anima_state_dict(dit.state_dict(), adapter.state_dict()), paths["transformer"], dtype)
    _save({"model." + k: v for k, v in qwen.state_dict().items()}, paths["text_encoder"], dtype)
    _save(wan_vae_state_dict(vae.state_dict()), paths["vae"])
    write_tokenizers(paths["qwen_tokenizer"], paths["t5_tokenizer"], CORPUS if corpus is None else corpus)
    return paths


def write_tiny_model_set(directory: Path, *, seed: int = 0) -> TinyModelSet:
    """Write the tiny model set into ``directory`` (created if needed) and return where everything is."""
    dit, adapter, qwen, vae = build_tiny_modules(seed)
    cfg = tiny_configs()
    paths = write_model_files(directory, dit, adapter, qwen, vae)
    return TinyModelSet(**paths, dit_config=cfg["dit"], adapter_config=cfg["adapter"], qwen_config=cfg["qwen"],
                        vae_config=cfg["vae"])
