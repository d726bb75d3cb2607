"""The Anima DiT and its LLM adapter, as diffusers modules: loading the official single file (or a diffusers
folder) and a forward that never touches torchvision.

diffusers' ``CosmosTransformer3DModel`` resizes its padding mask with torchvision whenever
``concat_padding_mask=True`` (the Anima configuration). The mask is all zeros, so we build the model with one more
input channel and ``concat_padding_mask=False`` and pass a zero ``condition_mask``: the weight shapes are the
checkpoint's and the output is identical (a parity test pins this against diffusers' own forward).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anima_core.model import fp8
from anima_core.model.checkpoint import (
    CheckpointError,
    SafetensorsFile,
    block_count,
    describe_component,
    strip_prefix,
)
from anima_core.model.meta_load import build_empty, fill_from_file, from_pretrained_safetensors, rename_map

FIELD = "model.transformer"
EXPECTED = "the Anima DiT single file (e.g. anima-base-v1.0.safetensors, with llm_adapter.* inside)"

# The Anima (Cosmos-Predict2-2B) choices that cannot be read off tensor shapes. max_size only sizes the RoPE table
# (no parameters); 1024 latent px per side allows 8192 px images.
DIT_FIXED = {"rope_scale": (1.0, 4.0, 4.0), "extra_pos_embed_type": None, "patch_size": (1, 2, 2),
             "max_size": (128, 1024, 1024)}
ADAPTER_PREFIX = "llm_adapter."


def infer_dit_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """diffusers config of the DiT in an original-layout state dict (prefix already stripped)."""
    x_embed = sd["x_embedder.proj.1.weight"]
    hidden, patch_in = x_embed.shape
    head_dim = sd["blocks.0.self_attn.q_norm.weight"].shape[0]
    out_channels = sd["final_layer.linear.weight"].shape[0] // 4
    return {
        # +1: the zero mask channel, fed as condition_mask (see module docstring)
        "in_channels": patch_in // 4,
        "out_channels": out_channels,
        "num_attention_heads": hidden // head_dim,
        "attention_head_dim": head_dim,
        "num_layers": block_count(sd, r"blocks\.(\d+)\."),
        "mlp_ratio": sd["blocks.0.mlp.layer1.weight"].shape[0] / hidden,
        "text_embed_dim": sd["blocks.0.cross_attn.k_proj.weight"].shape[1],
        "adaln_lora_dim": sd["blocks.0.adaln_modulation_self_attn.1.weight"].shape[0],
        "concat_padding_mask": False,
        **DIT_FIXED,
    }


def infer_adapter_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``AnimaTextConditioner`` config of an adapter state dict (``llm_adapter.`` stripped)."""
    vocab, target_dim = sd["embed.weight"].shape
    model_dim = sd["blocks.0.self_attn.q_proj.weight"].shape[0]
    head_dim = sd["blocks.0.self_attn.q_norm.weight"].shape[0]
    return {
        "source_dim": sd["blocks.0.cross_attn.k_proj.weight"].shape[1],
        "target_dim": target_dim,
        "model_dim": model_dim,
        "num_layers": block_count(sd, r"blocks\.(\d+)\."),
        "num_attention_heads": model_dim // head_dim,
        "mlp_ratio": sd["blocks.0.mlp.0.weight"].shape[0] / model_dim,
        "target_vocab_size": vocab,
        "use_self_attention": "blocks.0.self_attn.q_proj.weight" in sd,
    }


