"""Sampling from a model set for the demo's figures: fixed prompts and seeds, scored by :mod:`.scoring`, laid out
as labelled PNG grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from anima_core.demo import scoring, shapes
from anima_core.demo.base import SAMPLE_SETTINGS


def seen_prompts(n: int = 16) -> list[str]:
    """``n`` captions of seen colours spread over every colour, shape, position and size."""
    specs = shapes.all_specs(shapes.SEEN_COLOURS)
    stride = max(len(specs) // n, 1)
    # a stride coprime with the inner cycles (2 sizes, 4 positions, 3 shapes) walks through all of them
    return [specs[(i * (stride + 1)) % len(specs)].caption for i in range(n)]


def held_out_prompts(n: int = 8) -> list[str]:
    """``n`` captions of the held-out colour over shapes, positions and sizes."""
    specs = shapes.all_specs([shapes.HELD_OUT])
    return [specs[(i * 5) % len(specs)].caption for i in range(n)]


def sample(models, prompts: Sequence[str], *, seed: int = 0, settings: Mapping[str, Any] = SAMPLE_SETTINGS):
    """One PIL image per prompt; prompt i uses seed + i (so a base and a LoRA see the same noise)."""
    from anima_core.model.models import GenerationParams

    return [models.generate(GenerationParams(prompt=p, seed=seed + i, **settings)) for i, p in enumerate(prompts)]


def write_grid(rows: Sequence[tuple[str, Sequence]], path: Path, *, scale: int = 2) -> Path:
    """Rows of equally sized images, each with a label on its left, as one PNG (written atomically)."""
    from PIL import Image, ImageDraw

    from anima_core import atomic

    width, height = rows[0][1][0].size
    label_w = 120
    columns = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_w + columns * width * scale, len(rows) * height * scale), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * height * scale + 4), label, fill="black")
        for c, image in enumerate(images):
            big = image.resize((width * scale, height * scale), Image.Resampling.NEAREST)
            grid.paste(big, (label_w + c * width * scale, r * height * scale))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_with(path, lambda tmp: grid.save(tmp, format="PNG"))
    return path


def evaluate_base(paths, grid_path: Path | None = None) -> dict[str, Any]:
    """Load a model set through the real loaders and score its samples: ``seen`` (per-attribute accuracy on
    seen-colour prompts) and ``held_out_rate`` (how often held-out prompts come out in the held-out colour)."""
    from anima_core.model.models import AnimaModels

    paths = paths if isinstance(paths, Mapping) else {k: getattr(paths, k) for k in
                                                      ("transformer", "text_encoder", "vae", "qwen_tokenizer",
                                                       "t5_tokenizer")}
    models = AnimaModels.load(**paths, device="cpu", dtype="fp32")
    seen, held = seen_prompts(), held_out_prompts()
    seen_images, held_images = sample(models, seen), sample(models, held)
    if grid_path is not None:
        write_grid([("seen", seen_images[:8]), ("seen", seen_images[8:]), (f"{shapes.HELD_OUT} (unseen)",
                                                                            held_images)], grid_path)
    scores = scoring.score(seen_images, seen)
    return {"seen": {k: round(v, 3) for k, v in scores.as_dict().items()},
            "held_out_rate": round(scoring.concept_rate(held_images, shapes.HELD_OUT), 3)}
