"""Aspect-ratio buckets: which (width, height) sizes exist for a base resolution, which one an image goes to, and
how an image is resized and cropped to it. Pure arithmetic (no PIL, no torch), shared by scanning and caching."""

from __future__ import annotations

import functools
import hashlib
import math

Size = tuple[int, int]  # (width, height) in pixels


@functools.lru_cache(maxsize=64)
def make_buckets(base: int, step: int = 64, ratio_limit: float = 2.0) -> tuple[Size, ...]:
    """Every (w, h) with sides on the ``step`` grid, area ≤ base² and long/short ≤ ``ratio_limit``, taking for each
    width the tallest height that fits (so no bucket wastes area), mirrored so tall and wide sets match, plus the
    square (base, base) even when base is off the grid. Sorted by width."""
    max_area = base * base
    found = {(base, base)}
    # w ≤ base·√R follows from w·h ≤ base² and w/h ≤ R.
    widest = int(base * math.sqrt(ratio_limit) // step) * step
    for w in range(step, widest + 1, step):
        h = (max_area // w) // step * step
        if h >= step and max(w, h) / min(w, h) <= ratio_limit + 1e-9:
            found.update({(w, h), (h, w)})
    return tuple(sorted(found))


def assign_bucket(width: int, height: int, buckets: tuple[Size, ...]) -> Size:
    """The bucket closest in aspect ratio, measured in log space so tall and wide images are treated alike; ties go
    to the larger area (the reference's bug #313 kept the first one generated), then to the smaller width."""
    target = math.log(width / height)

    def rank(b: Size) -> tuple[float, int, int]:
        return round(abs(math.log(b[0] / b[1]) - target), 12), -b[0] * b[1], b[0]

    return min(buckets, key=rank)


def cover_size(width: int, height: int, bucket: Size) -> Size:
    """Size to resize to so the image covers the bucket with its aspect ratio kept (one side matches exactly)."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    return max(bw, round(width * scale)), max(bh, round(height * scale))


def needs_upscale(width: int, height: int, bucket: Size) -> bool:
    return max(bucket[0] / width, bucket[1] / height) > 1.0


def crop_offset(resized: Size, bucket: Size, mode: str, content_hash: str) -> tuple[int, int]:
    """(left, top) of the crop. ``random`` draws the offset from the image's content hash and the bucket, so it is
    random across images but fixed for each one: a cached latent stays valid across runs and epochs."""
    slack_x, slack_y = resized[0] - bucket[0], resized[1] - bucket[1]
    if mode == "center":
        return slack_x // 2, slack_y // 2
    if mode != "random":
        raise ValueError(f"unknown crop mode {mode!r}")
    digest = hashlib.sha256(f"crop:{content_hash}:{bucket[0]}x{bucket[1]}".encode()).digest()
    ux = int.from_bytes(digest[:8], "big") / 2**64
    uy = int.from_bytes(digest[8:16], "big") / 2**64
    return int(ux * (slack_x + 1)), int(uy * (slack_y + 1))
