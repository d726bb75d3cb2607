"""Applying LoRA files at inference: our own files and the forms ComfyUI loads for Anima
(``lora_unet_<original path>`` with ``lora_down``/``lora_up``/``alpha``, and ``diffusion_model.<original path>``
with ``lora_A``/``lora_B``). The delta is merged into the weights and can be removed again exactly.

Files in any other format (LoKr, LoHa, DoRA, ...) go to the installed adapter variants that declare
``file_deltas`` on their spec; core knows none of those formats itself."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from anima_core.errors import UserError
from anima_core.model.checkpoint import load_safetensors

_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
             "alpha": "alpha"}


def parse_lora_arg(value: str) -> tuple[Path, float]:
    """``FILE[:STRENGTH]`` as ``anima generate --lora`` takes it."""
    path, sep, strength = value.rpartition(":")
    if sep and path and not Path(value).exists():
        try:
            return Path(path), float(strength)
        except ValueError:
            pass
    return Path(value), 1.0


def _split(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], role
    return None


def original_paths(model: nn.Module) -> dict[str, str]:
    """Original checkpoint path → module path, for every Linear the model can name."""
    namer = getattr(model, "original_module_name")
    out = {}
    for path, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            try:
                out[namer(path)] = path
            except KeyError:
                continue
    return out


def lora_deltas(tensors: dict[str, torch.Tensor], known: dict[str, str], source: str,
                skipped: list[str] | None = None) -> dict[str, torch.Tensor]:
    """ΔW per module path (scale alpha/rank applied; 1 when the file has no alpha, as ComfyUI). The file's modules
    that match nothing in the model (or lack a down or up) are appended to ``skipped``."""
    from anima_core.model.names import original_path_from_comfy_lora_name

    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        name, role = split
        groups.setdefault(name, {})[role] = tensor
    deltas: dict[str, torch.Tensor] = {}
    unmatched = []
    for name, parts in groups.items():
        if name.startswith("diffusion_model."):
            original = name[len("diffusion_model."):]
        elif name.startswith("lora_unet_"):
            original = original_path_from_comfy_lora_name(name, known.keys())
        else:
            original = None
        if original not in known or "down" not in parts or "up" not in parts:
            unmatched.append(name)
            continue
        down, up = parts["down"].float(), parts["up"].float()
        rank = down.shape[0]
        scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
        deltas[known[original]] = (up.flatten(1) @ down.flatten(1)) * scale
    if unknown and not deltas:
        raise UserError(f"--lora {source}: not a LoRA file anima can apply (keys such as {unknown[:2]})")
    if unmatched and not deltas:
        raise UserError(f"--lora {source}: none of its {len(groups)} modules match this model (e.g. "
                        f"{unmatched[:2]}); is it a LoRA for Anima?")
    if skipped is not None:
        skipped.extend(sorted(unmatched))
    return deltas


@dataclass
class AppliedLoRA:
    """A LoRA merged into a model at a strength; :meth:`remove` restores the weights."""

    model: nn.Module
    deltas: dict[str, torch.Tensor]
    strength: float
    skipped: list[str] = field(default_factory=list)  # the file's modules that matched nothing (not applied)

    def _apply(self, sign: float) -> None:
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for path, delta in self.deltas.items():
                add_to_weight(modules[path], sign * self.strength * delta)

    def remove(self) -> None:
        self._apply(-1.0)


def plain_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear as a plain tensor (an fp8 base weight dequantised)."""
    dequantized = getattr(module, "dequantized_weight", None)
    return dequantized() if dequantized is not None else module.weight


@torch.no_grad()
def add_to_weight(module: nn.Module, delta: torch.Tensor) -> None:
    """``module.weight += delta`` in the weight's dtype; an fp8 base weight re-quantises itself."""
    add = getattr(module, "add_to_weight_", None)
    if add is not None:
        add(delta.to(module.weight.device))
        return
    w = module.weight
    w += delta.to(w.device, w.dtype)


def is_plain_lora(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Every key is a down/up/alpha of some module: the form :func:`lora_deltas` reads without help."""
    return bool(tensors) and all(_split(key) is not None for key in tensors)


def plugin_deltas(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str], known: dict[str, str],
                  model: nn.Module, source: str, registry=None) -> dict[str, torch.Tensor]:
    """ΔW per module path from the first installed adapter whose ``file_deltas`` reads the file (the variant the
    file's ``anima_adapter`` metadata names is asked first)."""
    if registry is None:
        from anima_core.plugin_host import get_host

        registry = get_host().registry
    readers = [reg.spec for reg in registry.registrations("adapter") if reg.spec.file_deltas is not None]
    named = metadata.get("anima_adapter")
    readers.sort(key=lambda spec: spec.name != named)  # stable: the named variant first, the rest in name order
    modules = dict(model.named_modules())
    weights = {original: plain_weight(modules[path]) for original, path in known.items()}
    for spec in readers:
        found = spec.file_deltas(tensors, metadata, weights)
        if found is None:
            continue
        unmatched = sorted(set(found) - set(known))
        if unmatched:
            raise UserError(f"--lora {source}: adapter '{spec.name}' returned modules this model does not have "
                            f"(e.g. {unmatched[:2]})")
        if not found:
            raise UserError(f"--lora {source}: none of its modules match this model (read as '{spec.name}'); is it "
                            f"a LoRA for Anima?")
        return {known[original]: delta for original, delta in found.items()}
    names = ", ".join(spec.name for spec in readers) or "none"
    raise UserError(f"--lora {source}: not a LoRA file anima can apply (keys such as {sorted(tensors)[:2]}; "
                    f"adapters that read other formats: {names})")


def apply_lora_file(model: nn.Module, path: Path | str, strength: float = 1.0, registry=None) -> AppliedLoRA:
    """Merge a LoRA file at ``strength``. Plain LoRA is read here; other formats by the adapters in ``registry``
    (the process's plugin registry by default). Modules of a plain LoRA file that match nothing in the model are
    listed in ``AppliedLoRA.skipped`` and named in one warning on stderr."""
    tensors, metadata = load_safetensors(path, "--lora", "a LoRA .safetensors file")
    known = original_paths(model)
    skipped: list[str] = []
    if is_plain_lora(tensors):
        deltas = lora_deltas(tensors, known, str(path), skipped)
    else:
        deltas = plugin_deltas(tensors, metadata, known, model, str(path), registry)
    if skipped:
        # ComfyUI lists every key it did not load; one line here, with the count and the first few
        shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        print(f"warning: --lora {path}: {len(skipped)} of its {len(skipped) + len(deltas)} modules match nothing in "
              f"this model and were not applied ({shown})", file=sys.stderr)
    applied = AppliedLoRA(model, deltas, strength, skipped)
    applied._apply(1.0)
    return applied
