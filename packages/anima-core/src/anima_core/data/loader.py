"""What the training loop consumes: :func:`build_training_data` scans, fills the latent cache, and returns
:class:`TrainingData`, whose :meth:`~TrainingData.batches` only reads cached tensors and applies the per-epoch
caption and flip draws. Latents are held in memory up to a budget; past it they are read from the cache files on a
background thread, a few batches ahead of the training step."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, TypeVar

import torch

from anima_core.data.buckets import Size
from anima_core.data.cache import (
    CacheMissError,
    LatentCache,
    LatentSpec,
    fill_cache,
    read_latent,
    unique_specs,
    vae_identity,
)
from anima_core.data.captions import CaptionRules, caption_file_of, long_caption_warning, render_caption
from anima_core.data.config import DatasetSection
from anima_core.data.sampler import batches_per_rank, epoch_rng, plan_epoch
from anima_core.data.scan import ImageRecord, ScanReport, scan_dataset
from anima_core.data.text_cache import CachedText, TextCache, build_text_cache

if TYPE_CHECKING:
    from anima_core.model.text_encoder import TextEncoder
    from anima_core.model.vae import AnimaVAE

PREFETCH_BATCHES = 2
# Latents read once stay in memory up to this many bytes per process (sd-scripts keeps every cached latent in RAM;
# this bounds it): later epochs then read no files. 1024² latents are 1 MiB each, so ~2000 entries.
RAM_BUDGET_BYTES = 2 << 30


@dataclass
class Batch:
    latents: torch.Tensor  # (B, 16, 1, h, w) normalised float32, all from one bucket
    captions: list[str]  # after the caption rules for this (seed, epoch, sample)
    loss_weight: torch.Tensor  # (B,) 1.0 for training images, dataset.reg.loss_weight for regularisation images
    is_reg: torch.Tensor  # (B,) bool
    keys: list[str]  # stable per-image ids: the path relative to the dataset root ("reg:"-prefixed for reg images)
    text: Optional[CachedText] = None  # set when a text-encoder cache is attached


@dataclass(frozen=True)
class Sample:
    """One occurrence in an epoch: an image at one base resolution (repeats are separate samples)."""

    record: ImageRecord
    bucket: Size
    plain: Path  # cached latent files
    flipped: Optional[Path]


@dataclass
class TrainingData:
    samples: list[Sample]
    seed: int
    batch_size: int
    rank: int
    world_size: int
    flip_aug: bool
    rules: CaptionRules
    reg_rules: CaptionRules
    reg_loss_weight: float
    report: ScanReport
    encoded: int = 0  # latents encoded by this build
    reused: int = 0  # latents found in the cache
    cache_dir: Path = Path(".")
    text_cache: Optional[TextCache] = None
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._buckets = [s.bucket for s in self.samples]
        self._in_memory: dict[Path, torch.Tensor] = {}
        self._memory_left = RAM_BUDGET_BYTES

    @property
    def num_images(self) -> int:
        """Usable training images (each counted once, without repeats or the regularisation set)."""
        return self.report.num_images

    @property
    def num_reg_images(self) -> int:
        return len(self.report.reg_images)

    def __len__(self) -> int:
        return batches_per_rank(self._buckets, self.batch_size, self.world_size)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This rank's batches of ``epoch`` from the ``start``-th on (skipped batches are never loaded)."""
        plan = plan_epoch(self._buckets, self.batch_size, self.seed, epoch, self.world_size)
        mine = plan[self.rank::self.world_size][start:]
        made = (self._batch(epoch, indices) for indices in mine)
        # From memory a batch costs a fraction of a millisecond: a reader thread would only add GIL hand-offs.
        return made if self._all_in_memory() else _prefetch(made, PREFETCH_BATCHES)

    def preload(self) -> None:
        """Read cached latents into memory (up to the budget), so batches read no files at all."""
        for sample in self.samples:
            for path in (sample.plain, sample.flipped):
                if path is not None and path not in self._in_memory:
                    if self._memory_left <= 0:
                        return
                    self._latent(sample, path)

    def _all_in_memory(self) -> bool:
        return all(s.plain in self._in_memory and (s.flipped is None or s.flipped in self._in_memory)
                   for s in self.samples)

    def caption(self, epoch: int, index: int) -> str:
        """Sample ``index``'s caption in ``epoch``: drawn from its own generator, so it does not depend on batch
        size, process count or where the epoch was resumed."""
        sample = self.samples[index]
        rules = self.reg_rules if sample.record.is_reg else self.rules
        rng = None if rules.deterministic else epoch_rng("caption", self.seed, epoch, index)
        return render_caption(sample.record.caption, rules, rng)

    def flipped(self, epoch: int, index: int) -> bool:
        return self.flip_aug and epoch_rng("flip", self.seed, epoch, index).random() < 0.5

    def attach_text_cache(self, encoder: TextEncoder, *, batch_size: int = 8, progress: bool = True) -> None:
        """Encode every caption once; from then on each :class:`Batch` carries ``text``."""
        if not (self.rules.deterministic and self.reg_rules.deterministic):
            raise ValueError("a text-encoder cache needs deterministic captions (no shuffle_caption, tag_dropout "
                             "or caption_dropout)")
        captions = {self.caption(0, i) for i in range(len(self.samples))}
        self.text_cache = build_text_cache(captions, encoder, self.cache_dir, batch_size=batch_size,
                                           progress=progress)

    def _latent(self, sample: Sample, path: Path) -> torch.Tensor:
        latent = self._in_memory.get(path)
        if latent is not None:
            return latent
        try:
            latent = read_latent(path)
        except Exception as exc:
            raise RuntimeError(f"cached latent of {sample.record.path} ({path}) cannot be read: {exc}; it was "
                               "removed or damaged during the run, so run again to re-encode it") from None
        size = latent.numel() * latent.element_size()
        if size <= self._memory_left:
            self._memory_left -= size
            self._in_memory[path] = latent
        return latent

    def _batch(self, epoch: int, indices: list[int]) -> Batch:
        latents, captions = [], []
        for i in indices:
            sample = self.samples[i]
            path = sample.flipped if self.flipped(epoch, i) else sample.plain
            latents.append(self._latent(sample, path))
            captions.append(self.caption(epoch, i))
        records = [self.samples[i].record for i in indices]
        return Batch(
            latents=torch.stack(latents),
            captions=captions,
            loss_weight=torch.tensor([self.reg_loss_weight if r.is_reg else 1.0 for r in records],
                                     dtype=torch.float32),
            is_reg=torch.tensor([r.is_reg for r in records], dtype=torch.bool),
            keys=[r.key for r in records],
            text=self.text_cache.lookup(captions) if self.text_cache is not None else None,
        )


