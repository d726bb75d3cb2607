"""Refusing to write non-finite tensors: a LoRA or state with a NaN/inf in it is worse than none (it loads
without complaint and ruins every image, or every resumed step), so it is checked before the rename that would
publish it, and the previous file stays."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import torch


class NonFiniteError(RuntimeError):
    """Tensors about to be written (or just read) hold NaN or inf."""


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """One fused max-|x| over all tensors (NaN propagates through max, and unlike a 2-norm it cannot overflow)."""
    tensors = [t.detach() for t in tensors]
    return not tensors or bool(torch.isfinite(torch.nn.utils.get_total_norm(tensors, norm_type=float("inf"))))


def nonfinite_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    return [name for name, t in tensors.items()
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())]


def nonfinite_in(obj: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the floating tensors with NaN/inf anywhere in nested dicts / lists (an optimizer state)."""
    if isinstance(obj, torch.Tensor):
        return [prefix or "<tensor>"] if nonfinite_names({prefix: obj}) else []
    if isinstance(obj, Mapping):
        return [p for k, v in obj.items() for p in nonfinite_in(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in nonfinite_in(v, f"{prefix}[{i}]")]
    return []


def describe(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_safetensors(path: Path, target: Path) -> None:
    """Raise :class:`NonFiniteError` if the safetensors file ``path`` (about to become ``target``) holds a
    non-finite tensor."""
    from safetensors.torch import load_file

    bad = nonfinite_names(load_file(str(path)))
    if bad:
        raise NonFiniteError(f"refusing to write {target}: {len(bad)} tensor(s) are not finite (NaN/inf: "
                             f"{describe(bad)}); the adapter weights have diverged, so the file would be unusable "
                             f"(any earlier file of that name is kept)")