class AnimaDiT(nn.Module):
    """DiT + LLM adapter as one module, so a LoRA can target both and DDP sees one forward."""

    def __init__(self, transformer: nn.Module, text_conditioner: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.text_conditioner = text_conditioner

    @property
    def min_context_length(self) -> int:
        return int(self.text_conditioner.config.min_sequence_length)

    def condition(self, qwen_hidden: torch.Tensor, qwen_mask: torch.Tensor, t5_ids: torch.Tensor,
                  t5_mask: torch.Tensor, t5_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-attention context (B, ≥512, D): adapter output zeroed past each T5 length, scaled by the prompt's
        per-token weights, zero-padded to at least 512 tokens. The DiT attends to all of it unmasked."""
        ctx = self.text_conditioner(qwen_hidden, t5_ids, target_attention_mask=t5_mask,
                                    source_attention_mask=qwen_mask)
        if t5_weights is not None:
            w = torch.zeros(ctx.shape[:2], dtype=ctx.dtype, device=ctx.device)
            w[:, : t5_weights.shape[1]] = t5_weights.to(ctx.dtype)
            ctx = ctx * w.unsqueeze(-1)
        return ctx

    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Velocity prediction for latents (B, 16, T, H, W) or (B, 16, H, W) at σ ∈ [0, 1] (shape [B])."""
        squeeze = latents.dim() == 4
        x = latents.unsqueeze(2) if squeeze else latents
        mask = torch.zeros((x.shape[0], 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        out = self.transformer(hidden_states=x, timestep=sigma.to(x.dtype), encoder_hidden_states=context,
                               condition_mask=mask, return_dict=False)[0]
        return out.squeeze(2) if squeeze else out

    def original_module_name(self, path: str) -> str:
        """The original checkpoint's name of a submodule path (what LoRA files are keyed by)."""
        from anima_core.model import names

        if path.startswith("transformer."):
            return names.dit_to_original(path[len("transformer."):])
        if path.startswith("text_conditioner."):
            return names.adapter_to_original(path[len("text_conditioner."):])
        raise KeyError(f"{path} is not inside the DiT or the LLM adapter")

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        for module in (self.transformer, self.text_conditioner):
            if enabled:
                module.enable_gradient_checkpointing()
            else:
                module.disable_gradient_checkpointing()

    def set_attention_backend(self, backend: str) -> None:
        """``sdpa`` (torch SDPA, default), ``flash`` or ``xformers`` through diffusers' attention dispatch."""
        name = {"sdpa": "native", "flash": "flash", "xformers": "xformers"}[backend]
        if name == "native":
            return  # diffusers' default dispatch already is torch SDPA (and setting it logs an "experimental" note)
        for module in (self.transformer, self.text_conditioner):
            module.set_attention_backend(name)


def _build(dit_config: dict[str, Any], adapter_config: dict[str, Any]) -> AnimaDiT:
    from diffusers import AnimaTextConditioner, CosmosTransformer3DModel

    return AnimaDiT(CosmosTransformer3DModel(**dit_config), AnimaTextConditioner(**adapter_config))


BLOCKS = "transformer.transformer_blocks."


def quantizes(path: str, _linear=None) -> bool:
    """The Linears that ``base_precision: fp8`` stores in fp8: those of the DiT blocks (99 % of the Linear bytes).
    The patch embed, timestep embedder, final layer and the LLM adapter stay in the model dtype, as ComfyUI's
    scaled-fp8 files keep their first and last layers."""
    return path.startswith(BLOCKS)


def split_file(st: SafetensorsFile, path: Path) -> tuple[dict, dict, str]:
    """(DiT meta state dict, adapter meta state dict, prefix) of the single file, from its header alone."""
    raw = {k: v for k, v in st.meta_state_dict().items() if not fp8.is_quantized_file_key(k)}
    sd, prefix = strip_prefix(raw, "x_embedder.proj.1.weight")
    if "x_embedder.proj.1.weight" not in sd or "blocks.0.mlp.layer1.weight" not in sd:
        raise CheckpointError(f"{FIELD}: expected {EXPECTED}, found {describe_component(raw)} in {path}")
    adapter_sd = {k[len(ADAPTER_PREFIX):]: v for k, v in sd.items() if k.startswith(ADAPTER_PREFIX)}
    if "embed.weight" not in adapter_sd:
        raise CheckpointError(f"{FIELD}: {path} has the DiT but no llm_adapter.* tensors; Anima needs the adapter "
                              f"(the official files carry it in the same file)")
    dit_sd = {k: v for k, v in sd.items() if not k.startswith(ADAPTER_PREFIX)}
    return dit_sd, adapter_sd, prefix


def build_empty_from_file(path: Path | str, *, base_precision: str = "dtype",
                          dtype: torch.dtype = torch.float32) -> tuple[AnimaDiT, SafetensorsFile, dict[str, str]]:
    """The model of the single file built on the meta device (fp8 Linears swapped in when asked), the open file
    and {model state-dict key: file key}. No tensor data is read."""
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    path = Path(path)
    st = SafetensorsFile(path, FIELD, EXPECTED)
    dit_sd, adapter_sd, prefix = split_file(st, path)
    model = build_empty(lambda: _build(infer_dit_config(dit_sd), infer_adapter_config(adapter_sd)))
    if base_precision == "fp8":
        fp8.replace_linears_(model, dtype, quantizes)
    dit_keys = rename_map(convert_cosmos_transformer_checkpoint_to_diffusers, dit_sd)  # drops known buffers
    key_map = {f"transformer.{k}": prefix + v for k, v in dit_keys.items()}
    key_map.update({f"text_conditioner.{k}": prefix + ADAPTER_PREFIX + k for k in adapter_sd})
    return model, st, key_map


def _original_name(key: str) -> str:
    from anima_core.model import names

    if key.startswith("transformer."):
        return names.dit_to_original(key[len("transformer."):])
    return ADAPTER_PREFIX + key.removeprefix("text_conditioner.")


def load_single_file(path: Path | str, *, dtype: torch.dtype = torch.float32,
                     base_precision: str = "dtype") -> AnimaDiT:
    """The official single file: DiT + ``llm_adapter.*``, prefix ``net.``, ``model.diffusion_model.`` or none; a
    ComfyUI scaled-fp8 file too. Built on the meta device and read tensor by tensor into ``dtype``."""
    model, st, key_map = build_empty_from_file(path, base_precision=base_precision, dtype=dtype)
    fill_from_file(model, st, key_map, dtype, _original_name)
    return model


def _load_diffusers_folder(folder: Path) -> AnimaDiT:
    from diffusers import AnimaTextConditioner, CosmosTransformer3DModel

    root = folder if (folder / "transformer").is_dir() else folder.parent
    tdir, cdir = root / "transformer", root / "text_conditioner"
    if not (tdir / "config.json").exists() or not (cdir / "config.json").exists():
        raise CheckpointError(f"{FIELD}: {folder} is a directory but not a diffusers Anima folder (expected "
                              f"transformer/ and text_conditioner/ with config.json, e.g. "
                              f"circlestone-labs/Anima-Base-v1.0-Diffusers)")
    dit_cfg = json.loads((tdir / "config.json").read_text())
    if dit_cfg.get("concat_padding_mask", True):
        dit_cfg.update(in_channels=dit_cfg.get("in_channels", 16) + 1, concat_padding_mask=False)
    dit_cfg.update(max_size=DIT_FIXED["max_size"])
    reference = from_pretrained_safetensors(CosmosTransformer3DModel, tdir, FIELD)
    transformer = build_empty(lambda: CosmosTransformer3DModel.from_config(
        {k: v for k, v in dit_cfg.items() if not k.startswith("_")}))
    transformer.load_state_dict(reference.state_dict(), strict=True, assign=True)
    conditioner = from_pretrained_safetensors(AnimaTextConditioner, cdir, FIELD)
    return AnimaDiT(transformer, conditioner)


def load_transformer(path: Path | str, *, dtype: torch.dtype | str = torch.float32,
                     base_precision: str = "dtype") -> AnimaDiT:
    """``model.transformer``: the single file, or a diffusers folder (pipeline root or its transformer/), in
    ``dtype`` on the CPU, frozen. ``base_precision="fp8"`` stores the block Linears in fp8 (see
    :mod:`anima_core.model.fp8`); move the result with ``.to(device)``, never ``.to(dtype)``."""
    from anima_core.model.models import resolve_dtype

    path, dtype = Path(path), resolve_dtype(dtype)
    if path.is_dir():
        model = _load_diffusers_folder(path)
        if base_precision == "fp8":
            fp8.quantize_linears_(model, dtype, quantizes)
        fp8.cast_floating_(model, dtype)
    else:
        model = load_single_file(path, dtype=dtype, base_precision=base_precision)
    model.requires_grad_(False)
    return model.eval()
