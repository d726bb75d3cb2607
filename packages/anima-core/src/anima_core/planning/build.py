"""The model set of a plan, built from shapes on the meta device and materialised as fake tensors (no memory, no
data): DiT + LLM adapter (:class:`anima_core.model.dit.AnimaDiT`), Qwen3 and the VAE, in the dtypes training uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from anima_core.planning.shapes import ModelShapes


@dataclass
class ModelSet:
    dit: Any  # AnimaDiT
    qwen: nn.Module
    vae: nn.Module


def build_meta(shapes: ModelShapes, *, with_vae: bool = True) -> ModelSet:
    """Every component on the meta device, with the classes and configs the loaders use."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen3Config, Qwen3Model

    from anima_core.model.dit import _build

    with torch.device("meta"):
        dit = _build(dict(shapes.dit), dict(shapes.adapter))
        qwen = Qwen3Model(Qwen3Config(**shapes.qwen))
        vae = AutoencoderKLQwenImage(**shapes.vae) if with_vae else None
    for module in (dit, qwen, vae):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return ModelSet(dit, qwen, vae)


def materialize(module: nn.Module, dtype: torch.dtype, device: str = "cpu") -> nn.Module:
    """Meta → (fake) tensors on ``device`` in ``dtype`` (floating ones), in place; call under a ``FakeTensorMode`` to
    allocate nothing. (``to_empty`` cannot swap meta parameters for fake ones.)"""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(_empty(param, dtype, device), requires_grad=param.requires_grad)
        for name, buf in list(sub._buffers.items()):
            if buf is not None:
                sub._buffers[name] = _empty(buf, dtype, device)
    return module


def _empty(t: torch.Tensor, dtype: torch.dtype, device: str) -> torch.Tensor:
    # as module.to(dtype) after loading: floating tensors take the dtype, others keep theirs
    return torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device)


def parameter_count(module: Optional[nn.Module]) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def tensor_bytes(module: Optional[nn.Module], *, params: bool = True, buffers: bool = True,
                 rounding: int = 1) -> int:
    """Bytes of a module's distinct storages (each rounded up to ``rounding``, as a caching allocator does)."""
    if module is None:
        return 0
    seen: set[int] = set()
    total = 0
    tensors = [*(module.parameters() if params else ()), *(module.buffers() if buffers else ())]
    for t in tensors:
        key = id(t)
        if key in seen:
            continue
        seen.add(key)
        n = t.numel() * t.element_size()
        total += -(-n // rounding) * rounding
    return total


def linear_weight_elements(module: nn.Module) -> tuple[int, int, int]:
    """(elements of all ``nn.Linear`` weights, their count, the largest one's elements) in ``module``."""
    sizes = [m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear)]
    return sum(sizes), len(sizes), max(sizes, default=0)
