"""Training data: dataset folders, captions, aspect-ratio buckets, latent cache, regularisation set.

Importing this package stays cheap (the config loads it for :class:`DatasetSection`): torch and PIL load only when
one of the names below is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from anima_core.data.config import DatasetSection, RegSection

if TYPE_CHECKING:
    from anima_core.data.cache import CacheMissError, CachingInterrupted
    from anima_core.data.captions import Caption, CaptionRules, render_caption
    from anima_core.data.loader import Batch, TrainingData, build_training_data
    from anima_core.data.scan import ImageRecord, ScanReport, scan_dataset
    from anima_core.data.text_cache import CachedText

_LAZY = {
    "build_training_data": "loader", "TrainingData": "loader", "Batch": "loader",
    "scan_dataset": "scan", "ScanReport": "scan", "ImageRecord": "scan",
    "Caption": "captions", "CaptionRules": "captions", "render_caption": "captions",
    "CacheMissError": "cache", "CachingInterrupted": "cache", "CachedText": "text_cache",
}

__all__ = ["Batch", "CacheMissError", "CachedText", "CachingInterrupted", "Caption", "CaptionRules", "DatasetSection", "ImageRecord",
           "RegSection", "ScanReport", "TrainingData", "build_training_data", "render_caption", "scan_dataset"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
