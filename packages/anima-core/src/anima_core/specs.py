"""What a plugin hands to ``register``: one frozen spec per variant."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal

if TYPE_CHECKING:
    from anima_core.options import VariantOptions

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
    """

    name: str
    options: type[VariantOptions]
    build: Callable[..., Any]
    description: str = ""
    validate: Callable[[Any, Any], Iterable[Issue]] | None = None
    capabilities: frozenset[str] = field(default_factory=frozenset)

    def type_literal(self) -> tuple[Any, ...]:
        """The values of the options model's ``type`` Literal (must be exactly ``(name,)``)."""
        info = self.options.model_fields.get("type")
        if info is None or typing.get_origin(info.annotation) is not Literal:
            return ()
        return typing.get_args(info.annotation)
