"""What a plugin hands to ``register``: one frozen spec per variant."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping

if TYPE_CHECKING:
    import torch

    from anima_core.options import VariantOptions

# (tensors, metadata, base weights by original path) -> ΔW by original path, or None: not this variant's format.
FileDeltas = Callable[[Mapping[str, "torch.Tensor"], Mapping[str, str], Mapping[str, "torch.Tensor"]],
                      "dict[str, torch.Tensor] | None"]

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Issue:
    """One finding of config validation: ``path`` is dotted from the config root (``optimizer.lr``)."""

    path: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


def error(path: str, message: str) -> Issue:
    return Issue(path, message, "error")


def warning(path: str, message: str) -> Issue:
    return Issue(path, message, "warning")


@dataclass(frozen=True)
class VariantSpec:
    """A variant of one kind.

    ``build`` must import heavy libraries (torch, the optimizer package, ...) inside itself. ``validate(options,
    config)`` sees the whole validated config and returns ``Issue``s (use :func:`error` / :func:`warning`).
    ``capabilities`` are tags core acts on, e.g. ``adaptive_lr`` or ``schedule_free``.

    ``file_deltas`` (adapters only, optional) lets ``anima generate --lora`` apply files in the variant's own format:
    ``file_deltas(tensors, metadata, weights)`` gets a safetensors file's tensors and metadata and the base weights
    keyed by original module path (``blocks.0.self_attn.q_proj``; read-only), and returns ΔW per original path, to
    be added at strength 1 (scale and any weight decomposition already applied), or None when the file is not in
    its format. Raise :class:`anima_core.errors.UserError` for a file in its format that it cannot apply.
    """

    name: str
    options: type[VariantOptions]
    build: Callable[..., Any]
    description: str = ""
    validate: Callable[[Any, Any], Iterable[Issue]] | None = None
    capabilities: frozenset[str] = field(default_factory=frozenset)
    file_deltas: FileDeltas | None = None

    def type_literal(self) -> tuple[Any, ...]:
        """The values of the options model's ``type`` Literal (must be exactly ``(name,)``)."""
        info = self.options.model_fields.get("type")
        if info is None or typing.get_origin(info.annotation) is not Literal:
            return ()
        return typing.get_args(info.annotation)
