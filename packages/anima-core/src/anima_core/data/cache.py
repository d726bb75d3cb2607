"""The latent cache: one safetensors file per (image content, bucket, crop, flip, VAE), named by a hash of all of
them, so a changed image, size, crop mode or VAE gets a new entry and a stale one is never read. Files are written
atomically; the plain and the mirrored latent are separate entries, both encoded from pixels (never a random flip
baked into the cache, the reference's bug #176), and each entry is encoded once however often the image repeats."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import torch

from anima_core import atomic
from anima_core.progress import progress_bar
from anima_core.data.buckets import Size
from anima_core.data.images import load_bucket_image, to_tensor
from anima_core.errors import UserError

if TYPE_CHECKING:
    from anima_core.model.vae import AnimaVAE

# Bump when the pixels fed to the VAE change for the same inputs (resize filter, crop rule, colour handling...).
PIPELINE_VERSION = "anima-latents-1"
LATENT_KEY = "latent"
LAST_VAE_FILE = "last_vae.txt"  # which VAE filled this cache last: lets vae=None find its entries


class CacheMissError(UserError):
    """Latents are needed that are not cached and no VAE was given to encode them."""


class CachingInterrupted(KeyboardInterrupt):
    """A stop was requested (Ctrl-C) while the latent cache was filling; what was encoded so far is kept."""

    def __init__(self, encoded: int, todo: int, folder: Path) -> None:
        super().__init__(f"stopped while caching latents: {encoded} of {todo} encoded and kept in {folder}; the next "
                         f"run reuses them and encodes only the rest")
        self.encoded, self.todo = encoded, todo


def vae_identity(vae: AnimaVAE) -> str:
    """A hash of the VAE's config, dtype and a strided sample of a few of its weights: cheap, and different for any
    other checkpoint or precision."""
    h = hashlib.sha256(PIPELINE_VERSION.encode())
    # diffusers' bookkeeping keys (``_use_default_values`` is built from a set, so its order changes per process;
    # ``_diffusers_version`` changes on upgrade) say nothing about the latents: left out
    config = {k: v for k, v in dict(vae.vae.config).items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(str(vae.dtype).encode())
    state = vae.vae.state_dict()
    names = sorted(state)
    # sorted, never a bare set: a set of str iterates in PYTHONHASHSEED order, which gave every process its own
    # cache folder (nothing was ever reused across runs)
    for name in sorted({names[0], names[len(names) // 3], names[2 * len(names) // 3], names[-1]}):
        flat = state[name].detach().flatten()
        sample = flat[:: max(1, flat.numel() // 64)][:64]
        h.update(name.encode())
        h.update(repr(sample.float().cpu().tolist()).encode())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class LatentSpec:
    """One cache entry: what is encoded."""

    path: Path  # the source image
    content_hash: str
    bucket: Size
    crop: str
    flip: bool

    def key(self, vae_id: str) -> str:
        text = f"{PIPELINE_VERSION}|{self.content_hash}|{self.bucket[0]}x{self.bucket[1]}|{self.crop}|" \
               f"{int(self.flip)}|{vae_id}"
        return hashlib.sha256(text.encode()).hexdigest()

    def shape(self) -> tuple[int, int, int, int]:
        return 16, 1, self.bucket[1] // 8, self.bucket[0] // 8


class LatentCache:
    """``<cache_dir>/latents/<vae id>/<2 hex>/<key>.safetensors``, each holding one ``latent`` (16, 1, h/8, w/8)
    float32 plus metadata saying what it is (for people looking at the folder)."""

    def __init__(self, cache_dir: Path, vae_id: str) -> None:
        self.root = Path(cache_dir) / "latents"
        self.vae_id = vae_id
        self.folder = self.root / vae_id

    @classmethod
    def last_used(cls, cache_dir: Path) -> Optional[LatentCache]:
        marker = Path(cache_dir) / "latents" / LAST_VAE_FILE
        if not marker.is_file():
            return None
        vae_id = marker.read_text().strip()
        return cls(cache_dir, vae_id) if vae_id else None

    def mark_last_used(self) -> None:
        atomic.write_text(self.root / LAST_VAE_FILE, self.vae_id + "\n")

    def file(self, spec: LatentSpec) -> Path:
        key = spec.key(self.vae_id)
        return self.folder / key[:2] / f"{key}.safetensors"

    def has(self, spec: LatentSpec) -> bool:
        """An entry counts only if its header reads and its shape is right: a damaged file is re-encoded."""
        path = self.file(spec)
        if not path.is_file():
            return False
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:  # the header only: no tensor data is read
                return tuple(f.get_slice(LATENT_KEY).get_shape()) == spec.shape()
        except Exception:
            return False

    def write(self, spec: LatentSpec, latent: torch.Tensor) -> None:
        from safetensors.torch import save_file

        meta = {"image": str(spec.path), "content_hash": spec.content_hash, "bucket": f"{spec.bucket[0]}x"
                f"{spec.bucket[1]}", "crop": spec.crop, "flip": str(spec.flip).lower(), "vae": self.vae_id,
                "pipeline": PIPELINE_VERSION}
        tensor = latent.detach().to("cpu", torch.float32).contiguous()
        atomic.write_with(self.file(spec), lambda tmp: save_file({LATENT_KEY: tensor}, str(tmp), metadata=meta))


def read_latent(path: Path) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(LATENT_KEY)


def _pixels(spec: LatentSpec) -> torch.Tensor:
    pixels = to_tensor(load_bucket_image(spec.path, spec.bucket, spec.crop, spec.content_hash))
    return pixels.flip(-1) if spec.flip else pixels


def unique_specs(cache: LatentCache, specs: Iterable[LatentSpec]) -> list[LatentSpec]:
    """One spec per cache file: repeats, and identical files under different names, share one entry."""
    first: dict[Path, LatentSpec] = {}
    for spec in specs:
        first.setdefault(cache.file(spec), spec)
    return list(first.values())


def fill_cache(cache: LatentCache, specs: Iterable[LatentSpec], vae: AnimaVAE, *, batch_size: int,
               progress: bool, should_stop: Optional[Callable[[], bool]] = None) -> tuple[int, int]:
    """Encode every spec not cached yet, batched per bucket (one VAE call per batch), decoding the next batch's
    images on worker threads while the VAE runs. Returns (encoded, reused). ``should_stop`` is asked before each
    VAE call (and once at the end): when it says yes, :class:`CachingInterrupted` is raised, every entry written so
    far staying valid for the next run."""
    unique = unique_specs(cache, specs)
    todo = [s for s in unique if not cache.has(s)]
    done = 0

    def check_stop() -> None:
        if should_stop is not None and should_stop():
            cache.mark_last_used()
            raise CachingInterrupted(done, len(todo), cache.folder)

    if todo:
        by_bucket: dict[Size, list[LatentSpec]] = defaultdict(list)
        for spec in todo:
            by_bucket[spec.bucket].append(spec)
        chunks = [group[i:i + batch_size] for group in by_bucket.values() for i in range(0, len(group), batch_size)]
        device = next(vae.parameters()).device
        bar = progress_bar("caching latents", len(todo)) if progress else contextlib.nullcontext(lambda: None)
        # One thread prepares the next chunk (fanning its images out to the readers) while the VAE encodes.
        with bar as advance, ThreadPoolExecutor(max_workers=4) as readers, ThreadPoolExecutor(max_workers=1) as ahead:
            def load(chunk: list[LatentSpec]):
                return ahead.submit(lambda: torch.stack(list(readers.map(_pixels, chunk))))

            pending = load(chunks[0])
            for i, chunk in enumerate(chunks):
                check_stop()
                pixels = pending.result()
                if i + 1 < len(chunks):
                    pending = load(chunks[i + 1])
                latents = vae.encode(pixels.to(device))
                for spec, latent in zip(chunk, latents):
                    cache.write(spec, latent)
                    done += 1
                    advance()
    # also when nothing was left to encode: a stop asked for during model loading ends the run here, before any step
    check_stop()
    cache.mark_last_used()
    return len(todo), len(unique) - len(todo)
