"""Names of the DiT and LLM-adapter weights in the original Anima checkpoint vs in diffusers, both ways.

LoRA files, error messages and saved checkpoints use the original names (``blocks.0.self_attn.q_proj``), because
that is what ComfyUI, sd-scripts and diffusion-pipe read; the modules we train are diffusers'
``CosmosTransformer3DModel`` (``transformer_blocks.0.attn1.to_q``) and ``AnimaTextConditioner``.

The DiT table is the Cosmos-Predict2 ("2.0") rename table of diffusers'
``single_file_utils.convert_cosmos_transformer_checkpoint_to_diffusers``. That table is a local variable of the
function in diffusers 0.42.1 (not importable), so it is restated here as whole-segment rules that can be inverted;
the tests run every parameter of a tiny model through diffusers' converter to prove the two agree. The converter
itself does plain substring replacement, which cannot be inverted and which mangles ``llm_adapter.*`` names
(``llm_adapter.transformer_blocks.0.attn1.to_q``), so adapter names never go through the DiT map.

Both DiT directions rewrite the segments they know and pass the others through unchanged, so any name (also an
unexpected key in a broken file) gets a readable counterpart. The adapter's names equal the original ones below
``llm_adapter.``. Names carry no file prefix (``net.``, ``model.diffusion_model.``) and may end in ``.weight``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ADAPTER_PREFIX = "llm_adapter."
COMFY_LORA_PREFIX = "lora_unet_"

# (original, diffusers) dotted fragments matched on whole path segments, longest first in each direction, so
# "mlp.layer1" beats "mlp". Fragments without parameters of their own (containers such as "blocks.N.self_attn")
# are listed too, so module paths translate as well as parameter names.
_DIT_RENAMES: tuple[tuple[str, str], ...] = (
    ("x_embedder.proj.1", "patch_embed.proj"),  # proj is Sequential(Rearrange, Linear) in the original
    ("x_embedder", "patch_embed"),
    ("t_embedder.0", "time_embed.time_proj"),  # sinusoidal, no parameters
    ("t_embedder.1", "time_embed.t_embedder"),
    ("t_embedding_norm", "time_embed.norm"),
    ("final_layer.adaln_modulation.1", "norm_out.linear_1"),
    ("final_layer.adaln_modulation.2", "norm_out.linear_2"),
    ("final_layer.adaln_modulation", "norm_out"),
    ("final_layer.linear", "proj_out"),
    ("blocks", "transformer_blocks"),
    ("adaln_modulation_self_attn.1", "norm1.linear_1"),
    ("adaln_modulation_self_attn.2", "norm1.linear_2"),
    ("adaln_modulation_self_attn", "norm1"),
    ("adaln_modulation_cross_attn.1", "norm2.linear_1"),
    ("adaln_modulation_cross_attn.2", "norm2.linear_2"),
    ("adaln_modulation_cross_attn", "norm2"),
    ("adaln_modulation_mlp.1", "norm3.linear_1"),
    ("adaln_modulation_mlp.2", "norm3.linear_2"),
    ("adaln_modulation_mlp", "norm3"),
    ("self_attn", "attn1"),
    ("cross_attn", "attn2"),
    ("q_proj", "to_q"),
    ("k_proj", "to_k"),
    ("v_proj", "to_v"),
    ("output_proj", "to_out.0"),
    ("q_norm", "norm_q"),
    ("k_norm", "norm_k"),
    ("mlp.layer1", "ff.net.0.proj"),
    ("mlp.layer2", "ff.net.2"),
    ("mlp", "ff"),
)

_Rules = tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]


def _rules(pairs: Iterable[tuple[str, str]]) -> _Rules:
    split = [(tuple(src.split(".")), tuple(dst.split("."))) for src, dst in pairs]
    return tuple(sorted(split, key=lambda rule: -len(rule[0])))  # stable: table order among equal lengths


_TO_DIFFUSERS = _rules(_DIT_RENAMES)
_TO_ORIGINAL = _rules((dst, src) for src, dst in _DIT_RENAMES)


def _rewrite(name: str, rules: _Rules) -> str:
    segments = name.split(".")
    out: list[str] = []
    i = 0
    while i < len(segments):
        for src, dst in rules:
            if tuple(segments[i:i + len(src)]) == src:
                out.extend(dst)
                i += len(src)
                break
        else:
            out.append(segments[i])
            i += 1
    return ".".join(out)


def _reject_adapter(name: str, direction: str) -> None:
    if name == ADAPTER_PREFIX[:-1] or name.startswith(ADAPTER_PREFIX):
        raise KeyError(f"{name!r} is an LLM-adapter name; use {direction} (the DiT rename table would mangle it)")


def dit_to_original(name: str) -> str:
    """``transformer_blocks.0.attn1.to_q[.weight]`` → ``blocks.0.self_attn.q_proj[.weight]``."""
    _reject_adapter(name, "adapter_to_original")
    return _rewrite(name, _TO_ORIGINAL)


def original_to_dit(name: str) -> str:
    """``blocks.0.self_attn.q_proj[.weight]`` → ``transformer_blocks.0.attn1.to_q[.weight]``."""
    _reject_adapter(name, "original_to_adapter")
    return _rewrite(name, _TO_DIFFUSERS)


def adapter_to_original(name: str) -> str:
    """``AnimaTextConditioner`` name → its name in the original file (``llm_adapter.<name>``)."""
    return ADAPTER_PREFIX + name


def original_to_adapter(name: str) -> str:
    """``[anything.]llm_adapter.<name>`` → ``<name>``; :class:`KeyError` for a name outside the adapter."""
    head, sep, tail = name.partition(ADAPTER_PREFIX)
    if not sep or (head and not head.endswith(".")):
        raise KeyError(f"{name!r} is not an LLM-adapter name (expected it to contain {ADAPTER_PREFIX!r})")
    return tail


def original_dit_state_dict(diffusers_dit_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``CosmosTransformer3DModel`` state dict in the original key layout, without a prefix."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in diffusers_dit_state_dict.items():
        new = dit_to_original(key)
        if new in out:
            raise ValueError(f"two DiT keys map to the original name {new!r}")
        out[new] = tensor
    return out


def original_anima_state_dict(diffusers_dit_state_dict: Mapping[str, torch.Tensor],
                              adapter_state_dict: Mapping[str, torch.Tensor],
                              prefix: str = "net.") -> dict[str, torch.Tensor]:
    """DiT + adapter as in the official single file: ``net.blocks…`` and ``net.llm_adapter.…`` keys."""
    out = {prefix + k: v for k, v in original_dit_state_dict(diffusers_dit_state_dict).items()}
    out.update({prefix + adapter_to_original(k): v for k, v in adapter_state_dict.items()})
    return out


def comfy_lora_name(original_module_path: str) -> str:
    """The kohya/ComfyUI LoRA key stem of a module: ``blocks.0.self_attn.q_proj`` →
    ``lora_unet_blocks_0_self_attn_q_proj``."""
    return COMFY_LORA_PREFIX + original_module_path.replace(".", "_")


def original_path_from_comfy_lora_name(name: str, known_original_paths: Iterable[str]) -> str | None:
    """The module path among ``known_original_paths`` whose :func:`comfy_lora_name` is ``name``; None if none is.

    "_" is both the separator and part of names (``self_attn``), so the path cannot be rebuilt from the string
    alone; ComfyUI too resolves these keys against the model's own module names."""
    if not name.startswith(COMFY_LORA_PREFIX):
        return None
    matches = [path for path in known_original_paths if comfy_lora_name(path) == name]
    if len(set(matches)) > 1:
        raise ValueError(f"LoRA key {name!r} is ambiguous: it names {sorted(set(matches))}")
    return matches[0] if matches else None
