"""PNG files that carry their generation parameters (what ComfyUI/A1111 users expect to find in them)."""

from __future__ import annotations

import json
from pathlib import Path


def save_png(image, path: Path, metadata: dict) -> None:
    """PNG with the generation parameters in its text chunks (``parameters`` A1111-style, ``anima`` JSON)."""
    from PIL.PngImagePlugin import PngInfo

    from anima_core import atomic

    info = PngInfo()
    info.add_text("anima", json.dumps(metadata, sort_keys=True))
    summary = (f"{metadata['prompt']}\nNegative prompt: {metadata['negative_prompt']}\nSteps: {metadata['steps']}, "
               f"Sampler: {metadata['sampler']}, CFG scale: {metadata['cfg']}, Seed: {metadata['seed']}, "
               f"Size: {metadata['width']}x{metadata['height']}, Shift: {metadata['shift']}")
    info.add_text("parameters", summary)
    atomic.write_with(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
