"""Image files: probing (size, content hash, full decode to catch corrupt files) and turning one image into the
pixels of its bucket (RGB, EXIF orientation applied, resized to cover, cropped)."""

from __future__ import annotations

import hashlib
import io
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from anima_core.data.buckets import Size, cover_size, crop_offset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# EXIF orientations that swap width and height (90° rotations, transposes).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112


class ImageError(Exception):
    """An image file that cannot be read or decoded."""


@dataclass(frozen=True)
class Probe:
    width: int  # after EXIF orientation
    height: int
    content_hash: str  # sha256 of the file bytes


_probe_memo: dict[tuple, Probe | str] = {}
_memo_lock = threading.Lock()


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def probe_image(path: Path) -> Probe:
    """Decode the whole file once (a truncated image fails here, before any model loads) and hash its bytes.
    Results are remembered per (path, size, mtime), so the runtime's up-front check and the dataset build that
    follows read each image once."""
    key = _stat_key(path)
    with _memo_lock:
        known = _probe_memo.get(key)
    if known is None:
        try:
            known = _probe_uncached(path)
        except ImageError as exc:
            known = str(exc)
        with _memo_lock:
            if len(_probe_memo) > 200_000:
                _probe_memo.clear()
            _probe_memo[key] = known
    if isinstance(known, str):
        raise ImageError(known)
    return known


def _probe_uncached(path: Path) -> Probe:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"unreadable: {exc.strerror or exc}") from None
    if not data:
        raise ImageError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            orientation = img.getexif().get(_ORIENTATION_TAG, 1)
            if img.format == "JPEG":  # decoding at 1/8 scale still reads every byte, so truncation still shows
                img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            img.load()
    except UnidentifiedImageError:
        raise ImageError("not a readable image (unknown format or damaged header)") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        raise ImageError(f"{type(exc).__name__}: {exc}") from None
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return Probe(width, height, hashlib.sha256(data).hexdigest())


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit/float greyscale: scale to 8 bits, not clip
        extrema = img.getextrema()
        top = max(1.0, float(extrema[1]))
        img = img.point(lambda v: v * (255.0 / (65535.0 if top > 255 else 255.0))).convert("L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels become white: their stored colour is arbitrary (often black) and would train as such.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def load_bucket_image(path: Path, bucket: Size, crop: str, content_hash: str) -> Image.Image:
    """The RGB pixels of ``path`` for ``bucket``: EXIF orientation applied, alpha composited on white, resized
    (Lanczos) to cover the bucket with the aspect ratio kept, then cropped (center, or the per-image fixed
    offset of ``random`` crop)."""
    try:
        with Image.open(path) as img:
            orientation = img.getexif().get(_ORIENTATION_TAG, 1)
            w, h = img.size
            if orientation in _SWAPPING_ORIENTATIONS:
                w, h = h, w
            target = cover_size(w, h, bucket)
            if img.format == "JPEG":  # DCT-domain downscale: much faster, never below the target size
                want = (target[1], target[0]) if orientation in _SWAPPING_ORIENTATIONS else target
                img.draft("RGB", want)
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
    except Exception as exc:
        raise ImageError(f"{path}: {type(exc).__name__}: {exc}") from None
    target = cover_size(img.width, img.height, bucket)
    if img.size != target:
        img = img.resize(target, Image.Resampling.LANCZOS)
    left, top = crop_offset(target, bucket, crop, content_hash)
    if (left, top, *img.size) != (0, 0, *bucket):
        img = img.crop((left, top, left + bucket[0], top + bucket[1]))
    return img


def to_tensor(img: Image.Image):
    """(3, H, W) float32 in [-1, 1]."""
    import numpy as np
    import torch

    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
