"""A deterministic scorer for demo images: which colour, shape, position and size a picture shows, read from
pixel statistics alone (no learned classifier, so a score cannot drift with training).

Foreground = pixels whose saturation (max − min channel) is high: the shape colours are saturated and the
backgrounds nearly grey. Each foreground pixel votes for its nearest reference colour; the shape comes from how
much of its bounding box the foreground fills (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from anima_core.demo.shapes import COLOURS, SIZE, ShapeSpec, parse_caption

SATURATION_MIN = 70  # shape colours have ≥ 150, backgrounds ≤ 25
MIN_PIXELS = 20  # fewer foreground pixels than this: no shape in the picture
FILL_SQUARE, FILL_TRIANGLE = 0.9, 0.64  # fill ratio above → square, below → triangle, between → circle
LARGE_SIDE = 24  # bounding-box side in px; small shapes are 14–18, large ones 28–34


@dataclass(frozen=True)
class Reading:
    """What the scorer sees; ``None`` where there is no foreground."""

    colour: Optional[str]
    shape: Optional[str]
    position: Optional[str]
    size: Optional[str]


def _array(image) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.int16)
    if array.shape != (SIZE, SIZE, 3):
        raise ValueError(f"expected a {SIZE}×{SIZE} RGB image, found shape {array.shape}")
    return array


def read(image) -> Reading:
    """Colour, shape, position and size of the (single) shape in a 64 px image (PIL or H×W×3 uint8)."""
    array = _array(image)
    foreground = (array.max(axis=2) - array.min(axis=2)) > SATURATION_MIN
    if foreground.sum() < MIN_PIXELS:
        return Reading(None, None, None, None)
    pixels = array[foreground].astype(np.float32)
    refs = np.array(list(COLOURS.values()), dtype=np.float32)
    nearest = np.argmin(((pixels[:, None, :] - refs[None]) ** 2).sum(-1), axis=1)
    votes = np.bincount(nearest, minlength=len(refs))
    colour = list(COLOURS)[int(votes.argmax())]
    # the shape from the pixels of the winning colour only (a stray blob of another colour does not distort it)
    mask = np.zeros_like(foreground)
    mask[foreground] = nearest == votes.argmax()
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = mask.sum() / float(height * width)
    shape = "square" if fill > FILL_SQUARE else "triangle" if fill < FILL_TRIANGLE else "circle"
    cy, cx = ys.mean(), xs.mean()
    position = f"{'top' if cy < SIZE / 2 else 'bottom'} {'left' if cx < SIZE / 2 else 'right'}"
    size = "large" if max(height, width) >= LARGE_SIDE else "small"
    return Reading(colour, shape, position, size)


@dataclass(frozen=True)
class Scores:
    """Fractions of images whose reading matches the prompt, per attribute, and ``n``."""

    colour: float
    shape: float
    position: float
    size: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"colour": self.colour, "shape": self.shape, "position": self.position, "size": self.size,
                "n": self.n}


def score(images: Sequence, captions: Sequence[str]) -> Scores:
    """How often each image shows what its caption asks for."""
    if len(images) != len(captions) or not images:
        raise ValueError(f"need one caption per image, found {len(images)} images and {len(captions)} captions")
    hits = {"colour": 0, "shape": 0, "position": 0, "size": 0}
    for image, caption in zip(images, captions):
        want: ShapeSpec = parse_caption(caption)
        got = read(image)
        for attribute in hits:
            hits[attribute] += getattr(got, attribute) == getattr(want, attribute)
    n = len(images)
    return Scores(**{k: v / n for k, v in hits.items()}, n=n)


def concept_rate(images: Iterable, colour: str) -> float:
    """Fraction of images whose dominant foreground colour is ``colour``."""
    readings = [read(image).colour for image in images]
    return sum(r == colour for r in readings) / max(len(readings), 1)