T = TypeVar("T")
_DONE = object()


def _prefetch(items: Iterator[T], depth: int) -> Iterator[T]:
    """Run ``items`` on a daemon thread ``depth`` ahead of the consumer: reading latents overlaps the training
    step. Errors surface in the consumer; closing the iterator (or dropping it) stops the thread."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                slots.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, _DONE))
        except BaseException as exc:  # handed to the consumer, which raises it
            put((False, exc))

    def consume() -> Iterator[T]:
        thread = threading.Thread(target=work, name="anima-data-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                ok, item = slots.get()
                if not ok:
                    raise item
                if item is _DONE:
                    return
                yield item
        finally:
            stop.set()

    return consume()


def _specs(record: ImageRecord, bucket: Size, section: DatasetSection) -> tuple[LatentSpec, Optional[LatentSpec]]:
    plain = LatentSpec(record.path, record.content_hash, bucket, section.crop, False)
    flipped = LatentSpec(record.path, record.content_hash, bucket, section.crop, True) if section.flip_aug else None
    return plain, flipped


def build_training_data(section: DatasetSection, *, seed: int, batch_size: int, cache_dir: Path,
                        vae: Optional[AnimaVAE], rank: int = 0, world_size: int = 1,
                        progress: bool = True, should_stop: Optional[Callable[[], bool]] = None,
                        text_encoder: Optional[TextEncoder] = None) -> TrainingData:
    """Scan the dataset, encode every latent not cached yet (once per image, bucket and flip, however often it
    repeats), and return the epoch-by-epoch batches of process ``rank`` of ``world_size``. ``vae`` may be None
    only when every latent is already cached (by the last VAE that filled ``cache_dir``). ``should_stop`` (e.g.
    the run's Ctrl-C flag) is asked between VAE calls: see :func:`~anima_core.data.cache.fill_cache`. With
    ``text_encoder``, captions it would cut at its token limit are reported in ``problems``, naming their files."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    report = scan_dataset(section)
    specs: dict[tuple[str, Size], tuple[LatentSpec, Optional[LatentSpec]]] = {}
    for record in report.records:
        for bucket in record.buckets:
            specs.setdefault((record.key, bucket), _specs(record, bucket, section))
    wanted = [s for plain, flipped in specs.values() for s in (plain, flipped) if s is not None]
    if vae is None:
        cache = LatentCache.last_used(cache_dir)
        if cache is None:
            raise CacheMissError(f"no VAE was given and the latent cache {cache_dir} is empty; load the VAE to "
                                 f"encode the {len(set(wanted))} latent(s) needed")
        needed = unique_specs(cache, wanted)
        missing = [s for s in needed if not cache.has(s)]
        if missing:
            raise CacheMissError(f"{len(missing)} latent(s) are not in the cache {cache_dir} (e.g. {missing[0].path} "
                                 f"at {missing[0].bucket[0]}x{missing[0].bucket[1]}); load the VAE to encode them")
        encoded, reused = 0, len(needed)
    else:
        cache = LatentCache(cache_dir, vae_identity(vae))
        encoded, reused = fill_cache(cache, wanted, vae, batch_size=section.vae_batch_size or batch_size,
                                     progress=progress, should_stop=should_stop)
    samples = []
    for record in report.records:
        for bucket in record.buckets:
            plain, flipped = specs[(record.key, bucket)]
            sample = Sample(record, bucket, cache.file(plain), cache.file(flipped) if flipped else None)
            samples += [sample] * record.repeats
    data = TrainingData(samples=samples, seed=seed, batch_size=batch_size, rank=rank, world_size=world_size,
                        flip_aug=section.flip_aug, rules=CaptionRules.for_section(section),
                        reg_rules=CaptionRules.for_section(section, reg=True),
                        reg_loss_weight=section.reg.loss_weight if section.reg is not None else 1.0,
                        report=report, encoded=encoded, reused=reused, problems=list(report.problems),
                        cache_dir=Path(cache_dir))
    if text_encoder is not None:
        longest = {}  # the caption as rendered with every tag kept (no dropout): the most the encoder is given
        for record in report.records:
            rules = data.reg_rules if record.is_reg else data.rules
            full = replace(rules, shuffle=False, tag_dropout=0.0, caption_dropout=0.0)
            longest.setdefault(caption_file_of(record), render_caption(record.caption, full))
        warning = long_caption_warning(longest.items(), text_encoder)
        if warning is not None:
            data.problems.append(warning)
    data.preload()
    return data
