"""ΔW of lycoris-format files by the rules ComfyUI applies (``comfy/weight_adapter/{lora,lokr,loha,base}.py``), so
``anima generate --lora`` and :meth:`LycorisAdapter.merge` give what ComfyUI gives:

- LoCon: ``up @ down``; LoHa: ``(w1_a @ w1_b) * (w2_a @ w2_b)``; LoKr: ``kron(w1, w2)``, each factor either full or
  ``_a @ _b``;
- scale ``alpha / dim`` when the file has ``alpha`` (LoCon/LoHa dim = ``down``/``w1_b`` rows; LoKr dim = the
  decomposed factor's ``_b`` rows), otherwise 1; LoKr with both factors full: 1 whatever the alpha;
- DoRA (``dora_scale``): ``W' = (W + scale·ΔW) · dora_scale / ‖·‖`` where ComfyUI takes the norm per input column
  of ``W + scale·ΔW`` when ``dora_scale`` is a row ``[1, in]`` (what we train), but per output row of the
  *original* ``W`` when it is a column ``[out, 1]``; the delta is ``W' − W``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from anima_core.errors import UserError

# Suffixes that are lycoris' own; a file with none of them is plain LoRA (core reads it) or not ours.
OWN_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "dora_scale",
                "lora_mid.weight")
SUFFIXES = (*OWN_SUFFIXES, "lora_down.weight", "lora_up.weight", "alpha")
ROOTS = ("diffusion_model.",)


def split_key(key: str) -> tuple[str, str] | None:
    """``lora_unet_x.lokr_w1`` → (``lora_unet_x``, ``lokr_w1``); None for a key of no known suffix."""
    for suffix in SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def group_by_module(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is not None:
            groups.setdefault(split[0], {})[split[1]] = tensor
    return groups


def _pair(parts: Mapping[str, torch.Tensor], full: str, a: str, b: str) -> tuple[torch.Tensor, int | None]:
    """A factor and, when it came decomposed, its rank (``_b`` rows)."""
    if full in parts:
        return parts[full].float(), None
    return parts[a].float() @ parts[b].float(), parts[b].shape[0]


def raw_delta(name: str, parts: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """(unscaled ΔW, scale) of one module's tensors, as ComfyUI computes them."""
    alpha = float(parts["alpha"]) if "alpha" in parts else None
    try:
        if "lokr_t2" in parts or "hada_t1" in parts or "lora_mid.weight" in parts:
            raise UserError(f"--lora: {name} holds Tucker factors (conv layers); Anima's targets are Linear")
        if any(k.startswith("lokr_") for k in parts):
            w1, dim1 = _pair(parts, "lokr_w1", "lokr_w1_a", "lokr_w1_b")
            w2, dim2 = _pair(parts, "lokr_w2", "lokr_w2_a", "lokr_w2_b")
            dim = dim2 if dim2 is not None else dim1  # ComfyUI: the w2 pair wins when both are decomposed
            return torch.kron(w1, w2), (alpha / dim if alpha is not None and dim is not None else 1.0)
        if any(k.startswith("hada_") for k in parts):
            w1 = parts["hada_w1_a"].float() @ parts["hada_w1_b"].float()
            w2 = parts["hada_w2_a"].float() @ parts["hada_w2_b"].float()
            dim = parts["hada_w1_b"].shape[0]
            return w1 * w2, (alpha / dim if alpha is not None else 1.0)
        up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
        return up.flatten(1) @ down.flatten(1), (alpha / down.shape[0] if alpha is not None else 1.0)
    except KeyError as missing:
        raise UserError(f"--lora: module {name} lacks {missing.args[0]!r} (found {sorted(parts)})") from None


def module_delta(name: str, parts: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """ΔW at strength 1 for one module over the base ``weight`` (float32)."""
    diff, scale = raw_delta(name, parts)
    base = weight.detach().float()
    if tuple(diff.shape) != tuple(base.shape):
        raise UserError(f"--lora: {name} gives a ΔW of shape {tuple(diff.shape)}, but the model's weight is "
                        f"{tuple(base.shape)}; is it a LoRA for this model?")
    diff = diff * scale
    if "dora_scale" not in parts:
        return diff
    magnitude = parts["dora_scale"].float()
    calc = base + diff
    if magnitude.shape[0] == base.shape[0]:  # ComfyUI's output-axis rule: the original weight's row norms
        norm = base.norm(dim=1, keepdim=True)
    else:
        norm = calc.norm(dim=0, keepdim=True)
    return calc * (magnitude / (norm + torch.finfo(torch.float32).eps)) - base


def original_path(name: str, known: Mapping[str, object]) -> str | None:
    from anima_core.model.names import original_path_from_comfy_lora_name

    for root in ROOTS:
        if name.startswith(root):
            path = name[len(root):]
            return path if path in known else None
    return original_path_from_comfy_lora_name(name, known.keys())


def file_deltas(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The ``file_deltas`` of the lycoris variants: None unless the file carries lycoris suffixes; modules the model
    does not have are skipped, as ComfyUI skips them."""
    if not any((split_key(k) or ("", ""))[1] in OWN_SUFFIXES for k in tensors):
        return None
    out: dict[str, torch.Tensor] = {}
    for name, parts in group_by_module(tensors).items():
        path = original_path(name, weights)
        if path is not None:
            out[path] = module_delta(name, parts, weights[path])
    return out
