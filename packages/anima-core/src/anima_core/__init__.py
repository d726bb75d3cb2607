"""anima-core: LoRA training for the Anima text-to-image model.

Importing this package is cheap (no torch): plugins import ``hookimpl`` from here at their own import time.
"""

from anima_core.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
