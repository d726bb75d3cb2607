"""anima-core: LoRA training for the Anima text-to-image model.

Importing this package is cheap (no torch): plugins import ``hookimpl`` from here at their own import time, and
the public model API (``AnimaModels``, ``GenerationParams``) is imported on first use.
"""

from typing import TYPE_CHECKING, Any

from anima_core.hookspecs import hookimpl

__version__ = "0.1.0"

if TYPE_CHECKING:
    from anima_core.model.models import AnimaModels, GenerationParams

_LAZY = {
    "AnimaModels": "anima_core.model.models",
    "GenerationParams": "anima_core.model.models",
}

__all__ = ["AnimaModels", "GenerationParams", "__version__", "hookimpl"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'anima_core' has no attribute {name!r}")
