"""The demo's procedural world: coloured shapes on light, plain or lightly textured backgrounds, 64 px, with
booru-style captions such as ``red circle, top left, small``.

One colour, :data:`HELD_OUT` (``purple``), never appears in the base model's pretraining data: it is the concept a
demo LoRA teaches. Everything is drawn from ``random.Random(seed)``, so the same seed gives the same images.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

# Saturated foreground colours; backgrounds stay nearly grey, so the scorer can tell them apart by saturation.
COLOURS = {"red": (215, 35, 35), "green": (35, 165, 55), "blue": (35, 75, 215), "yellow": (225, 195, 25),
           "purple": (145, 45, 200)}
HELD_OUT = "purple"
SEEN_COLOURS = tuple(c for c in COLOURS if c != HELD_OUT)
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "large")
SIZE = 64
RADIUS = {"small": (7, 9), "large": (14, 17)}  # half the shape's side in px, drawn uniformly
JITTER = 3  # px the centre may move from its quadrant's centre
BACKGROUNDS = ((244, 244, 238), (226, 226, 232), (236, 229, 216), (214, 220, 214))
TEXTURES = ("plain", "plain", "stripes", "noise")  # half plain, half lightly textured
SUPERSAMPLE = 4  # draw at 4× and downsample: anti-aliased edges as a real image would have


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    position: str
    size: str

    @property
    def caption(self) -> str:
        return f"{self.colour} {self.shape}, {self.position}, {self.size}"


def all_specs(colours: Iterable[str] = SEEN_COLOURS) -> list[ShapeSpec]:
    """Every combination of the given colours with every shape, position and size."""
    return [ShapeSpec(c, s, p, z) for c in colours for s in SHAPES for p in POSITIONS for z in SIZES]


def random_spec(rng: random.Random, colours: Iterable[str] = SEEN_COLOURS) -> ShapeSpec:
    return ShapeSpec(rng.choice(list(colours)), rng.choice(SHAPES), rng.choice(POSITIONS), rng.choice(SIZES))


def _background(rng: random.Random):
    from PIL import Image

    base = rng.choice(BACKGROUNDS)
    texture = rng.choice(TEXTURES)
    img = Image.new("RGB", (SIZE, SIZE), base)
    if texture == "stripes":
        period, amp = rng.choice((6, 8, 12)), rng.choice((-10, 10))
        px = img.load()
        for y in range(SIZE):
            for x in range(SIZE):
                if ((x + y) // (period // 2)) % 2:
                    px[x, y] = tuple(max(0, min(255, v + amp)) for v in base)
    elif texture == "noise":
        px = img.load()
        for y in range(SIZE):
            for x in range(SIZE):
                d = rng.randint(-7, 7)  # the same offset on all channels: grey noise, no saturation
                px[x, y] = tuple(max(0, min(255, v + d)) for v in base)
    return img


def render(spec: ShapeSpec, rng: random.Random):
    """One 64 px RGB PIL image of ``spec``; size, jitter and background drawn from ``rng``."""
    from PIL import Image, ImageDraw

    img = _background(rng)
    r = rng.randint(*RADIUS[spec.size])
    vertical, horizontal = spec.position.split()
    cx = SIZE // 4 if horizontal == "left" else 3 * SIZE // 4
    cy = SIZE // 4 if vertical == "top" else 3 * SIZE // 4
    cx += rng.randint(-JITTER, JITTER)
    cy += rng.randint(-JITTER, JITTER)
    k = SUPERSAMPLE
    mask = Image.new("L", (SIZE * k, SIZE * k), 0)
    draw = ImageDraw.Draw(mask)
    box = [(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k]
    if spec.shape == "circle":
        draw.ellipse(box, fill=255)
    elif spec.shape == "square":
        draw.rectangle(box, fill=255)
    else:
        draw.polygon([(cx * k, (cy - r) * k), ((cx - r) * k, (cy + r) * k), ((cx + r) * k, (cy + r) * k)], fill=255)
    mask = mask.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    img.paste(Image.new("RGB", (SIZE, SIZE), COLOURS[spec.colour]), (0, 0), mask)
    return img


def generate(n: int, *, seed: int = 0, colours: Iterable[str] = SEEN_COLOURS) -> Iterator[tuple[object, str]]:
    """``n`` (PIL image, caption) pairs. Cycles through every combination (shuffled per cycle) so that small sets
    still cover each colour, shape, position and size evenly."""
    rng = random.Random(seed)
    specs = all_specs(colours)
    order: list[ShapeSpec] = []
    for _ in range(n):
        if not order:
            order = specs[:]
            rng.shuffle(order)
        spec = order.pop()
        yield render(spec, rng), spec.caption


def write_dataset(folder: Path, n: int, *, seed: int = 0, colours: Iterable[str] = SEEN_COLOURS,
                  start: int = 0) -> Path:
    """``n`` PNGs with same-stem ``.txt`` captions in ``folder`` (created if needed), numbered from ``start``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, caption) in enumerate(generate(n, seed=seed, colours=colours), start):
        image.save(folder / f"shape_{i:04d}.png")
        (folder / f"shape_{i:04d}.txt").write_text(caption + "\n")
    return folder


def parse_caption(caption: str) -> ShapeSpec:
    """The spec a caption names (``red circle, top left, small``)."""
    colour_shape, position, size = (part.strip() for part in caption.split(","))
    colour, shape = colour_shape.split()
    return ShapeSpec(colour, shape, position, size)
