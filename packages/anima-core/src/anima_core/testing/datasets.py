"""Tiny image datasets for tests and demos: coloured shapes on plain backgrounds with booru-style captions."""

from __future__ import annotations

import random
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def write_shapes_dataset(folder: Path, n: int = 4, *, size: tuple[int, int] = (64, 64), seed: int = 0) -> Path:
    """``n`` PNGs with same-stem ``.txt`` captions such as ``red circle, top left, small``."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(n):
        colour = rng.choice(list(COLOURS))
        shape = SHAPES[i % len(SHAPES)]
        big = rng.random() < 0.5
        r = (min(w, h) // 3) if big else (min(w, h) // 6)
        cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
        img = Image.new("RGB", size, (245, 245, 240))
        draw = ImageDraw.Draw(img)
        box = [cx - r, cy - r, cx + r, cy + r]
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
        where = f"{'top' if cy < h / 2 else 'bottom'} {'left' if cx < w / 2 else 'right'}"
        img.save(folder / f"img_{i:03d}.png")
        (folder / f"img_{i:03d}.txt").write_text(f"{colour} {shape}, {where}, {'large' if big else 'small'}")
    return folder
